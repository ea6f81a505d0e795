"""Statistics of scores beyond the metrics themselves: bootstrap intervals, DeLong's test of two AUROCs on
the same molecules, the t-interval of a paired improvement over data draws and the spreads over draws and
seeds, conformal p-values and Benjamini-Hochberg decisions. Numbers in, numbers out (numpy, scipy)."""
import math

import numpy as np
from scipy.stats import false_discovery_control, norm, rankdata, sem, t

BOOTSTRAP = {"method": "stratified bootstrap over the test molecules (ID and OOD resampled separately)",
             "resamples": 1000, "seed": 0, "level": 0.95}


def bootstrap_intervals(id_scores, ood_scores, resamples=BOOTSTRAP["resamples"], seed=BOOTSTRAP["seed"],
                        level=BOOTSTRAP["level"]):
    """Percentile intervals {"auroc": (lo, hi), "aupr": ..., "fpr95": ...} of the metrics ood_metrics
    reports, from a stratified bootstrap over the test molecules (bootstrap_metrics), with a fixed
    seed: the same scores give the same interval."""
    metrics, _ = bootstrap_metrics(id_scores, ood_scores, resamples, seed)
    tail = 100 * (1 - level) / 2
    return {name: tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
            for name, values in metrics.items()}


def bootstrap_metrics(id_scores, ood_scores, resamples, seed):
    """({metric: one value per resample}, (ID draw counts, OOD draw counts)): the ID and the OOD
    molecules each resampled with replacement (every resample keeps the measured class sizes). Each
    resample's AUROC, AUPR and FPR95 equal ood_metrics' on the molecules drawn, ties included; they
    come from per-molecule draw counts over one sort of the scores, so a few thousand molecules take
    a fraction of a second."""
    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    n_id, n_ood = len(id_scores), len(ood_scores)
    rng = np.random.default_rng(seed)
    counts = [np.bincount((rng.integers(0, n, (resamples, n)) + n * np.arange(resamples)[:, None]).ravel(),
                          minlength=resamples * n).reshape(resamples, n) for n in (n_id, n_ood)]
    scores = np.r_[id_scores, ood_scores]
    order = np.argsort(-scores, kind="stable")
    is_ood = np.r_[np.zeros(n_id, bool), np.ones(n_ood, bool)][order]
    drawn = np.concatenate(counts, axis=1)[:, order]
    ends = np.r_[scores[order][:-1] != scores[order][1:], True]  # one ROC / PR point per distinct score
    tp, fp = np.cumsum(drawn * is_ood, axis=1)[:, ends], np.cumsum(drawn * ~is_ood, axis=1)[:, ends]
    tpr, fpr = tp / n_ood, fp / n_id
    start = np.zeros((resamples, 1))
    tpr0, fpr0 = np.c_[start, tpr[:, :-1]], np.c_[start, fpr[:, :-1]]
    # a score none of whose molecules was drawn adds a point equal to the one before (the start's (0, 1)
    # before the first drawn score): no area, as the curve of the drawn molecules has no point there
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    precision0 = np.c_[start + 1, precision[:, :-1]]
    metrics = {"auroc": ((fpr - fpr0) * (tpr + tpr0) / 2).sum(axis=1),  # trapezoids, as roc_auc_score
               "aupr": ((tpr - tpr0) * (precision + precision0) / 2).sum(axis=1),  # as auc(recall, precision)
               # FPR at the first distinct score that catches 95% of the OOD molecules, as fpr_at_95_tpr
               "fpr95": fp[np.arange(resamples), np.argmax(tp >= math.ceil(0.95 * n_ood), axis=1)] / n_id}
    return metrics, counts


def delong_test(id_a, ood_a, id_b, ood_b):
    """DeLong's test (DeLong et al. 1988, as Sun & Xu 2014 compute it) that two scorings of the same
    ID and OOD molecules, a and b (in the same order), have equal AUROC: (AUROC a − AUROC b, z, two-sided
    p). The two AUROCs are correlated (the same molecules), which the test's covariance accounts for;
    z is 0 and p 1 when the difference has no variance (identical rankings)."""
    components = []
    for id_scores, ood_scores in ((id_a, ood_a), (id_b, ood_b)):
        id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
        n_id, n_ood = len(id_scores), len(ood_scores)
        both = rankdata(np.r_[ood_scores, id_scores])  # mid-ranks: ties count half
        ood_part = (both[:n_ood] - rankdata(ood_scores)) / n_id  # per OOD molecule: share of ID below it
        id_part = 1 - (both[n_ood:] - rankdata(id_scores)) / n_ood  # per ID molecule: share of OOD above it
        components.append((ood_part.mean(), ood_part, id_part))
    (auroc_a, ood_a_part, id_a_part), (auroc_b, ood_b_part, id_b_part) = components
    variance = np.var(ood_a_part - ood_b_part, ddof=1) / len(ood_a_part) + \
        np.var(id_a_part - id_b_part, ddof=1) / len(id_a_part)
    difference = float(auroc_a - auroc_b)
    if not variance > 0:
        return difference, 0.0, 1.0
    z = difference / math.sqrt(variance)
    return difference, float(z), float(2 * norm.sf(abs(z)))


def conformal_p_values(energies, calibration):
    """Per energy E, the conformal p-value (1 + #{calibration energy ≥ E}) / (n + 1): the chance that an
    in-distribution molecule exchangeable with the n calibration molecules (a run's validation ID)
    scores at least this high. Valid (P(p ≤ α) ≤ α for such a molecule) whatever the model."""
    calibration = np.sort(np.asarray(calibration, np.float64))
    at_least = len(calibration) - np.searchsorted(calibration, np.asarray(energies, np.float64), side="left")
    return (1 + at_least) / (len(calibration) + 1)


def fdr_discoveries(p_values, fdr):
    """Which p-values Benjamini–Hochberg declares discoveries (OOD) at false-discovery rate `fdr`
    (scipy's adjusted p-values at most `fdr`)."""
    p_values = np.asarray(p_values, np.float64)
    return false_discovery_control(p_values, method="bh") <= fdr if len(p_values) else np.zeros(0, bool)


def improvement_interval(differences, draws, level=0.95):
    """A `level` t-interval of the mean paired AUROC difference, or None with fewer than two units. With
    several data draws the unit is the draw (its mean difference over seeds): seeds within a draw share
    its test molecules, so they are not independent replicates; with one draw, the seed."""
    grouped = by_draw(differences, draws)
    units = [float(np.mean(d)) for d in grouped.values()] if len(grouped) > 1 else list(differences)
    if len(units) < 2 or np.isnan(units).any():
        return None
    mean, half = float(np.mean(units)), float(t.ppf((1 + level) / 2, len(units) - 1) * sem(units))
    unit = (f"the {len(units)} data draws' mean differences" if len(grouped) > 1 else
            f"the {len(units)} seeds' differences, on one draw of the molecules (another draw may differ more)")
    return {"mean": mean, "low": mean - half, "high": mean + half, "level": level, "over": unit,
            "distinguishable_from_0": bool(mean - half > 0 or mean + half < 0)}


def by_draw(values, draws):
    """{data seed: its runs' values}, in the order the draws first appear."""
    grouped = {}
    for draw, value in zip(draws, values):
        grouped.setdefault(draw, []).append(value)
    return grouped


def spreads(values, draws):
    """(std of the per-draw means, mean of the within-draw stds) of one method's runs."""
    grouped = by_draw(values, draws)
    within = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in grouped.values()]
    return float(np.std([np.mean(v) for v in grouped.values()], ddof=1)), float(np.mean(within))

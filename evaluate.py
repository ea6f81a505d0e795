"""OOD metrics (OOD = positive class, energy = score), result files, tables and plots (intervals and tests:
stats.py).

Scores in, files out: nothing here knows models or checkpoints. matplotlib is imported only when a
picture is drawn, so training code that needs the metrics does not pay for it."""
import math
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from settings import DataSpec
from stats import BOOTSTRAP, bootstrap_intervals
from utils import InputError, atomic_path, atomic_write_csv, atomic_write_json, read_csv_rows

# How tables, summaries and plots name the metrics, in the order tables show them.
METRIC_LABELS = {"auroc": "AUROC", "aupr": "AUPR", "fpr95": "FPR95", "auroc_size_matched": "AUROC size-matched",
                 "val_auroc": "val AUROC"}
BETTER = {"auroc": "higher", "aupr": "higher", "fpr95": "lower", "auroc_size_matched": "higher", "val_auroc": "higher"}
TEST_ROLE_NAMES = {"id_test": "id", "ood_test": "ood"}  # the role column of test_scores.csv


def fpr_at_95_tpr(id_scores, ood_scores):
    """Fraction of ID molecules flagged OOD at the threshold that catches 95% of OOD molecules."""
    ood_sorted = np.sort(np.asarray(ood_scores))[::-1]
    threshold = ood_sorted[math.ceil(0.95 * len(ood_sorted)) - 1]
    return float(np.mean(np.asarray(id_scores) >= threshold))


def auroc_size_matched(id_scores, ood_scores, id_sizes, ood_sizes):
    """AUROC over the ID–OOD pairs of equal heavy-atom count, and the fraction of pairs that are.

    Molecules are grouped by heavy-atom count; within each count holding both sides, the share of
    (ID, OOD) pairs ranked right (ties count half) is taken, and counts are pooled by their number
    of pairs. A score that only counts atoms gets exactly 0.5; so the number says what a detector
    knows beyond size. None when no pair has equal size."""
    id_scores, ood_scores = np.asarray(id_scores, np.float64), np.asarray(ood_scores, np.float64)
    id_sizes, ood_sizes = np.asarray(id_sizes), np.asarray(ood_sizes)
    right, pairs = 0.0, 0
    for size in np.intersect1d(id_sizes, ood_sizes):
        a, b = id_scores[id_sizes == size], ood_scores[ood_sizes == size]
        diff = b[None, :] - a[:, None]
        right += (diff > 0).sum() + 0.5 * (diff == 0).sum()
        pairs += diff.size
    fraction = pairs / (len(id_scores) * len(ood_scores))
    return (float(right / pairs) if pairs else None), float(fraction)


def ood_metrics(id_scores, ood_scores, id_sizes=None, ood_sizes=None):
    """AUROC, AUPR-Out, AUPR-In, FPR95, counts and score statistics; with heavy-atom counts of the
    molecules also the size-matched AUROC and the fraction of pairs it compares."""
    id_scores = np.asarray(id_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError("metrics need at least one ID and one OOD score")
    labels = np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))]
    scores = np.r_[id_scores, ood_scores]
    precision, recall, _ = precision_recall_curve(labels, scores)
    precision_in, recall_in, _ = precision_recall_curve(1 - labels, -scores)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr": float(auc(recall, precision)),  # AUPR-Out, trapezoidal, the reference's headline
        "aupr_in": float(auc(recall_in, precision_in)),
        "fpr95": fpr_at_95_tpr(id_scores, ood_scores),
        "n_id": int(len(id_scores)), "n_ood": int(len(ood_scores)),
        "energy_id_mean": float(id_scores.mean()), "energy_id_std": float(id_scores.std()),
        "energy_ood_mean": float(ood_scores.mean()), "energy_ood_std": float(ood_scores.std()),
    } | ({} if id_sizes is None else dict(zip(("auroc_size_matched", "size_matched_pair_fraction"),
                                              auroc_size_matched(id_scores, ood_scores, id_sizes, ood_sizes))))


def metrics_with_intervals(id_scores, ood_scores, id_sizes=None, ood_sizes=None):
    """ood_metrics plus the 95% bootstrap interval of AUROC, AUPR and FPR95 (`auroc_ci95`: [low, high],
    ...) and how it was drawn (`interval`)."""
    intervals = bootstrap_intervals(id_scores, ood_scores)
    return ood_metrics(id_scores, ood_scores, id_sizes, ood_sizes) | \
        {f"{name}_ci95": list(bounds) for name, bounds in intervals.items()} | {"interval": BOOTSTRAP}


def finite_scores(scores, source, what):
    """`scores` ({role: energies}) when every energy is finite; else a one-line error naming the model."""
    for role, values in scores.items():
        if not np.isfinite(values).all():
            raise InputError(f"{source}: the model gives non-finite energies on {what} ({role}); nothing was written")
    return scores


def id_threshold(val_id_scores, keep=0.95):
    """Energy below which `keep` of validation ID molecules fall: the `predict` OOD cut-off."""
    return float(np.quantile(np.asarray(val_id_scores, dtype=np.float64), keep))


# How far validation AUROC may run ahead of test AUROC before a result says so: one run's (its sets are small
# and noisy), and the mean over a sweep arm's runs (which the summary reports for the reference protocol)
VALIDATION_GAP, ARM_VALIDATION_GAP = 0.10, 0.02


def validation_warning(val_auroc, test_auroc, ood_val_split=DataSpec.ood_val_split, limit=VALIDATION_GAP):
    """Words for a validation AUROC that promises more than the test delivers (by more than `limit`), or None."""
    if val_auroc is None or val_auroc - test_auroc <= limit:
        return None
    why = ("OOD val shares domains with OOD training; see --ood_val_split domain" if ood_val_split == "random"
           else "OOD val and OOD test domains differ more than OOD train and OOD val")
    return f"validation optimistic: val AUROC {val_auroc:.3f} vs test {test_auroc:.3f}; {why}"


def write_test_results(out_dir, roles, scores, extra, sizes=None):
    """test_metrics.json, test_scores.csv and the ROC / energy-histogram plots of one scoring.

    roles / scores: {"id_test": [...], "ood_test": [...]} SMILES (as written) and their energies;
    extra: what else test_metrics.json records (encoder_weights and threshold_95_id_val included);
    sizes: heavy-atom counts per role, for the size-matched AUROC."""
    out_dir = Path(out_dir)
    metrics = metrics_with_intervals(scores["id_test"], scores["ood_test"], *((sizes["id_test"], sizes["ood_test"])
                                                                             if sizes else ()))
    metrics.update(extra)
    warning = validation_warning(extra.get("val_auroc"), metrics["auroc"],
                                 extra.get("ood_val_split", DataSpec.ood_val_split))
    if warning:
        metrics["validation_warning"] = warning
    rows = [(s, TEST_ROLE_NAMES[role], int(role == "ood_test"), f"{e:.6f}", extra["encoder_weights"])
            for role in TEST_ROLE_NAMES for s, e in zip(roles[role], scores[role])]
    atomic_write_csv(out_dir / "test_scores.csv", rows, ["smiles", "role", "is_ood", "energy", "encoder_weights"])
    title = extra.get("title", "")
    plot_roc(out_dir / "roc_curve.png", scores["id_test"], scores["ood_test"], metrics["auroc"], title)
    plot_energy_hist(out_dir / "energy_histogram.png", scores["id_test"], scores["ood_test"],
                     extra["threshold_95_id_val"], title)
    atomic_write_json(out_dir / "test_metrics.json", metrics)
    return metrics


def read_test_scores(out_dir):
    """(SMILES as written, is_ood, energy) of one scoring's test_scores.csv, in its order."""
    rows = read_csv_rows(Path(out_dir) / "test_scores.csv", "the run did not finish (rerun it)")
    return [r["smiles"] for r in rows], [int(r["is_ood"]) for r in rows], [float(r["energy"]) for r in rows]


def _fmt(value):
    return "   –  " if value is None else f"{value:.4f}"


def interval_text(metrics, key="auroc"):
    """'[0.851, 0.912]': a metric's 95% bootstrap interval as tables print it ('–' without one)."""
    bounds = metrics.get(f"{key}_ci95")
    return f"[{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else "–"


def results_table(rows, skipped=None):
    """Method | AUROC | its 95% interval | AUPR | FPR95 | AUROC size-matched | val AUROC, one line per
    {name: metrics}."""
    labels = {"auroc": "AUROC", "auroc_ci95": "AUROC 95% CI", **{k: v for k, v in METRIC_LABELS.items()
                                                                    if k != "auroc"}}
    cell = lambda metrics, key: interval_text(metrics) if key == "auroc_ci95" else _fmt(metrics.get(key))  # noqa: E731
    width = {key: max(14 if key == "auroc_ci95" else 8, len(label)) for key, label in labels.items()}
    lines = [f"{'method':<22}" + "".join(f" {label:>{width[key]}}" for key, label in labels.items())]
    for name, metrics in rows.items():
        lines.append(f"{name:<22}" + "".join(f" {cell(metrics, key):>{width[key]}}" for key in labels))
    lines += [f"{name:<22} skipped: {why}" for name, why in (skipped or {}).items()]
    return lines


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, crop=True):
    """Write a figure as PNG; `crop`: to its content (a layout pass of its own; a figure that called
    tight_layout() already fits and is saved without it)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight" if crop else None)
    finally:
        pyplot().close(fig)


def plot_roc(path, id_scores, ood_scores, auroc, title=""):
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))], np.r_[id_scores, ood_scores])
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"Energy-DPO (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.axhline(0.95, color="grey", lw=0.6, ls=":", label="95% of OOD caught")
    ax.set(xlabel="false positive rate (ID flagged OOD)", ylabel="true positive rate (OOD caught)",
           title=title or "Test ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    save_figure(fig, path)


def plot_energy_hist(path, id_scores, ood_scores, threshold, title=""):
    fig, ax = pyplot().subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.r_[id_scores, ood_scores, threshold], bins=50)
    # stepfilled: one outline per side rather than 50 bars, and the overlap stays readable
    ax.hist(id_scores, bins=bins, alpha=0.6, label=f"ID test (n={len(id_scores)})", density=True, histtype="stepfilled")
    ax.hist(ood_scores, bins=bins, alpha=0.6, label=f"OOD test (n={len(ood_scores)})", density=True,
            histtype="stepfilled")
    ax.axvline(threshold, color="k", ls="--", lw=1,
               label=f"predict threshold {threshold:.3f}\n(95% of validation ID below)")
    ax.set(xlabel="energy (higher = more OOD)", ylabel="density", title=title or "Test energies")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def plot_training_curves(path, history, best_epoch, title=""):
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, axes = pyplot().subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker=".", label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], marker=".", label="validation")
    axes[0].set(ylabel="loss")
    axes[1].plot(epochs, [h["val_auroc"] for h in history], marker=".", color="C2", label="validation AUROC")
    axes[1].set(ylabel="validation AUROC")
    axes[2].plot(epochs, [h["e_id"] for h in history], marker=".", label="mean E(ID train)")
    axes[2].plot(epochs, [h["e_ood"] for h in history], marker=".", label="mean E(OOD train)")
    axes[2].set(ylabel="mean energy")
    twin = axes[2].twinx()
    twin.plot(epochs, [h["misranked"] for h in history], ls="--", color="C3", label="mis-ranked pairs")
    twin.set(ylabel="fraction of mis-ranked pairs", ylim=(0, 1))
    for ax in axes:
        ax.set(xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(best_epoch, color="grey", ls=":", lw=1, label=f"best epoch ({best_epoch})")
    for ax, extra in ((axes[0], None), (axes[1], None), (axes[2], twin)):
        handles, labels = ax.get_legend_handles_labels()
        if extra is not None:
            more = extra.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        ax.legend(handles, labels, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, crop=False)

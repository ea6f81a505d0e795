"""OOD metrics (OOD = positive class, energy = score), result files, tables and plots.

Scores in, files out: nothing here knows models or checkpoints. matplotlib is imported only when a
picture is drawn, so training code that needs the metrics does not pay for it."""
import math
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve

from data import InputError, atomic_write_csv, atomic_write_json, atomic_write_text, normal_permissions, read_json

RANDOM_INIT_LABEL = "RANDOM-INIT ENCODER (not pretrained Uni-Mol)"
TABLE_METRICS = (("auroc", "AUROC"), ("aupr", "AUPR"), ("fpr95", "FPR95"), ("auroc_size_matched", "AUROC size-matched"),
                 ("val_auroc", "val AUROC"))


def weights_label(encoder_weights):
    """How results name their encoder: random-init ones unmistakably."""
    if encoder_weights.startswith("random-init"):
        return f"{RANDOM_INIT_LABEL}, {encoder_weights}"
    return f"pretrained Uni-Mol {encoder_weights}"


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


def id_threshold(val_id_scores, keep=0.95):
    """Energy below which `keep` of validation ID molecules fall: the `predict` OOD cut-off."""
    return float(np.quantile(np.asarray(val_id_scores, dtype=np.float64), keep))


VALIDATION_GAP = 0.10


def validation_warning(val_auroc, test_auroc, ood_val_split="random"):
    """Words for a validation AUROC that promises more than the test delivers, or None."""
    if val_auroc is None or val_auroc - test_auroc <= VALIDATION_GAP:
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
    metrics = ood_metrics(scores["id_test"], scores["ood_test"], *((sizes["id_test"], sizes["ood_test"])
                                                                  if sizes else ()))
    metrics.update(extra)
    warning = validation_warning(extra.get("val_auroc"), metrics["auroc"], extra.get("ood_val_split", "random"))
    if warning:
        metrics["validation_warning"] = warning
    rows = [(s, role[:-5], int(role == "ood_test"), f"{e:.6f}", extra["encoder_weights"])
            for role in ("id_test", "ood_test") for s, e in zip(roles[role], scores[role])]
    atomic_write_csv(out_dir / "test_scores.csv", rows, ["smiles", "role", "is_ood", "energy", "encoder_weights"])
    title = extra.get("title", "")
    plot_roc(out_dir / "roc_curve.png", scores["id_test"], scores["ood_test"], metrics["auroc"], title)
    plot_energy_hist(out_dir / "energy_histogram.png", scores["id_test"], scores["ood_test"],
                     extra["threshold_95_id_val"], title)
    atomic_write_json(out_dir / "test_metrics.json", metrics)
    return metrics


def _fmt(value):
    return "   –  " if value is None else f"{value:.4f}"


def results_table(rows, skipped=None):
    """Method | AUROC | AUPR | FPR95 | AUROC size-matched | val AUROC, one line per {name: metrics}."""
    lines = [f"{'method':<22}" + "".join(f" {label:>{max(8, len(label))}}" for _, label in TABLE_METRICS)]
    for name, metrics in rows.items():
        lines.append(f"{name:<22}" + "".join(f" {_fmt(metrics.get(key)):>{max(8, len(label))}}"
                                             for key, label in TABLE_METRICS))
    lines += [f"{name:<22} skipped: {why}" for name, why in (skipped or {}).items()]
    return lines


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        normal_permissions(tmp)
        tmp.replace(path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)


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
    ax.hist(id_scores, bins=bins, alpha=0.6, label=f"ID test (n={len(id_scores)})", density=True)
    ax.hist(ood_scores, bins=bins, alpha=0.6, label=f"OOD test (n={len(ood_scores)})", density=True)
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
    save_figure(fig, path)


REFERENCE_ARM = "frozen"  # every other arm of a sweep is compared with it, seed by seed
COMPARED = ("auroc", "aupr", "fpr95", "auroc_size_matched")  # test metrics, with a paired Improvement
COLUMNS = (*COMPARED, "val_auroc")
BETTER = {"auroc": "higher", "aupr": "higher", "fpr95": "lower", "auroc_size_matched": "higher"}
LABELS = {"auroc": "AUROC", "aupr": "AUPR", "fpr95": "FPR95", "auroc_size_matched": "AUROC size-matched",
          "val_auroc": "val AUROC"}


def _value(metrics, key):
    value = metrics.get(key)
    return np.nan if value is None else float(value)


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def sweep_arms(root):
    """The arm folders of a sweep (those holding seed* runs): frozen first, then by name."""
    arms = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(p.glob("seed*")))
    return sorted(arms, key=lambda arm: (arm != REFERENCE_ARM, arm))


def _epoch_seconds(run):
    """Mean seconds per epoch of a run (its history.csv); NaN when it has none."""
    import csv  # noqa: PLC0415
    try:
        with open(run / "history.csv", newline="") as f:
            seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return float("nan")
    return float(np.mean(seconds)) if seconds else float("nan")


def collect_arm_runs(root):
    """{arm: {seed: (test_metrics, config, seconds per epoch)}} from ROOT/<arm>/seed<N>/; every arm
    has the frozen arm's seeds."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such sweep folder (expected {root}/frozen/seed*/ and {root}/<arm>/seed*/)")
    runs = {}
    for arm in sweep_arms(root):
        runs[arm] = {}
        for run in sorted((root / arm).glob("seed*")):
            if not run.is_dir() or not run.name[4:].isdigit():
                raise InputError(f"{run}: not a seed folder (expected seed<N>); move it out of the sweep")
            what = "the run did not finish (rerun the sweep)"
            metrics, config = read_json(run / "test_metrics.json", what), read_json(run / "config.json", what)
            for path, doc, keys in ((run / "test_metrics.json", metrics, ("auroc", "aupr", "fpr95", "best_epoch",
                                                                          "val_auroc")),
                                    (run / "config.json", config, ("args", "encoder_weights"))):
                missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
                if missing:
                    raise InputError(f"{path}: incomplete (no {', '.join(missing)}); rerun that run with --overwrite")
            runs[arm][int(run.name[4:])] = (metrics, config, _epoch_seconds(run))
    seeds = {arm: sorted(r) for arm, r in runs.items()}
    if REFERENCE_ARM not in runs or len(runs) < 2 or any(s != seeds[REFERENCE_ARM] for s in seeds.values()):
        raise InputError(f"{root}: need frozen/seed* and at least one other arm's runs for the same seeds, "
                         f"found {seeds}")
    weights = {cfg["encoder_weights"] for arm in runs.values() for _, cfg, _ in arm.values()}
    if len(weights) != 1:
        raise InputError(f"{root}: runs used different encoder weights {sorted(weights)}; compare like with like")
    return runs


def sweep_baselines(root, runs, seeds):
    """{baseline: {seed: metrics}} from the frozen arm's baselines.json files (the feature baselines
    use frozen features in both arms, so one arm holds them all); {} when a run predates them."""
    out = {}
    for seed in seeds:
        path = root / "frozen" / f"seed{seed}" / "baselines.json"
        if not path.is_file():
            return {}
        doc = read_json(path, "rerun that run with --overwrite")
        if not isinstance(doc, dict) or not isinstance(doc.get("baselines"), dict):
            raise InputError(f"{path}: incomplete (no baselines); rerun that run with --overwrite")
        for name, metrics in doc["baselines"].items():
            out.setdefault(name, {})[seed] = metrics
    return {name: per_seed for name, per_seed in out.items() if len(per_seed) == len(seeds)}


def _arm_label(arm):
    return f"Energy-DPO ({arm})"


def write_comparison(root):
    """comparison_summary.txt / .json / .csv and comparison.png for a sweep of arms (frozen and
    fine-tuned variants) over seeds, with the baselines of the same roles beside them."""
    root = Path(root)
    runs = collect_arm_runs(root)
    arms = list(runs)
    seeds = sorted(runs[REFERENCE_ARM])
    ref_cfg = runs[REFERENCE_ARM][seeds[0]][1]
    weights, random_init = ref_cfg["encoder_weights"], ref_cfg["random_init_encoder"]
    methods = {_arm_label(arm): {s: runs[arm][s][0] for s in seeds} for arm in arms}
    baselines = sweep_baselines(root, runs, seeds)
    methods.update({f"baseline: {name}": per_seed for name, per_seed in baselines.items()})
    table = {name: {k: _mean_std([_value(per_seed[s], k) for s in seeds]) for k in COLUMNS}
             for name, per_seed in methods.items()}
    diffs = {arm: {k: [_value(runs[arm][s][0], k) - _value(runs[REFERENCE_ARM][s][0], k) for s in seeds]
                   for k in COMPARED} for arm in arms[1:]}
    improvement = {arm: {k: _mean_std(d) for k, d in per_key.items()} for arm, per_key in diffs.items()}
    arm_info = {arm: {"flags": _arm_flags(runs[arm][seeds[0]][1]["args"]),
                      "encoder_trainable_params": runs[arm][seeds[0]][1]["encoder_trainable_params"],
                      "seconds_per_epoch": _mean_std([runs[arm][s][2] for s in seeds])[0]} for arm in arms}
    per_seed = [{"seed": s, "method": name, **{k: _value(rows[s], k) for k in COLUMNS},
                 "best_epoch": rows[s].get("best_epoch", "")} for s in seeds for name, rows in methods.items()]
    args = ref_cfg["args"]
    summary = {
        "dataset": args["dataset"], "data_file": args["data_file"], "seeds": seeds,
        "encoder_weights": weights, "random_init_encoder": random_init,
        "ood_val_split": args.get("ood_val_split", "random"), "arms": arm_info,
        "sizes": {k: args[k] for k in ("train_size", "val_size", "test_size", "data_seed", "epochs")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "per_seed": per_seed,
        "table": table | {f"Improvement ({arm})": imp for arm, imp in improvement.items()},
        "paired_differences": diffs,
    }
    cell = lambda ms, sign="": "–" if np.isnan(ms[0]) else f"{ms[0]:{sign}.4f} ± {ms[1]:.4f}"  # noqa: E731
    weights_line = f"{RANDOM_INIT_LABEL}: {weights}" if random_init else f"pretrained Uni-Mol, {weights}"
    width, name_width = 18, max(29, *(len(f"Improvement ({arm})") + 1 for arm in arms))
    lines = [f"Energy-DPO on {args['dataset']}: " + " vs ".join(arms),
             f"encoder weights: {weights_line}",
             f"seeds: {' '.join(map(str, seeds))}   data seed: {args['data_seed']}   date: {summary['date']}",
             f"sizes per side: train {args['train_size']}, val {args['val_size']}, test {args['test_size']}; "
             f"max epochs {args['epochs']}; model selection on validation AUROC; OOD val split: "
             f"{summary['ood_val_split']}", ""]
    lines += [f"{'arm':<{name_width - 2}} {'trainable encoder params':>24} {'s/epoch':>8}  flags"]
    lines += [f"{arm:<{name_width - 2}} {info['encoder_trainable_params']:>24,} {info['seconds_per_epoch']:>8.1f}  "
              f"{info['flags'] or '(frozen encoder)'}" for arm, info in arm_info.items()]
    lines += ["", f"{'seed':>6}  {'arm':<{name_width - 8}} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'size-m.':>7} "
                  f"{'val':>7} {'best epoch':>10}"]
    lines += [f"{r['seed']:>6}  {r['method'][12:-1]:<{name_width - 8}} " + " ".join(
              f"{'–' if np.isnan(r[k]) else format(r[k], '.4f'):>7}" for k in COLUMNS) + f" {r['best_epoch']:>10}"
              for r in per_seed if r["method"].startswith("Energy-DPO (")]
    lines += ["", f"{'Method':<{name_width}}" + "".join(f" | {LABELS[k]:<{width}}" for k in COLUMNS)]
    for name in methods:
        lines.append(f"{name:<{name_width}}" + "".join(f" | {cell(table[name][k]):<{width}}" for k in COLUMNS))
    for arm, imp in improvement.items():
        lines.append(f"{f'Improvement ({arm})':<{name_width}}" + "".join(f" | {cell(imp[k], '+'):<{width}}"
                                                                         for k in COMPARED))
    lines.append(f"{'(better when)':<{name_width}}" + "".join(
        f" | {('> 0 (higher)' if BETTER[k] == 'higher' else '< 0 (lower)'):<{width}}" for k in COMPARED))
    lines += ["", "mean ± sample std over seeds; Improvement (arm) = arm − frozen, mean ± std of the paired "
              "per-seed differences: positive is better for AUROC, AUPR and size-matched AUROC, negative is "
              "better for FPR95. Size-matched AUROC: over ID-OOD pairs of equal heavy-atom count (0.5 for a score "
              "that only counts atoms). Baselines are on the same test molecules (frozen features)."]
    if not baselines:
        lines.append("no baselines.json in these runs (made before baselines were computed): no baseline rows")
    for arm in arms:
        warning = validation_warning(table[_arm_label(arm)]["val_auroc"][0], table[_arm_label(arm)]["auroc"][0],
                                     summary["ood_val_split"])
        if warning:
            lines.append(f"{_arm_label(arm)}: {warning}")
    if random_init:
        lines.append(f"{RANDOM_INIT_LABEL}: these numbers do not measure pretrained Uni-Mol.")
    atomic_write_text(root / "comparison_summary.txt", "\n".join(lines) + "\n")
    atomic_write_json(root / "comparison_summary.json", _json_safe(summary))
    atomic_write_csv(root / "comparison_summary.csv",
                     [(r["seed"], r["method"], *("" if np.isnan(r[k]) else f"{r[k]:.6f}" for k in COLUMNS),
                       r["best_epoch"], weights) for r in per_seed],
                     ["seed", "method", *COLUMNS, "best_epoch", "encoder_weights"])
    plot_comparison(root / "comparison.png", runs, seeds, table, f"{args['dataset']} · "
                    f"{RANDOM_INIT_LABEL if random_init else 'pretrained Uni-Mol'}")
    return summary, "\n".join(lines)


def _arm_flags(args):
    """The fine-tuning flags of an arm, as a user would type them."""
    if not args.get("finetune_encoder"):
        return ""
    flags = [f"--finetune_strategy {args.get('finetune_strategy', 'layers')}", f"--freeze_layers {args['freeze_layers']}",
             f"--encoder_lr {args['encoder_lr']:g}"]
    if args.get("warmup_epochs"):
        flags.append(f"--warmup_epochs {args['warmup_epochs']}")
    if args.get("lr_schedule", "constant") != "constant":
        flags.append(f"--lr_schedule {args['lr_schedule']}")
    return " ".join(flags)


def _json_safe(obj):
    """NaN (a metric that does not exist for a run) as null, which JSON can hold."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def plot_comparison(path, runs, seeds, table, title):
    arms = list(runs)
    cols = len(COMPARED) if len(arms) <= 2 else 2  # many arms: a 2 × 2 grid of wider panels
    rows = math.ceil(len(COMPARED) / cols)
    panel = max(4.0, 1.0 * len(arms) + 1.0)
    fig, axes = pyplot().subplots(rows, cols, figsize=(panel * cols, 3.8 * rows), squeeze=False)
    axes = axes.ravel()
    baselines = {name: ms for name, ms in table.items() if name.startswith("baseline: ")}
    x = np.arange(len(arms))
    for ax, key in zip(axes, COMPARED):
        for i, s in enumerate(seeds):
            ax.plot(x, [_value(runs[arm][s][0], key) for arm in arms], color="grey", lw=0.8, marker="o",
                    label="one seed (paired)" if i == 0 else None)
        ax.scatter(x, [table[_arm_label(arm)][key][0] for arm in arms], s=300, marker="_", linewidths=2.5,
                   color="C3", zorder=3, label=f"mean of {len(seeds)} seeds")
        ranked = sorted((ms[key][0], name) for name, ms in baselines.items() if not np.isnan(ms[key][0]))
        if ranked:
            value, name = ranked[0] if BETTER[key] == "lower" else ranked[-1]
            ax.axhline(value, color="C0", ls="--", lw=1, label=f"best baseline ({name[10:]})")
        ax.set_xticks(x, arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_xlim(-0.4, len(arms) - 0.6)
        ax.set(ylabel=f"test {LABELS[key]}", title=f"{LABELS[key]} ({BETTER[key]} is better)")
        ax.legend(fontsize="small")
    fig.suptitle(title, y=1.03)
    fig.tight_layout()
    save_figure(fig, path)

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


def ood_metrics(id_scores, ood_scores):
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
    }


def id_threshold(val_id_scores, keep=0.95):
    """Energy below which `keep` of validation ID molecules fall: the `predict` OOD cut-off."""
    return float(np.quantile(np.asarray(val_id_scores, dtype=np.float64), keep))


def write_test_results(out_dir, roles, scores, extra):
    """test_metrics.json, test_scores.csv and the ROC / energy-histogram plots of one scoring.

    roles / scores: {"id_test": [...], "ood_test": [...]} SMILES (as written) and their energies;
    extra: what else test_metrics.json records (encoder_weights and threshold_95_id_val included)."""
    out_dir = Path(out_dir)
    metrics = ood_metrics(scores["id_test"], scores["ood_test"])
    metrics.update(extra)
    rows = [(s, role[:-5], int(role == "ood_test"), f"{e:.6f}", extra["encoder_weights"])
            for role in ("id_test", "ood_test") for s, e in zip(roles[role], scores[role])]
    atomic_write_csv(out_dir / "test_scores.csv", rows, ["smiles", "role", "is_ood", "energy", "encoder_weights"])
    title = extra.get("title", "")
    plot_roc(out_dir / "roc_curve.png", scores["id_test"], scores["ood_test"], metrics["auroc"], title)
    plot_energy_hist(out_dir / "energy_histogram.png", scores["id_test"], scores["ood_test"],
                     extra["threshold_95_id_val"], title)
    atomic_write_json(out_dir / "test_metrics.json", metrics)
    return metrics


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        normal_permissions(tmp)
        tmp.replace(path)
    finally:
        _plt().close(fig)
        tmp.unlink(missing_ok=True)


def plot_roc(path, id_scores, ood_scores, auroc, title=""):
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))], np.r_[id_scores, ood_scores])
    fig, ax = _plt().subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"Energy-DPO (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
    ax.axhline(0.95, color="grey", lw=0.6, ls=":", label="95% of OOD caught")
    ax.set(xlabel="false positive rate (ID flagged OOD)", ylabel="true positive rate (OOD caught)",
           title=title or "Test ROC", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize="small")
    _save(fig, path)


def plot_energy_hist(path, id_scores, ood_scores, threshold, title=""):
    fig, ax = _plt().subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.r_[id_scores, ood_scores, threshold], bins=50)
    ax.hist(id_scores, bins=bins, alpha=0.6, label=f"ID test (n={len(id_scores)})", density=True)
    ax.hist(ood_scores, bins=bins, alpha=0.6, label=f"OOD test (n={len(ood_scores)})", density=True)
    ax.axvline(threshold, color="k", ls="--", lw=1,
               label=f"predict threshold {threshold:.3f}\n(95% of validation ID below)")
    ax.set(xlabel="energy (higher = more OOD)", ylabel="density", title=title or "Test energies")
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_training_curves(path, history, best_epoch, title=""):
    from matplotlib.ticker import MaxNLocator
    epochs = [h["epoch"] for h in history]
    fig, axes = _plt().subplots(1, 3, figsize=(13, 3.8))
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
    _save(fig, path)


ARMS = {"frozen": "Energy-DPO (frozen)", "finetuned": "Energy-DPO (finetuned)"}
COMPARED = ("auroc", "aupr", "fpr95")
BETTER = {"auroc": "higher", "aupr": "higher", "fpr95": "lower"}


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def collect_arm_runs(root):
    """{arm: {seed: (test_metrics, config)}} from ROOT/<arm>/seed<N>/; both arms, same seeds."""
    if not Path(root).is_dir():
        raise InputError(f"{root}: no such sweep folder (expected {root}/frozen/seed*/ and {root}/finetuned/seed*/)")
    runs = {}
    for arm in ARMS:
        runs[arm] = {}
        for run in sorted((root / arm).glob("seed*")):
            if not run.is_dir() or not run.name[4:].isdigit():
                raise InputError(f"{run}: not a seed folder (expected seed<N>); move it out of the sweep")
            what = "the run did not finish (rerun the sweep)"
            metrics, config = read_json(run / "test_metrics.json", what), read_json(run / "config.json", what)
            for path, doc, keys in ((run / "test_metrics.json", metrics, (*COMPARED, "best_epoch", "val_auroc")),
                                    (run / "config.json", config, ("args", "encoder_weights"))):
                missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
                if missing:
                    raise InputError(f"{path}: incomplete (no {', '.join(missing)}); rerun that run with --overwrite")
            runs[arm][int(run.name[4:])] = (metrics, config)
    seeds = {arm: sorted(r) for arm, r in runs.items()}
    if not seeds["frozen"] or seeds["frozen"] != seeds["finetuned"]:
        raise InputError(f"{root}: need frozen/seed* and finetuned/seed* runs for the same seeds, found {seeds}")
    weights = {cfg["encoder_weights"] for arm in runs.values() for _, cfg in arm.values()}
    if len(weights) != 1:
        raise InputError(f"{root}: runs used different encoder weights {sorted(weights)}; compare like with like")
    return runs


def write_comparison(root):
    """comparison_summary.txt / .json / .csv and comparison.png for a frozen-vs-fine-tuned sweep."""
    root = Path(root)
    runs = collect_arm_runs(root)
    seeds = sorted(runs["frozen"])
    any_cfg = runs["finetuned"][seeds[0]][1]
    weights, random_init = any_cfg["encoder_weights"], any_cfg["random_init_encoder"]
    per_seed = [{"seed": s, "arm": arm, **{k: runs[arm][s][0][k] for k in COMPARED},
                 "best_epoch": runs[arm][s][0]["best_epoch"], "val_auroc": runs[arm][s][0]["val_auroc"]}
                for s in seeds for arm in ARMS]
    table = {arm: {k: _mean_std([runs[arm][s][0][k] for s in seeds]) for k in COMPARED} for arm in ARMS}
    diffs = {k: [runs["finetuned"][s][0][k] - runs["frozen"][s][0][k] for s in seeds] for k in COMPARED}
    table["improvement"] = {k: _mean_std(d) for k, d in diffs.items()}
    args = any_cfg["args"]
    summary = {
        "dataset": args["dataset"], "data_file": args["data_file"], "seeds": seeds,
        "encoder_weights": weights, "random_init_encoder": random_init,
        "finetuned_arm": {"freeze_layers": args["freeze_layers"], "encoder_lr": args["encoder_lr"], "lr": args["lr"],
                          "encoder_trainable_params": any_cfg["encoder_trainable_params"],
                          "encoder_total_params": any_cfg["encoder_total_params"]},
        "sizes": {k: args[k] for k in ("train_size", "val_size", "test_size", "data_seed", "epochs")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "per_seed": per_seed,
        "table": {name: table[arm] for arm, name in ARMS.items()} | {"Improvement": table["improvement"]},
        "paired_differences": diffs,
    }
    fmt = lambda ms, sign="": f"{ms[0]:{sign}.4f} ± {ms[1]:.4f}"  # noqa: E731
    weights_line = f"{RANDOM_INIT_LABEL}: {weights}" if random_init else f"pretrained Uni-Mol, {weights}"
    lines = [f"Energy-DPO: frozen vs fine-tuned Uni-Mol on {args['dataset']}",
             f"encoder weights: {weights_line}",
             f"seeds: {' '.join(map(str, seeds))}   data seed: {args['data_seed']}   date: {summary['date']}",
             f"sizes per side: train {args['train_size']}, val {args['val_size']}, test {args['test_size']}; "
             f"max epochs {args['epochs']}; model selection on validation AUROC",
             f"fine-tuned arm: --freeze_layers {args['freeze_layers']} --encoder_lr {args['encoder_lr']} "
             f"--lr {args['lr']} ({any_cfg['encoder_trainable_params']:,} of {any_cfg['encoder_total_params']:,} "
             f"encoder parameters train)", "",
             f"{'seed':>6}  {'arm':<10} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'best epoch':>10}"]
    lines += [f"{r['seed']:>6}  {r['arm']:<10} {r['auroc']:7.4f} {r['aupr']:7.4f} {r['fpr95']:7.4f} "
              f"{r['best_epoch']:>10}" for r in per_seed]
    lines += ["", f"{'Method':<24} | {'AUROC':<17} | {'AUPR':<17} | FPR95"]
    for arm, name in ARMS.items():
        lines.append(f"{name:<24} | {fmt(table[arm]['auroc']):<17} | {fmt(table[arm]['aupr']):<17} | "
                     f"{fmt(table[arm]['fpr95'])}")
    imp = table["improvement"]
    lines.append(f"{'Improvement':<24} | {fmt(imp['auroc'], '+'):<17} | {fmt(imp['aupr'], '+'):<17} | "
                 f"{fmt(imp['fpr95'], '+')}")
    lines.append(f"{'(better when)':<24} | {'> 0 (higher)':<17} | {'> 0 (higher)':<17} | < 0 (lower)")
    lines += ["", "mean ± sample std over seeds; Improvement = finetuned − frozen, mean ± std of the paired "
              "per-seed differences: positive is better for AUROC and AUPR, negative is better for FPR95."]
    if random_init:
        lines.append(f"{RANDOM_INIT_LABEL}: these numbers do not measure pretrained Uni-Mol.")
    atomic_write_text(root / "comparison_summary.txt", "\n".join(lines) + "\n")
    atomic_write_json(root / "comparison_summary.json", summary)
    atomic_write_csv(root / "comparison_summary.csv",
                     [(r["seed"], r["arm"], *(f"{r[k]:.6f}" for k in COMPARED), r["best_epoch"], weights)
                      for r in per_seed],
                     ["seed", "arm", *COMPARED, "best_epoch", "encoder_weights"])
    plot_comparison(root / "comparison.png", runs, seeds, f"{args['dataset']} · "
                    f"{RANDOM_INIT_LABEL if random_init else 'pretrained Uni-Mol'}")
    return summary, "\n".join(lines)


def plot_comparison(path, runs, seeds, title):
    fig, axes = _plt().subplots(1, len(COMPARED), figsize=(4 * len(COMPARED), 3.8))
    for ax, key in zip(axes, COMPARED):
        for i, s in enumerate(seeds):
            ax.plot([0, 1], [runs[arm][s][0][key] for arm in ARMS], color="grey", lw=0.8, marker="o",
                    label="one seed (paired)" if i == 0 else None)
        means = [np.mean([runs[arm][s][0][key] for s in seeds]) for arm in ARMS]
        ax.scatter([0, 1], means, s=300, marker="_", linewidths=2.5, color="C3", zorder=3,
                   label=f"mean of {len(seeds)} seeds")
        ax.set_xticks([0, 1], ["frozen", "fine-tuned"])
        ax.set_xlim(-0.4, 1.4)
        ax.set(ylabel=f"test {key.upper()}", title=f"{key.upper()} ({BETTER[key]} is better)")
        ax.legend(fontsize="small")
    fig.suptitle(title, y=1.03)
    fig.tight_layout()
    _save(fig, path)

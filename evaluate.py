"""OOD metrics (OOD = positive class, energy = score), result files and plots."""
import csv
import io
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from data import InputError, atomic_write_json, atomic_write_text  # noqa: E402
from model import energies, load_best_model  # noqa: E402

RANDOM_INIT_LABEL = "RANDOM-INIT ENCODER (not pretrained Uni-Mol)"


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


def write_scores_csv(path, rows, columns):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_test_results(run_dir, id_smiles, id_scores, ood_smiles, ood_scores, extra):
    """test_metrics.json, test_scores.csv and the ROC / energy-histogram plots of one run."""
    metrics = ood_metrics(id_scores, ood_scores)
    metrics.update(extra)
    rows = [(s, "id", 0, f"{e:.6f}") for s, e in zip(id_smiles, id_scores)]
    rows += [(s, "ood", 1, f"{e:.6f}") for s, e in zip(ood_smiles, ood_scores)]
    write_scores_csv(run_dir / "test_scores.csv", rows, ["smiles", "role", "is_ood", "energy"])
    title = extra.get("title", "")
    plot_roc(run_dir / "roc_curve.png", id_scores, ood_scores, metrics["auroc"], title)
    plot_energy_hist(run_dir / "energy_histogram.png", id_scores, ood_scores, title)
    atomic_write_json(run_dir / "test_metrics.json", metrics)
    return metrics


def evaluate_run(checkpoint, net, inputs, roles, encoder, args, labels):
    """Score the test split with a run's best model and write the result files beside it.

    A fine-tuned run scores with its own fine-tuned encoder (restored from the checkpoint). The
    `predict` threshold comes from validation ID energies, never from the test split."""
    state = load_best_model(net, checkpoint, encoder.weights_id)
    net.to(args.device)
    score = lambda role: energies(net, inputs[role], args.eval_batch_size, args.device).numpy()  # noqa: E731
    extra = {"best_epoch": state["epoch"], "val_auroc": state["val_auroc"],
             "threshold_95_id_val": id_threshold(score("id_val")), "encoder_weights": encoder.weights_id,
             "random_init_encoder": encoder.is_random_init, **labels}
    return write_test_results(checkpoint.parent, roles["id_test"], score("id_test"), roles["ood_test"], score("ood_test"), extra)


def _save(fig, path):
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def plot_roc(path, id_scores, ood_scores, auroc, title=""):
    fpr, tpr, _ = roc_curve(np.r_[np.zeros(len(id_scores)), np.ones(len(ood_scores))], np.r_[id_scores, ood_scores])
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"Energy-DPO (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.axhline(0.95, color="grey", lw=0.6, ls=":")
    ax.set(xlabel="FPR (ID flagged OOD)", ylabel="TPR (OOD caught)", title=title or "Test ROC")
    ax.legend(loc="lower right")
    _save(fig, path)


def plot_energy_hist(path, id_scores, ood_scores, title=""):
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.r_[id_scores, ood_scores], bins=50)
    ax.hist(id_scores, bins=bins, alpha=0.6, label=f"ID test (n={len(id_scores)})", density=True)
    ax.hist(ood_scores, bins=bins, alpha=0.6, label=f"OOD test (n={len(ood_scores)})", density=True)
    ax.set(xlabel="energy (higher = more OOD)", ylabel="density", title=title or "Test energies")
    ax.legend()
    _save(fig, path)


def plot_training_curves(path, history, title=""):
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].plot(epochs, [h["val_loss"] for h in history], label="val")
    axes[0].set(xlabel="epoch", ylabel="loss")
    axes[0].legend()
    axes[1].plot(epochs, [h["val_auroc"] for h in history], color="C2")
    axes[1].set(xlabel="epoch", ylabel="validation AUROC")
    axes[2].plot(epochs, [h["e_id"] for h in history], label="mean E(ID)")
    axes[2].plot(epochs, [h["e_ood"] for h in history], label="mean E(OOD)")
    axes[2].plot(epochs, [h["misranked"] for h in history], label="mis-ranked pairs", ls="--")
    axes[2].set(xlabel="epoch")
    axes[2].legend()
    fig.suptitle(title)
    _save(fig, path)


ARMS = {"frozen": "Energy-DPO (frozen)", "finetuned": "Energy-DPO (finetuned)"}
COMPARED = ("auroc", "aupr", "fpr95")


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def collect_arm_runs(root):
    """{arm: {seed: (test_metrics, config)}} from ROOT/<arm>/seed<N>/; both arms, same seeds."""
    runs = {}
    for arm in ARMS:
        runs[arm] = {}
        for run in sorted((root / arm).glob("seed*")):
            metrics_path = run / "test_metrics.json"
            if not metrics_path.is_file():
                raise InputError(f"{run}: no test_metrics.json; the run did not finish (rerun the sweep)")
            runs[arm][int(run.name[4:])] = (json.loads(metrics_path.read_text()),
                                            json.loads((run / "config.json").read_text()))
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
    lines += ["", "mean ± sample std over seeds; Improvement = finetuned − frozen, mean ± std of the paired "
              "per-seed differences (lower is better for FPR95)."]
    if random_init:
        lines.append(f"{RANDOM_INIT_LABEL}: these numbers do not measure pretrained Uni-Mol.")
    atomic_write_text(root / "comparison_summary.txt", "\n".join(lines) + "\n")
    atomic_write_json(root / "comparison_summary.json", summary)
    write_scores_csv(root / "comparison_summary.csv",
                     [(r["seed"], r["arm"], *(f"{r[k]:.6f}" for k in COMPARED), r["best_epoch"]) for r in per_seed],
                     ["seed", "arm", *COMPARED, "best_epoch"])
    plot_comparison(root / "comparison.png", runs, seeds, f"{args['dataset']} · "
                    f"{RANDOM_INIT_LABEL if random_init else 'pretrained Uni-Mol'}")
    return summary, "\n".join(lines)


def plot_comparison(path, runs, seeds, title):
    fig, axes = plt.subplots(1, len(COMPARED), figsize=(4 * len(COMPARED), 3.8))
    for ax, key in zip(axes, COMPARED):
        for s in seeds:
            ax.plot([0, 1], [runs[arm][s][0][key] for arm in ARMS], color="grey", lw=0.8, marker="o")
        for x, arm in enumerate(ARMS):
            ax.scatter([x], [np.mean([runs[arm][s][0][key] for s in seeds])], s=120, marker="_", color="C3", zorder=3)
        ax.set_xticks([0, 1], ["frozen", "fine-tuned"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(f"{key.upper()} ({'lower' if key == 'fpr95' else 'higher'} is better)")
    fig.suptitle(title, y=1.03)
    _save(fig, path)

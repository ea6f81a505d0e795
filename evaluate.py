"""OOD metrics (OOD = positive class, energy = score), result files and plots."""
import csv
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve  # noqa: E402

from data import atomic_write_json, atomic_write_text  # noqa: E402
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


def evaluate_run(checkpoint, net, feats, roles, encoder, eval_batch_size, labels):
    """Score the test split with a run's best model and write the result files beside it.

    The `predict` threshold comes from validation ID energies, never from the test split."""
    state = load_best_model(net, checkpoint, encoder.weights_id)
    score = lambda role: energies(net, feats[role], eval_batch_size).cpu().numpy()  # noqa: E731
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

"""What fine-tuning changes: per-molecule rank shifts, feature drift (linear CKA, PCA) and weight
change per layer. Arrays in, tables and pictures out; pipeline.py gathers the runs and the features."""
import numpy as np
from rdkit import Chem
from rdkit.Chem import Draw
from sklearn.decomposition import PCA

from evaluate import pyplot, save_figure
from utils import atomic_write_csv, atomic_write_json


def energy_ranks(energies):
    """Each molecule's energy as a rank fraction among the scored molecules: 0 = least OOD, 1 = most."""
    order = np.argsort(np.argsort(np.asarray(energies, dtype=np.float64), kind="stable"), kind="stable")
    return order / max(1, len(order) - 1)


def rank_changes(is_ood, frozen_ranks, arm_ranks):
    """Per arm, rank change and improvement (the change toward the molecule's correct side: up for OOD,
    down for ID). Ranks are means over seeds."""
    sign = np.where(np.asarray(is_ood) == 1, 1.0, -1.0)
    return {arm: {"change": ranks - frozen_ranks, "improvement": sign * (ranks - frozen_ranks)}
            for arm, ranks in arm_ranks.items()}


def write_molecule_changes(path, smiles, is_ood, frozen_ranks, arm_ranks, changes, encoder_weights):
    columns = ["smiles", "is_ood", "rank_frozen"]
    for arm in arm_ranks:
        columns += [f"rank_{arm}", f"change_{arm}", f"improvement_{arm}"]
    rows = []
    for i, s in enumerate(smiles):
        row = [s, int(is_ood[i]), f"{frozen_ranks[i]:.4f}"]
        for arm in arm_ranks:
            row += [f"{arm_ranks[arm][i]:.4f}", f"{changes[arm]['change'][i]:+.4f}",
                    f"{changes[arm]['improvement'][i]:+.4f}"]
        rows.append(row + [encoder_weights])
    atomic_write_csv(path, rows, columns + ["encoder_weights"])


def molecule_grid(path, smiles, is_ood, improvement, title, worst=False, n=12):
    """RDKit grid of the n molecules whose rank moved most toward (or, worst, away from) their
    correct side, labelled with the side and the move."""
    improvement = np.asarray(improvement)
    picks = np.argsort(improvement if worst else -improvement, kind="stable")[:n]
    mols = [Chem.MolFromSmiles(smiles[i]) for i in picks]
    legends = [f"{'OOD' if is_ood[i] else 'ID'}: rank {improvement[i]:+.2f} toward correct side" for i in picks]
    image = Draw.MolsToGridImage(mols, molsPerRow=4, subImgSize=(300, 260), legends=legends)
    fig, ax = pyplot().subplots(figsize=(12, 2.6 * int(np.ceil(len(mols) / 4)) + 0.6))
    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title)
    save_figure(fig, path)


def linear_cka(x, y):
    """Linear centred kernel alignment of two feature matrices over the same molecules (1 = same
    geometry up to rotation and scale; Kornblith et al. 2019)."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def relative_weight_change(base, trained, layer_of, lora_scale=None):
    """{layer: ‖ΔW‖/‖W‖} over the trained tensors of each layer (`layer_of`: the encoder's parameter name →
    layer). `trained` maps parameter names to tensors (arrays); for LoRA the adapters' ΔW = scale · B A is
    taken against the adapted weight."""
    delta, norm = {}, {}
    for name, value in trained.items():
        if ".lora_A." in name:
            weight_name = name.split(".lora_A.")[0] + ".weight"
            b = trained[name.replace(".lora_A.", ".lora_B.")]
            change, reference = lora_scale * (np.asarray(b) @ np.asarray(value)), base[weight_name]
        elif ".lora_B." in name:
            continue
        else:
            change, reference = np.asarray(value) - base[name], base[name]
        layer = layer_of(name)
        delta[layer] = delta.get(layer, 0.0) + float(np.sum(np.square(change)))
        norm[layer] = norm.get(layer, 0.0) + float(np.sum(np.square(reference)))
    return {layer: float(np.sqrt(delta[layer] / norm[layer])) if norm[layer] else float("nan") for layer in delta}


def plot_feature_drift(path, frozen, tuned, is_ood, cka, weight_change, title):
    """PCA of the test features (fitted on the frozen ones), frozen beside each fine-tuned arm, and
    the relative weight change of each trained layer."""
    pca = PCA(n_components=2).fit(frozen)
    panels = {"frozen": frozen, **tuned}
    fig, axes = pyplot().subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4), squeeze=False)
    is_ood = np.asarray(is_ood) == 1
    for ax, (name, feats) in zip(axes[0], panels.items()):
        xy = pca.transform(feats)
        ax.scatter(*xy[~is_ood].T, s=8, alpha=0.6, label="ID test")
        ax.scatter(*xy[is_ood].T, s=8, alpha=0.6, label="OOD test")
        label = name if name == "frozen" else f"{name} (CKA {cka[name]:.3f} to frozen)"
        ax.set(title=label, xlabel="PC 1 (of frozen features)", ylabel="PC 2 (of frozen features)")
        ax.legend(fontsize="small")
    ax = axes[0][-1]
    layers = sorted({layer for per_arm in weight_change.values() for layer in per_arm})
    width = 0.8 / max(1, len(weight_change))
    for k, (arm, per_layer) in enumerate(weight_change.items()):
        ax.bar(np.arange(len(layers)) + k * width, [per_layer.get(layer, np.nan) for layer in layers], width, label=arm)
    ax.set_xticks(np.arange(len(layers)) + 0.4 - width / 2, layers, rotation=20)
    ax.set(ylabel="‖ΔW‖ / ‖W‖ (mean over seeds)", title="weight change of the trained layers")
    ax.legend(fontsize="small")
    fig.suptitle(title, y=1.02)
    fig.tight_layout()
    save_figure(fig, path)


def write_drift(out_dir, cka, weight_change, frozen, tuned, is_ood, title):
    atomic_write_json(out_dir / "feature_drift.json", {
        "linear_cka_to_frozen": cka, "relative_weight_change": weight_change,
        "note": "CKA over the test molecules' CLS features, per arm and seed (1 = unchanged geometry); "
                "weight change ‖ΔW‖/‖W‖ per trained layer"})
    mean_change = {arm: {layer: float(np.mean([seed_changes[layer] for seed_changes in per_seed.values()]))
                         for layer in next(iter(per_seed.values()))} for arm, per_seed in weight_change.items()}
    plot_feature_drift(out_dir / "feature_drift.png", frozen, tuned, is_ood,
                       {arm: float(np.mean(list(per_seed.values()))) for arm, per_seed in cka.items()}, mean_change,
                       title)

"""Baseline OOD scores, computed on exactly a run's roles so that Energy-DPO's numbers have something
to be compared with. Every score follows the tool's convention: higher = more OOD.

  heavy_atoms, ring_count, mol_weight   no training; the sign is fixed on validation (ID val vs OOD val)
  tanimoto_nn      1 - max Tanimoto similarity to ID train (Morgan radius 2, 2048 bits): the
                   applicability-domain score chemists use
  knn_k1, knn_k10  distance to the k-th nearest ID-train feature, features L2-normalised (Sun et al. 2022)
  mahalanobis      distance to the ID-train feature distribution, Ledoit-Wolf shrinkage covariance
  logreg_oe        logistic regression, ID train vs auxiliary-OOD train: Energy-DPO's supervision
                   without its pairwise loss
  msp, energy_logit  an MLP classifier of ID-train cls_label (the reference's classifier baselines),
                   scored by -max softmax probability and by -logsumexp of its logits

scikit-learn provides the neighbours, the covariance and the logistic regression, RDKit the
fingerprints and descriptors. pytorch-ood's detectors expect a torch classifier and a data loader;
the classifier here is a 20-line torch MLP on fixed features, so its two scores are computed
directly rather than through that package (one more dependency for two lines of arithmetic).
"""
import functools

import numpy as np
import torch
from rdkit import Chem, DataStructs
from rdkit.Chem import Descriptors, rdFingerprintGenerator, rdMolDescriptors
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from evaluate import metrics_with_intervals

DESCRIPTORS = {
    "heavy_atoms": lambda mol: mol.GetNumHeavyAtoms(),
    "ring_count": rdMolDescriptors.CalcNumRings,
    "mol_weight": Descriptors.MolWt,
}
FEATURE_BASELINES = ("knn_k1", "knn_k10", "mahalanobis", "logreg_oe", "msp", "energy_logit")
BASELINES = (*DESCRIPTORS, "tanimoto_nn", *FEATURE_BASELINES)
SCORED_ROLES = ("id_val", "ood_val", "id_test", "ood_test")


@functools.lru_cache(maxsize=1 << 16)
def _mol(smiles):
    return Chem.MolFromSmiles(smiles)  # parsed once for all descriptors and fingerprints


def descriptor(smiles, name):
    return np.array([float(DESCRIPTORS[name](_mol(s))) for s in smiles])


def fingerprints(smiles):
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return [generator.GetFingerprint(_mol(s)) for s in smiles]


def tanimoto_nn(train_fps, query_fps):
    """1 - the largest Tanimoto similarity of each query to the training set."""
    return np.array([1.0 - max(DataStructs.BulkTanimotoSimilarity(fp, train_fps)) for fp in query_fps])


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_distance(train, query, k):
    """Euclidean distance of each L2-normalised query to its k-th nearest L2-normalised training row."""
    k = min(k, len(train))
    distances, _ = NearestNeighbors(n_neighbors=k).fit(_unit(train)).kneighbors(_unit(query))
    return distances[:, k - 1]


def mahalanobis(train, query):
    """Mahalanobis distance to the training mean under a Ledoit-Wolf shrinkage covariance."""
    fit = LedoitWolf().fit(np.asarray(train, dtype=np.float64))
    return np.sqrt(fit.mahalanobis(np.asarray(query, dtype=np.float64)))


def logreg_oe(id_train, ood_train, query, seed):
    """P(OOD) of a logistic regression of ID train (0) vs auxiliary OOD train (1)."""
    x = np.r_[id_train, ood_train]
    y = np.r_[np.zeros(len(id_train)), np.ones(len(ood_train))]
    model = LogisticRegression(max_iter=2000, random_state=seed).fit(x, y)
    return model.decision_function(np.asarray(query))


def classifier_scores(train, labels, query, seed, epochs=100):
    """(-MSP, -logsumexp) of a 512 → 256 → classes MLP trained on ID-train labels (full batch, Adam)."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    x = torch.as_tensor(np.asarray(train), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, len(classes)))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-5)
        for _ in range(epochs):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    with torch.no_grad():
        logits = net(torch.as_tensor(np.asarray(query), dtype=torch.float32)).double()
    return -torch.softmax(logits, 1).max(1).values.numpy(), -torch.logsumexp(logits, 1).numpy()


def baseline_scores(roles, features, cls_labels, seed):
    """{baseline: {role: scores}} over id_val, ood_val, id_test, ood_test, and {baseline: why skipped}.

    roles: {role: SMILES}; features: {role: (n, d) frozen features}; cls_labels: the ID-train
    molecules' cls_label (None where the file has none)."""
    query = [s for r in SCORED_ROLES for s in roles[r]]
    splits = np.cumsum([len(roles[r]) for r in SCORED_ROLES])[:-1]
    per_role = lambda values: dict(zip(SCORED_ROLES, np.split(np.asarray(values, dtype=np.float64), splits)))  # noqa
    q_feats = np.concatenate([features[r] for r in SCORED_ROLES])
    train = features["id_train"]
    out, skipped = {}, {}
    for name in DESCRIPTORS:
        values = per_role(descriptor(query, name))
        sign = 1.0 if roc_auc_score(*_val_labels_scores(values)) >= 0.5 else -1.0  # fixed on validation
        out[name] = {r: sign * v for r, v in values.items()}
    out["tanimoto_nn"] = per_role(tanimoto_nn(fingerprints(roles["id_train"]), fingerprints(query)))
    out["knn_k1"] = per_role(knn_distance(train, q_feats, 1))
    out["knn_k10"] = per_role(knn_distance(train, q_feats, 10))
    out["mahalanobis"] = per_role(mahalanobis(train, q_feats))
    out["logreg_oe"] = per_role(logreg_oe(train, features["ood_train"], q_feats, seed))
    labels = [v for v in cls_labels if v is not None]
    if len(labels) != len(cls_labels) or len(set(labels)) < 2:
        why = "ID train has no cls_label for every molecule" if len(labels) != len(cls_labels) else \
            "ID train holds one cls_label class only"
        skipped.update(msp=why, energy_logit=why)
    else:
        msp, energy = classifier_scores(train, labels, q_feats, seed)
        out["msp"], out["energy_logit"] = per_role(msp), per_role(energy)
    return out, skipped


def _val_labels_scores(values):
    return (np.r_[np.zeros(len(values["id_val"])), np.ones(len(values["ood_val"]))],
            np.r_[values["id_val"], values["ood_val"]])


def baseline_metrics(scores, id_sizes, ood_sizes):
    """{baseline: test metrics (with the size-matched AUROC) + val_auroc} from baseline_scores;
    id_sizes / ood_sizes: heavy-atom counts of the ID / OOD test molecules."""
    out = {}
    for name, values in scores.items():
        metrics = metrics_with_intervals(values["id_test"], values["ood_test"], id_sizes, ood_sizes)
        metrics["val_auroc"] = float(roc_auc_score(*_val_labels_scores(values)))
        out[name] = metrics
    return out

"""Baselines, the size-matched AUROC and honest validation, on hand-computed cases and real files."""
import json
import math

import numpy as np
import pytest
from rdkit import Chem

import baselines
import data
import utils
from conftest import write_drugood
from evaluate import auroc_size_matched, ood_metrics, validation_warning
from train import learning_warning, stopping_line, stopping_report


def test_descriptors_by_hand():
    assert list(baselines.descriptor(["CCO", "c1ccccc1", "C1CC1C1CC1"], "heavy_atoms")) == [3, 6, 6]
    assert list(baselines.descriptor(["CCO", "c1ccccc1", "C1CC1C1CC1"], "ring_count")) == [0, 1, 2]
    assert baselines.descriptor(["O"], "mol_weight")[0] == pytest.approx(18.015, abs=1e-3)


def test_tanimoto_nn_by_hand():
    train = baselines.fingerprints(["CCO", "c1ccccc1"])
    scores = baselines.tanimoto_nn(train, baselines.fingerprints(["OCC", "CCCCCCCC"]))
    assert scores[0] == 0.0  # the same molecule written otherwise
    fp_ethanol, fp_octane = baselines.fingerprints(["CCO", "CCCCCCCC"])
    on = lambda fp: set(fp.GetOnBits())  # noqa: E731
    jaccard = len(on(fp_ethanol) & on(fp_octane)) / len(on(fp_ethanol) | on(fp_octane))
    assert scores[1] == pytest.approx(1 - max(jaccard, 0.0))  # nothing shared with benzene


def test_knn_distance_by_hand():
    train = np.array([[2.0, 0.0], [0.0, 5.0], [0.0, -1.0]])  # unit vectors (1,0), (0,1), (0,-1) after normalising
    query = np.array([[3.0, 0.0], [1.0, 1.0]])
    assert baselines.knn_distance(train, query, 1) == pytest.approx([0.0, math.sqrt(2 - math.sqrt(2))])
    # the 2nd neighbour of (1,0) is at distance sqrt(2); of (0.707, 0.707) also sqrt(2 - sqrt(2))
    assert baselines.knn_distance(train, query, 2) == pytest.approx([math.sqrt(2), math.sqrt(2 - math.sqrt(2))])
    assert baselines.knn_distance(train, query, 10)[0] == pytest.approx(math.sqrt(2))  # k capped at the train size


def test_mahalanobis_by_hand():
    # 1-D: mean 0, variance 1; Ledoit-Wolf shrinks towards the same value, so the distance is |x|
    train = np.array([[-1.0], [1.0], [-1.0], [1.0]])
    assert baselines.mahalanobis(train, np.array([[2.0], [0.0], [-3.0]])) == pytest.approx([2.0, 0.0, 3.0])


def test_logreg_oe_ranks_the_ood_side_higher():
    id_train, ood_train = np.array([[0.0], [1.0], [0.5]]), np.array([[3.0], [4.0], [3.5]])
    scores = baselines.logreg_oe(id_train, ood_train, np.array([[0.0], [2.0], [4.0]]), seed=0)
    assert scores[0] < scores[1] < scores[2] and scores[0] < 0 < scores[2]


def test_classifier_scores_are_msp_and_logsumexp():
    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(-2, 0.3, (20, 4)), rng.normal(2, 0.3, (20, 4))]
    labels = [0] * 20 + [1] * 20
    query = np.array([[-2.0] * 4, [0.0] * 4, [2.0] * 4])
    msp, energy = baselines.classifier_scores(x, labels, query, seed=0)
    assert msp[0] < msp[1] and msp[2] < msp[1]  # confident at the clusters, unsure between them
    assert np.all((-1 <= msp) & (msp <= -0.5))  # -max softmax of 2 classes
    again_msp, again_energy = baselines.classifier_scores(x, labels, query, seed=0)
    assert np.array_equal(msp, again_msp) and np.array_equal(energy, again_energy)  # seeded


def test_size_matched_auroc_by_hand():
    # sizes: ID 10, 10, 12; OOD 10, 12, 14. Equal-size pairs: (10,10)×2 and (12,12)×1 of 9 pairs
    id_scores, ood_scores = [0.1, 0.5, 0.2], [0.3, 0.1, 9.0]
    auroc, fraction = auroc_size_matched(id_scores, ood_scores, [10, 10, 12], [10, 12, 14])
    # size 10: OOD 0.3 vs ID 0.1 (right), vs ID 0.5 (wrong); size 12: OOD 0.1 vs ID 0.2 (wrong)
    assert auroc == pytest.approx(1 / 3) and fraction == pytest.approx(3 / 9)
    assert auroc_size_matched([1.0], [2.0], [5], [6]) == (None, 0.0)


def test_a_score_that_counts_atoms_gets_half_once_size_is_matched():
    doc = json.loads((data.Path(__file__).parent.parent / "data" / "demo" / "demo_ec50_scaffold.json").read_text())
    id_sizes = np.array([Chem.MolFromSmiles(it["smiles"]).GetNumHeavyAtoms() for it in doc["split"]["iid_test"][:300]])
    ood_sizes = np.array([Chem.MolFromSmiles(it["smiles"]).GetNumHeavyAtoms() for it in doc["split"]["ood_test"][:300]])
    metrics = ood_metrics(id_sizes, ood_sizes, id_sizes, ood_sizes)
    assert abs(metrics["auroc"] - 0.5) > 0.3  # on the scaffold split size alone looks like a detector...
    assert metrics["auroc_size_matched"] == 0.5 and 0 < metrics["size_matched_pair_fraction"] < 1  # ...it is not


def test_domain_split_never_shares_a_domain(tmp_path):
    demo = data.Path(__file__).parent.parent / "data" / "demo" / "demo_ec50_assay.json"
    report = {}
    roles = data.build_roles(demo, (200, 100, 50), 42, report, ood_val_split="domain")
    domains = report["ood_val_domains"]
    assert domains["ood_train"] and domains["ood_val"] and not set(domains["ood_train"]) & set(domains["ood_val"])
    doc = json.loads(demo.read_text())
    domain_of = {it["smiles"].strip(): it["domain_id"] for it in doc["split"]["ood_val"]}
    assert not {domain_of[m] for m in roles["ood_train"]} & {domain_of[m] for m in roles["ood_val"]}
    assert len(roles["ood_train"]) == 200 and len(roles["ood_val"]) == 100
    random_roles = data.build_roles(demo, (200, 100, 50), 42, {}, ood_val_split="random")
    assert {domain_of[m] for m in random_roles["ood_train"]} & {domain_of[m] for m in random_roles["ood_val"]}
    one_domain = write_drugood(tmp_path / "one.json", {"train": ["CCO", "CCN"], "iid_val": ["CCC"], "iid_test": ["CCF"],
                                                       "ood_val": ["c1ccccc1", "c1ccncc1"], "ood_test": ["C1CCCCC1"]})
    with pytest.raises(utils.InputError, match="one.json: ood_val holds 1 domain; --ood_val_split domain needs at "
                                              "least two"):
        data.build_roles(one_domain, (2, 2, 2), 42, {}, ood_val_split="domain")


def test_validation_warning_in_words():
    assert validation_warning(0.97, 0.58).startswith("validation optimistic: val AUROC 0.970 vs test 0.580; "
                                                     "OOD val shares domains with OOD training")
    assert validation_warning(0.80, 0.75) is None and validation_warning(None, 0.5) is None


def test_learning_warning_names_the_steps():
    flat = [{"train_loss": 0.6931, "misranked": 0.49, "steps": 1}, {"train_loss": 0.6929, "misranked": 0.47, "steps": 2}]
    text = learning_warning(flat, 4096)
    assert "after 2 optimizer steps (1 per epoch at --batch_size 4096 per side)" in text
    learned = [{"train_loss": 0.69, "misranked": 0.45, "steps": 10}, {"train_loss": 0.40, "misranked": 0.10, "steps": 20}]
    assert learning_warning(learned, 64) is None


def test_a_run_says_how_it_stopped():
    """stopping_report: what ended a run (patience, or its epoch budget), its steps, and a convergence warning
    when the budget ended it with its best epoch in the budget's last fifth (still improving)."""
    history = [{"epoch": e, "steps": 7 * e} for e in range(1, 61)]
    patience = stopping_report(history, 40, 200, 20)
    assert patience == {"optimizer_steps": 420, "epochs_run": 60, "epoch_budget": 200, "best_epoch": 40,
                        "stopped_by": "patience"}
    late = stopping_report(history, 55, 60, 20)
    assert late["stopped_by"] == "epoch budget" and "best validation AUROC came at epoch 55 of a 60-epoch" in \
        late["convergence_warning"]
    assert "convergence_warning" not in stopping_report(history, 47, 60, 20)  # budget, best before its last fifth
    assert stopping_report(history, 60, 60, 0)["stopped_by"] == "epoch budget"  # patience off: only the budget
    assert "early stopping off" in stopping_report(history, 60, 60, 0)["convergence_warning"]
    assert stopping_line(patience) == ("early stop: no validation gain for 20 epochs after epoch 60 (420 optimizer "
                                       "steps); best epoch 40")

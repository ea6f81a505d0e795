import numpy as np
import pytest

from evaluate import fpr_at_95_tpr, id_threshold, ood_metrics


def test_metrics_on_a_hand_computed_case():
    id_s, ood_s = [0.1, 0.2, 0.3, 0.4], [0.35, 0.5, 0.6, 0.7]
    m = ood_metrics(id_s, ood_s)
    assert m["auroc"] == pytest.approx(15 / 16)  # only (0.4 ID, 0.35 OOD) is mis-ranked
    # 95% of 4 OOD → all 4 caught at threshold 0.35; ID at or above it: 0.4 → 1 of 4
    assert m["fpr95"] == pytest.approx(0.25)
    assert (m["n_id"], m["n_ood"]) == (4, 4)
    assert m["energy_id_mean"] == pytest.approx(0.25) and m["energy_ood_mean"] == pytest.approx(0.5375)


def test_aupr_out_and_in_trapezoid():
    # ID score 0; OOD scores 1 and -1. PR points (recall, precision): (0,1) (0.5,1) (0.5,0.5) (1,2/3)
    m = ood_metrics([0.0], [1.0, -1.0])
    assert m["aupr"] == pytest.approx(0.5 + 0.25 * (0.5 + 2 / 3))
    # ID positive, scores negated (OOD 1, ID 0, OOD -1 from the top):
    # points (0,1) (0,0) (1,0.5) (1,1/3) → trapezoid area 0.5·(0 + 0.5) = 0.25
    assert m["aupr_in"] == pytest.approx(0.25)
    assert m["auroc"] == pytest.approx(0.5)


def test_perfect_and_inverted_separation():
    perfect = ood_metrics([0, 1, 2], [3, 4, 5])
    assert perfect["auroc"] == 1 and perfect["aupr"] == pytest.approx(1) and perfect["fpr95"] == 0
    inverted = ood_metrics([3, 4, 5], [0, 1, 2])
    assert inverted["auroc"] == 0 and inverted["fpr95"] == 1


def test_fpr95_uses_the_95_percent_ood_threshold():
    ood = np.arange(100, dtype=float)  # 95% caught at threshold 5
    assert fpr_at_95_tpr([4.9, 5.0, 6.0, 200.0], ood) == pytest.approx(0.75)


def test_threshold_keeps_95_percent_of_validation_id():
    val = np.arange(1, 101, dtype=float)
    t = id_threshold(val)
    assert np.mean(val <= t) == pytest.approx(0.95)

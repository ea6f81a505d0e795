"""run_finetune_comparison.sh: the frozen-vs-fine-tuned sweep over seeds and datasets."""
import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT

SCRIPT = ROOT / "run_finetune_comparison.sh"
SWEEP_VARS = ("SEEDS", "DATASETS", "DATA_FILE", "EPOCHS", "TRAIN_SIZE", "VAL_SIZE", "TEST_SIZE", "DATA_SEED",
              "OOD_VAL_SPLIT", "UNIMOL_WEIGHTS", "UNIMOL_WEIGHT_DIR", "OUTPUT_ROOT", "DEVICE", "FREEZE_LAYERS", "ENCODER_LR",
              "EXTRA_ARGS", "PYTHON")
TINY = dict(SEEDS="1", EPOCHS="1", TRAIN_SIZE="8", VAL_SIZE="6", TEST_SIZE="6", DEVICE="cpu")


def sweep_env(**values):
    """The caller's environment without any sweep setting of its own, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in SWEEP_VARS}
    return dict(env, PYTHON=sys.executable, **values)


def run_sweep(env, *args, cwd=None, timeout=900):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_sweep_script_writes_a_well_formed_summary(tmp_path, small_benchmark, random_ckpt, cache_dir):
    env = sweep_env(SEEDS="1 2", DATASETS="tiny", DATA_FILE=str(small_benchmark), EPOCHS="2",
                    TRAIN_SIZE="8", VAL_SIZE="6", TEST_SIZE="6", UNIMOL_WEIGHTS=str(random_ckpt),
                    OUTPUT_ROOT=str(tmp_path / "sweep"), DEVICE="cpu",
                    EXTRA_ARGS=f"--cache_dir {cache_dir} --num_workers 1")
    proc = run_sweep(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep" / "tiny"
    text = (root / "comparison_summary.txt").read_text()
    assert "Energy-DPO (frozen)" in text and "Energy-DPO (finetuned)" in text and "Improvement" in text
    assert "encoder weights: pretrained Uni-Mol, sha256:" in text
    assert text.count("| AUROC size-matched") == 1 and "| val AUROC" in text
    summary = json.loads((root / "comparison_summary.json").read_text())
    assert summary["seeds"] == [1, 2]
    arm_rows = {(r["method"], r["seed"]): r for r in summary["per_seed"]}
    for arm in ("frozen", "finetuned"):
        for seed in (1, 2):
            metrics = json.loads((root / arm / f"seed{seed}" / "test_metrics.json").read_text())
            row = arm_rows[(f"Energy-DPO ({arm})", seed)]
            assert (row["auroc"], row["val_auroc"]) == (metrics["auroc"], metrics["val_auroc"])
            assert row["auroc_size_matched"] == metrics["auroc_size_matched"]
    diffs = [arm_rows[("Energy-DPO (finetuned)", s)]["auroc"] - arm_rows[("Energy-DPO (frozen)", s)]["auroc"]
             for s in (1, 2)]
    assert summary["table"]["Improvement (finetuned)"]["auroc"][0] == pytest.approx(np.mean(diffs))
    assert summary["arms"]["finetuned"]["encoder_trainable_params"] == 6_305_792
    assert summary["arms"]["frozen"]["encoder_trainable_params"] == 0
    # baseline rows: mean over seeds of the frozen arm's baselines.json
    baselines = [json.loads((root / "frozen" / f"seed{s}" / "baselines.json").read_text())["baselines"] for s in (1, 2)]
    for name in ("heavy_atoms", "logreg_oe", "knn_k1"):
        assert summary["table"][f"baseline: {name}"]["auroc"][0] == \
            pytest.approx(np.mean([b[name]["auroc"] for b in baselines]))
        assert f"baseline: {name}" in text
    assert (root / "comparison.png").stat().st_size > 0
    better = next(line for line in text.splitlines() if line.startswith("(better when)"))
    assert [cell.strip() for cell in better.split("|")[1:]] == ["> 0 (higher)", "> 0 (higher)", "< 0 (lower)",
                                                                "> 0 (higher)"]
    with open(root / "comparison_summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (len(summary["table"]) - 1)  # seeds × (arms + baselines), no Improvement row
    assert {r["encoder_weights"] for r in rows} == {summary["encoder_weights"]}
    # a rerun skips finished runs
    again = run_sweep(env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished, skipping") == 4


def test_sweep_stops_on_missing_data(tmp_path):
    env = sweep_env(DATASETS="nope", OUTPUT_ROOT=str(tmp_path))
    proc = run_sweep(env, timeout=60)
    assert proc.returncode == 1 and "data/raw/nope.json not found" in proc.stderr


@pytest.fixture(scope="module")
def caller_sweep(tmp_path_factory, small_benchmark, random_ckpt):
    """One tiny sweep run from a scratch working directory with relative DATA_FILE and OUTPUT_ROOT, no
    DATASETS, no UNIMOL_WEIGHTS but UNIMOL_WEIGHT_DIR, and a cache folder with spaces given in EXTRA_ARGS."""
    cwd = tmp_path_factory.mktemp("caller")
    weight_dir = cwd / "unimol weights"
    weight_dir.mkdir()
    (weight_dir / "mol_pre_no_h_220816.pt").symlink_to(random_ckpt)
    (cwd / "inputs").mkdir()
    shutil.copy(small_benchmark, cwd / "inputs" / "foo.json")
    spaced = cwd / "cache dir with spaces"
    env = sweep_env(**TINY, DATA_FILE="inputs/foo.json", OUTPUT_ROOT="out", UNIMOL_WEIGHT_DIR=str(weight_dir),
                    EXTRA_ARGS=f'--cache_dir "{spaced}" --num_workers 1')
    proc = run_sweep(env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    configs = {arm: json.loads((cwd / "out" / "foo" / arm / "seed1" / "config.json").read_text())
               for arm in ("frozen", "finetuned")}
    return cwd, weight_dir, spaced, configs


def test_sweep_takes_main_defaults_and_resolves_paths_from_the_caller(caller_sweep):
    """No UNIMOL_WEIGHTS: main.py's default, $UNIMOL_WEIGHT_DIR/mol_pre_no_h_220816.pt; no DATASETS: the name is
    DATA_FILE's stem; relative DATA_FILE and OUTPUT_ROOT are the caller's, not the script's folder's."""
    cwd, weight_dir, _, configs = caller_sweep
    assert sorted(p.name for p in (cwd / "out").iterdir()) == ["foo"]
    assert (cwd / "out" / "foo" / "comparison_summary.json").is_file()
    for config in configs.values():
        args = config["args"]
        assert args["unimol_weights"] == str(weight_dir / "mol_pre_no_h_220816.pt")
        assert config["encoder_weights"].startswith("sha256:")
        assert args["dataset"] == "foo" and args["data_file"] == "inputs/foo.json"
        assert args["lr"] == 1e-4 and args["data_seed"] == 42
    finetuned = configs["finetuned"]["args"]
    assert finetuned["finetune_encoder"] and finetuned["freeze_layers"] == "0-12" and finetuned["encoder_lr"] == 5e-6
    assert not configs["frozen"]["args"]["finetune_encoder"]


def test_sweep_extra_args_survive_quoting(caller_sweep):
    cwd, _, spaced, configs = caller_sweep
    assert spaced.is_dir() and any(spaced.rglob("*"))
    assert not (cwd / "cache").exists() and not (cwd / "dir").exists()
    for config in configs.values():
        assert config["args"]["cache_dir"] == str(spaced) and config["args"]["num_workers"] == 1


def test_sweep_rejects_unbalanced_extra_args_quotes(tmp_path, small_benchmark):
    env = sweep_env(DATA_FILE=str(small_benchmark), OUTPUT_ROOT=str(tmp_path), EXTRA_ARGS='--cache_dir "oops')
    proc = run_sweep(env, timeout=60)
    assert proc.returncode == 2 and "EXTRA_ARGS: No closing quotation" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_sweep_arms_strategies_custom_arms_and_expansions(tmp_path, small_benchmark, random_ckpt, cache_dir):
    env = sweep_env(**TINY, DATASETS="tiny", DATA_FILE=str(small_benchmark), UNIMOL_WEIGHTS=str(random_ckpt),
                    OUTPUT_ROOT=str(tmp_path / "sweep"), ARMS="frozen mine", ENCODER_LRS="1e-4 1e-3",
                    ARM_mine="--finetune_encoder --finetune_strategy ffn --freeze_layers 0-13",
                    EXTRA_ARGS=f"--cache_dir {cache_dir} --num_workers 1")
    proc = run_sweep(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep" / "tiny"
    arms = ["frozen", "mine_lr1e-4", "mine_lr1e-3"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(arms)
    summary = json.loads((root / "comparison_summary.json").read_text())
    assert list(summary["arms"]) == ["frozen", "mine_lr1e-3", "mine_lr1e-4"]
    assert summary["arms"]["mine_lr1e-4"]["encoder_trainable_params"] == 2_100_736 + 1024  # layer 14's FFN + final norm
    assert "--encoder_lr 0.0001" in summary["arms"]["mine_lr1e-4"]["flags"]
    assert {k for k in summary["table"] if k.startswith("Improvement")} == {f"Improvement ({a})" for a in arms[1:]}
    assert all(summary["arms"][a]["seconds_per_epoch"] > 0 for a in arms)
    text = (root / "comparison_summary.txt").read_text()
    assert "Improvement (mine_lr1e-3)" in text and "2,101,760" in text
    bad = run_sweep(dict(env, ARMS="finetuned"), timeout=60)
    assert bad.returncode == 2 and "ARMS must include frozen" in bad.stderr
    bad = run_sweep(dict(env, ARMS="frozen lora nosuch"), timeout=60)
    assert bad.returncode == 2 and "unknown arm 'nosuch'" in bad.stderr

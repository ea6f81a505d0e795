"""run_finetune_comparison.sh: the frozen-vs-fine-tuned sweep over seeds and datasets, run for real (its
planning, printed lines and errors, in this process: tests/test_sweep_plan.py)."""
import csv
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT
from cli import build_parser, given_flags, runtime_flags, validate
from main import main

pytestmark = pytest.mark.slow  # every test here runs whole commands in subprocesses

SCRIPT = ROOT / "run_finetune_comparison.sh"
SWEEP_VARS = ("SEEDS", "DATASETS", "DATA_FILE", "EPOCHS", "TRAIN_SIZE", "VAL_SIZE", "TEST_SIZE", "DATA_SEED",
              "OOD_VAL_SPLIT", "UNIMOL_WEIGHTS", "UNIMOL_WEIGHT_DIR", "OUTPUT_ROOT", "DEVICE", "FREEZE_LAYERS", "ENCODER_LR",
              "EXTRA_ARGS", "PYTHON", "ARMS", "ENCODER_LRS", "FREEZE_SPECS", "JOB_GPUS", "FOUNDATION_MODELS",
              "BATCH_SIZE", "MINIMOL_ARGS", "UNIMOL_ARGS", "RECIPE", "PATIENCE")
TINY = dict(SEEDS="1", EPOCHS="1", TRAIN_SIZE="8", VAL_SIZE="6", TEST_SIZE="6", DEVICE="cpu")


def sweep_env(**values):
    """The caller's environment without any sweep setting of its own, plus `values`."""
    env = {k: v for k, v in os.environ.items() if k not in SWEEP_VARS}
    return dict(env, PYTHON=sys.executable, **values)


def run_sweep(env, *args, cwd=None, timeout=900):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_a_sweep_from_the_callers_folder(tmp_path, small_benchmark, random_ckpt, cache_dir):
    """One sweep, checked four ways below (one test, so that it runs once rather than once per xdist worker)."""
    sweep = caller_sweep(tmp_path / "caller", small_benchmark, random_ckpt, cache_dir)
    check_main_defaults_and_callers_paths(sweep)
    check_extra_args_survive_quoting(sweep)
    check_well_formed_summary(sweep)
    check_printed_commands_run_anywhere_and_rerun_safely(sweep, tmp_path)


def caller_sweep(cwd, small_benchmark, random_ckpt, cache_dir):
    """One tiny sweep (2 seeds, --jobs 2) run from a scratch working directory with relative DATA_FILE and
    OUTPUT_ROOT, no DATASETS, no UNIMOL_WEIGHTS but UNIMOL_WEIGHT_DIR, and a cache folder with spaces given
    in EXTRA_ARGS (a link to the session's cache)."""
    cwd.mkdir()
    weight_dir = cwd / "unimol weights"
    weight_dir.mkdir()
    (weight_dir / "mol_pre_no_h_220816.pt").symlink_to(random_ckpt)
    (cwd / "inputs").mkdir()
    shutil.copy(small_benchmark, cwd / "inputs" / "foo.json")
    spaced = cwd / "cache dir with spaces"
    spaced.symlink_to(cache_dir, target_is_directory=True)
    env = sweep_env(**dict(TINY, SEEDS="1 2"), DATA_FILE="inputs/foo.json", OUTPUT_ROOT="out",
                    UNIMOL_WEIGHT_DIR=str(weight_dir), EXTRA_ARGS=f'--cache_dir "{spaced}" --num_workers 1')
    proc = run_sweep(env, "--jobs", "2", cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # --jobs 2: a line when each run starts and ends, its output in RUN/sweep_console.log, the summary last
    runs = list(itertools.product(("frozen", "finetuned"), (1, 2)))
    for arm, seed in runs:
        assert f"== foo {arm} seed {seed} -> " in proc.stdout and f"== foo {arm} seed {seed}: finished in " in proc.stdout
        assert "roles:" in (cwd / "out" / "foo" / arm / f"seed{seed}" / "sweep_console.log").read_text()
    assert proc.stdout.index("== foo: all runs finished; writing the summary") > max(
        proc.stdout.index(f"== foo {arm} seed {seed}: finished in ") for arm, seed in runs)
    configs = {arm: json.loads((cwd / "out" / "foo" / arm / "seed1" / "config.json").read_text())
               for arm in ("frozen", "finetuned")}
    return cwd, weight_dir, spaced, configs, env


def check_main_defaults_and_callers_paths(caller_sweep):
    """No UNIMOL_WEIGHTS: main.py's default, $UNIMOL_WEIGHT_DIR/mol_pre_no_h_220816.pt; no DATASETS: the name is
    DATA_FILE's stem; relative DATA_FILE and OUTPUT_ROOT are the caller's, not the script's folder's."""
    cwd, weight_dir, _, configs, _ = caller_sweep
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


def check_extra_args_survive_quoting(caller_sweep):
    cwd, _, spaced, configs, _ = caller_sweep
    assert spaced.is_dir() and any(spaced.rglob("*"))
    assert not (cwd / "cache").exists() and not (cwd / "dir").exists()
    for config in configs.values():
        assert config["args"]["cache_dir"] == str(spaced) and config["args"]["num_workers"] == 1


def check_well_formed_summary(caller_sweep):
    cwd, _, _, _, env = caller_sweep
    root = cwd / "out" / "foo"
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
    again = run_sweep(env, cwd=cwd, timeout=300)
    assert again.returncode == 0 and again.stdout.count("finished, skipping") == 4


def test_sweep_arms_strategies_custom_arms_and_expansions(tmp_path, small_benchmark, random_ckpt, cache_dir):
    """A custom arm (ARM_mine) expanded by ENCODER_LRS: the sweep's printed lines run here as main.py's arguments
    (in this process), then compare's summary of them. (ENCODER_LRS with several values, one arm each:
    test_sweep_prints_one_line_per_run_then_the_summaries; the sweep running its runs itself, --jobs 2 included:
    test_a_sweep_from_the_callers_folder.)"""
    env = sweep_env(**TINY, DATASETS="tiny", DATA_FILE=str(small_benchmark), UNIMOL_WEIGHTS=str(random_ckpt),
                    OUTPUT_ROOT=str(tmp_path / "sweep"), ARMS="frozen mine", ENCODER_LRS="1e-4",
                    ARM_mine="--finetune_encoder --finetune_strategy ffn --freeze_layers 0-13",
                    EXTRA_ARGS=f"--cache_dir {cache_dir} --num_workers 1")
    printed = run_sweep(env, "--print-commands", timeout=120)
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        assert main(words_of(line.split(" && ", 1)[1])[2:]) == 0  # cd -- DIR && PYTHON main.py ARGS...
    root = tmp_path / "sweep" / "tiny"
    assert main(["--mode", "compare", "--output_dir", str(root)]) == 0
    arms = ["frozen", "mine_lr1e-4"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(arms)
    summary = json.loads((root / "comparison_summary.json").read_text())
    assert list(summary["arms"]) == arms
    assert summary["arms"]["mine_lr1e-4"]["encoder_trainable_params"] == 2_100_736 + 1024  # layer 14's FFN + final norm
    assert "--encoder_lr 0.0001" in summary["arms"]["mine_lr1e-4"]["flags"]
    assert {k for k in summary["table"] if k.startswith("Improvement")} == {f"Improvement ({a})" for a in arms[1:]}
    assert all(summary["arms"][a]["seconds_per_epoch"] > 0 for a in arms)
    text = (root / "comparison_summary.txt").read_text()
    assert "Improvement (mine_lr1e-4)" in text and "2,101,760" in text


def words_of(line):
    return shlex.split(line)


def flag(words, name):
    return words[words.index(name) + 1]


def test_compare_and_analyze_a_sweep_over_both_encoders(tmp_path, small_benchmark, cache_dir):
    """A sweep over both encoders: SWEEP/<dataset>/<encoder>/<arm>/seed<N>/. compare writes each encoder's
    summary beside its arms and, at the root, one section per encoder with the pretrained one first, a CSV whose
    every row names its encoder, and one plot row per encoder. analyze reads MiniMol's sweep folder."""
    root = tmp_path / "sweep" / "small_ec50_scaffold"
    tiny = ["--data_file", str(small_benchmark), "--dataset", "small_ec50_scaffold", "--cache_dir", str(cache_dir),
            "--epochs", "2", "--batch_size", "6", "--patience", "0", "--train_size", "12", "--val_size", "8",
            "--test_size", "8"]
    assert main([*tiny, "--unimol_weights", "random", "--output_dir", str(root / "unimol" / "frozen" / "seed1")]) == 0
    shutil.copytree(root / "unimol" / "frozen", root / "unimol" / "again")  # a second Uni-Mol arm, random-init
    minimol = [*tiny, "--foundation_model", "minimol"]
    assert main([*minimol, "--output_dir", str(root / "minimol" / "frozen" / "seed1")]) == 0
    assert main([*minimol, "--finetune_encoder", "--finetune_strategy", "lora",
                 "--output_dir", str(root / "minimol" / "lora" / "seed1")]) == 0
    assert main(["--mode", "compare", "--output_dir", str(root)]) == 0
    text = (root / "comparison_summary.txt").read_text()
    assert text.index("pretrained MiniMol") < text.index("RANDOM-INIT ENCODER")
    assert "Improvement (lora)" in text and "Improvement (again)" in text
    summary = json.loads((root / "comparison_summary.json").read_text())
    assert [e["encoder"] for e in summary["encoders"]] == ["pretrained MiniMol", "RANDOM-INIT ENCODER (not pretrained Uni-Mol)"]
    assert summary["encoders"][0]["arms"]["lora"]["encoder_trainable_params"] == 41_728
    with open(root / "comparison_summary.csv") as f:
        rows = list(csv.DictReader(f))
    encoders = [r["encoder"] for r in rows]
    assert encoders == sorted(encoders, key=lambda e: e.startswith("RANDOM")) and set(encoders) == set(
        e["encoder"] for e in summary["encoders"])
    assert all(r["encoder_weights"].startswith("minimol:sha256:") == (r["encoder"] == "pretrained MiniMol") for r in rows)
    for encoder in ("minimol", "unimol"):  # each encoder's own summary, a sweep folder of its own
        own = json.loads((root / encoder / "comparison_summary.json").read_text())
        assert {k: v for k, v in own.items() if k != "date"} == \
            {k: v for k, v in summary["encoders"][encoder == "unimol"].items() if k != "date"}
        assert (root / encoder / "comparison.png").stat().st_size > 0
    assert (root / "comparison.png").stat().st_size > 0
    assert main(["--mode", "analyze", "--output_dir", str(root / "minimol")]) == 0
    drift = json.loads((root / "minimol" / "analysis" / "feature_drift.json").read_text())
    assert 0 < drift["linear_cka_to_frozen"]["lora"]["1"] <= 1 + 1e-9
    # the default --freeze_layers 0-13: LoRA on layers 14 and 15 (14 with its virtual-node layer)
    assert set(drift["relative_weight_change"]["lora"]["1"]) == {"layer 14", "layer 15"}
    with open(root / "minimol" / "analysis" / "molecule_changes.csv") as f:
        assert {r["encoder_weights"] for r in csv.DictReader(f)} == {summary["encoders"][0]["encoder_weights"]}


def check_printed_commands_run_anywhere_and_rerun_safely(caller_sweep, tmp_path):
    """caller_sweep's seed-1 runs printed (creating nothing), then run as docs/scaling.md says, with xargs -P 2 from
    another folder in a shell without the sweep's settings (no UNIMOL_WEIGHT_DIR), and one line again as a
    requeued SLURM array task runs it. The interpreter in the lines records where and with what it was started:
    main.py would resolve the same settings there as it did for the sweep's own runs, into the printed folders.
    (What main.py does with a finished run's line: test_interrupted_run_resumes_to_the_same_result.)"""
    cwd, _, spaced, configs, env = caller_sweep
    calls = tmp_path / "calls.jsonl"
    recorder = tmp_path / "python"
    recorder.write_text(f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:2] != [{str(ROOT / "main.py")!r}]:  # the sweep itself (sweep_cli.py) runs on the real interpreter
    os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"cwd": os.getcwd(), "argv": sys.argv[1:]}}) + "\\n")
""")
    recorder.chmod(0o755)
    env = dict(env, OUTPUT_ROOT="printed", SEEDS="1", PYTHON=str(recorder))
    before = sorted(cwd.rglob("*"))
    runs = run_sweep(env, "--print-commands", cwd=cwd, timeout=120)
    compare = run_sweep(env, "--print-compare-commands", cwd=cwd, timeout=120)
    assert runs.returncode == 0 and compare.returncode == 0, runs.stderr + compare.stderr
    assert sorted(cwd.rglob("*")) == before
    assert len(runs.stdout.splitlines()) == 2 and len(compare.stdout.splitlines()) == 1
    assert all(flag(words_of(line), "--cache_dir") == str(spaced) for line in runs.stdout.splitlines())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "runs.txt").write_text(runs.stdout)
    (elsewhere / "compare.txt").write_text(compare.stdout)
    bare = sweep_env()
    proc = subprocess.run(["bash", "-c", r"xargs -d '\n' -n 1 -P 2 bash -c < runs.txt && bash compare.txt"],
                          cwd=elsewhere, env=bare, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(elsewhere)) == ["compare.txt", "runs.txt"]
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    assert {call["cwd"] for call in recorded} == {str(cwd)}
    assert sorted(call["argv"][1:3] for call in recorded) == [["--mode", "compare"], ["--mode", "train"],
                                                             ["--mode", "train"]]
    runtime = runtime_flags(build_parser())
    for arm in ("frozen", "finetuned"):
        argv = next(call["argv"][1:] for call in recorded if f"printed/foo/{arm}/seed1" in call["argv"])
        printed = resolved_flags(argv, cwd)
        assert printed["output_dir"] == f"printed/foo/{arm}/seed1" and printed["auto_resume"]
        reference = configs[arm]["args"]
        assert {k: v for k, v in printed.items() if k not in runtime} == \
            {k: v for k, v in reference.items() if k not in runtime}
    compare_argv = next(call["argv"][1:] for call in recorded if "compare" in call["argv"])
    assert compare_argv == ["--mode", "compare", "--output_dir", "printed/foo"]
    calls.unlink()
    again = subprocess.run(["bash", "-c", 'sed -n "${SLURM_ARRAY_TASK_ID}p" runs.txt | bash'], cwd=elsewhere,
                           env=dict(bare, SLURM_ARRAY_TASK_ID="2"), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(calls.read_text())["argv"][1:] == words_of(runs.stdout.splitlines()[1].split(" && ", 1)[1])[2:]


def resolved_flags(argv, cwd):
    """The settings main.py resolves from `argv` in folder `cwd` (config.json's "args")."""
    parser = build_parser()
    args = parser.parse_args(argv)
    here = os.getcwd()
    os.chdir(cwd)
    try:
        assert validate(args, given_flags(parser, argv), parser) is None
    finally:
        os.chdir(here)
    return vars(args)


def test_sweep_jobs_stop_at_a_failed_run_and_give_each_slot_its_gpu(tmp_path, small_benchmark):
    """--jobs 2 with JOB_GPUS="7 9": slot 0's run sees CUDA_VISIBLE_DEVICES=7, slot 1's 9, and each run half the
    usable cores as OMP_NUM_THREADS (the summary, alone, keeps the caller's environment). A failed run stops the
    launching: the running one is waited for, the failure named, exit 1, no summary. The interpreter is a
    wrapper that records each call and stands in for main.py: bad seed 1 fails at once, frozen seed 1 ends only
    after it has, so that it is still running when the failure is seen."""
    out = tmp_path / "sweep"
    calls = tmp_path / "calls.log"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
echo "${{CUDA_VISIBLE_DEVICES-unset}} ${{OMP_NUM_THREADS-unset}} $*" >> "{calls}"
case "$*" in
  *"/bad/seed1 "*) echo "error: a run that fails (no_such_flag)" >&2; exit 2 ;;
  *"/frozen/seed1 "*)
    for i in $(seq 600); do grep -q no_such_flag "{out}/tiny/bad/seed1/sweep_console.log" 2>/dev/null && break; sleep 0.1; done
    sleep 1; echo "stand-in run"; exit 0 ;;
esac
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    env = dict(sweep_env(**dict(TINY, SEEDS="1 2"), DATASETS="tiny", DATA_FILE=str(small_benchmark),
                         OUTPUT_ROOT=str(out), ARMS="frozen bad", ARM_bad="--lr 0.001", JOB_GPUS="7 9",
                         UNIMOL_WEIGHTS="random"),
               PYTHON=str(python))
    env.pop("OMP_NUM_THREADS", None)
    proc = run_sweep(env, "--jobs", "2", timeout=120)
    root = out / "tiny"
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "run failed (exit 2): tiny bad seed 1" in proc.stderr
    assert "no_such_flag" in (root / "bad" / "seed1" / "sweep_console.log").read_text()
    assert "a run failed: launching no more; waiting for the 1 running run(s)" in proc.stderr
    assert "== tiny frozen seed 1: finished in " in proc.stdout
    assert "stand-in run" in (root / "frozen" / "seed1" / "sweep_console.log").read_text()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: sweep stopped; failed: tiny bad seed 1 (")
    assert sorted(str(p.relative_to(root)) for p in root.iterdir()) == ["bad", "frozen"]
    assert sorted(str(p.relative_to(root)) for p in root.glob("*/*")) == ["bad/seed1", "frozen/seed1"]
    trained = dict(re.match(r"(\S+ \S+) .*--output_dir \S+/(\w+/seed\d)", line).group(2, 1)
                   for line in calls.read_text().splitlines() if "--mode train" in line)
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert trained == {"frozen/seed1": f"7 {threads}", "bad/seed1": f"9 {threads}"}
    assert f"(started on CUDA_VISIBLE_DEVICES=7 with OMP_NUM_THREADS={threads};" in proc.stdout


def test_the_script_runs_the_sweep_on_its_interpreter(tmp_path):
    """The script picks the interpreter (PYTHON, else .venv, else python3) and hands the sweep to it; a PYTHON that
    is no interpreter is a one-line error before anything runs."""
    proc = run_sweep(sweep_env(), "--help", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: run_finetune_comparison.sh")
    proc = run_sweep(dict(sweep_env(), PYTHON="no-such-python"), "--print-commands", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and proc.stderr == "error: PYTHON: 'no-such-python' is not an executable interpreter\n"
    assert not proc.stdout and not any(tmp_path.iterdir())


def test_an_interrupted_sweep_lets_its_run_stop_cleanly(tmp_path, small_benchmark):
    """Ctrl-C (SIGINT to the terminal's process group) reaches the sweep and its run: the sweep waits while the
    run cleans up (here a stand-in that takes a second), then exits 130; it never kills it mid-write."""
    started, cleaned = tmp_path / "started", tmp_path / "cleaned"
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
case "$*" in *"--mode train"*)
  trap 'sleep 1; touch "{cleaned}"; exit 130' INT TERM
  touch "{started}"
  i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 0 ;;
esac
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    env = dict(sweep_env(**TINY, DATA_FILE=str(small_benchmark), OUTPUT_ROOT=str(tmp_path / "out"),
                         UNIMOL_WEIGHTS="random"), PYTHON=str(python))
    sweep = subprocess.Popen(["bash", str(SCRIPT)], env=env, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if started.exists():
            break
        time.sleep(0.1)
    os.killpg(sweep.pid, signal.SIGINT)
    out, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and cleaned.exists(), out + err

"""The sweep's plan (sweep_cli.py, behind run_finetune_comparison.sh), in this process: the printed lines in the
sweep's order, the demo's defaults, every run's flags checked by main.py before anything runs, and the one-line
errors for settings that do not fit. (The sweep running its runs: tests/test_sweep.py.)"""
import os
import re
import shlex
import subprocess
import sys

import pytest

import sweep_cli
import sweep_jobs
from conftest import ROOT

SWEEP_VARS = ("SEEDS", "DATASETS", "DATA_FILE", "EPOCHS", "TRAIN_SIZE", "VAL_SIZE", "TEST_SIZE", "DATA_SEED",
              "OOD_VAL_SPLIT", "UNIMOL_WEIGHTS", "UNIMOL_WEIGHT_DIR", "OUTPUT_ROOT", "DEVICE", "FREEZE_LAYERS",
              "ENCODER_LR", "EXTRA_ARGS", "PYTHON", "ARMS", "ENCODER_LRS", "FREEZE_SPECS", "JOB_GPUS",
              "FOUNDATION_MODELS", "BATCH_SIZE", "MINIMOL_ARGS", "UNIMOL_ARGS", "ECFP_ARGS", "ARM_mine", "RECIPE",
              "PATIENCE", "ARM_big")


@pytest.fixture
def sweep(monkeypatch, capsys):
    """sweep(*argv, **environment) → (exit status, stdout lines as words, stderr), with none of the caller's
    own sweep settings and PYTHON this interpreter."""
    def call(*argv, **values):
        for name in SWEEP_VARS:
            monkeypatch.delenv(name, raising=False)
        for name, value in dict({"PYTHON": sys.executable}, **values).items():
            monkeypatch.setenv(name, value)
        status = sweep_cli.main(list(argv))
        out, err = capsys.readouterr()
        return status, [shlex.split(line) for line in out.splitlines()], err
    return call


def flag(words, name, last=False):
    """The value after `name` (its last one: argparse takes the last)."""
    at = len(words) - 1 - words[::-1].index(name) if last else words.index(name)
    return words[at + 1]


def test_one_line_per_run_in_the_sweeps_order_then_the_summaries(sweep, small_benchmark, tmp_path):
    values = dict(SEEDS="1 2 3", DATASETS="tiny", DATA_FILE=str(small_benchmark), OUTPUT_ROOT="out",
                  ARMS="frozen finetuned lora", ENCODER_LRS="1e-5 1e-4", UNIMOL_WEIGHTS="random")
    status, lines, err = sweep("--print-commands", "--print-compare-commands", **values)
    assert status == 0 and not err, err
    arms = ["frozen", "finetuned_lr1e-5", "finetuned_lr1e-4", "lora_lr1e-5", "lora_lr1e-4"]
    assert len(lines) == 3 * len(arms) + 1
    for words in lines:
        assert words[:5] == ["cd", "--", str(tmp_path), "&&", sys.executable] and words[5] == str(ROOT / "main.py")
    assert [flag(w, "--output_dir") for w in lines[:-1]] == [f"out/tiny/{a}/seed{s}" for s in (1, 2, 3) for a in arms]
    assert all("--auto_resume" in w and "--overwrite" not in w and flag(w, "--data_file") == str(small_benchmark)
               for w in lines[:-1])
    assert [flag(w, "--encoder_lr") for w in lines[1:5]] == ["1e-5", "1e-4", "1e-5", "1e-4"]
    assert lines[-1][6:] == ["--mode", "compare", "--output_dir", "out/tiny"]
    status, forced, _ = sweep("--force", "--print-commands", **values)
    assert status == 0 and len(forced) == 3 * len(arms)
    assert all("--overwrite" in w and "--auto_resume" not in w for w in forced)
    assert not any(tmp_path.iterdir())  # printing creates nothing


def test_the_demo_runs_every_encoder_with_its_own_recipe(sweep, tmp_path):
    status, lines, err = sweep("--demo", "--print-commands")
    assert status == 0 and err.startswith("== demo: no checkpoint at ./weights/mol_pre_no_h_220816.pt")
    encoder = lambda words: flag(words, "--output_dir").split("/")[-3]  # noqa: E731
    # the encoders with shipped weights first; ECFP (frozen only) skips the fine-tuned arm; only Uni-Mol's runs
    # name Uni-Mol weights
    assert "== ecfp: frozen only" in err
    assert len(lines) == 3 * 5 and all(flag(w, "--train_size") == "200" for w in lines)
    # MiniMol's and ECFP's recipe (heads trained until early stopping ends them) after the common --epochs 5
    # and the controlled recipe's shared batch; argparse takes the last. Every arm of an encoder shares it.
    assert {(encoder(w), flag(w, "--epochs", last=True), flag(w, "--batch_size", last=True), flag(w, "--lr", last=True)
             if "--lr" in w else None) for w in lines} == \
        {("minimol", "200", "32", "1e-3"), ("ecfp", "200", "32", "1e-3"), ("unimol", "5", "256", None)}
    # random-init Uni-Mol (no checkpoint here) is a pipeline check at half the molecules
    assert {(encoder(w), flag(w, "--train_size", last=True), flag(w, "--test_size", last=True)) for w in lines} == \
        {("minimol", "200", "200"), ("ecfp", "200", "200"), ("unimol", "100", "100")}
    root = "./outputs/finetune_comparison_demo/demo_ec50_scaffold"
    assert [flag(w, "--output_dir") for w in lines[:5]] == [
        f"{root}/{e}/{a}/seed42" for e, a in (("minimol", "frozen"), ("minimol", "finetuned"), ("ecfp", "frozen"),
                                              ("unimol", "frozen"), ("unimol", "finetuned"))]
    for words in lines:
        assert ("--unimol_weights" in words) == (encoder(words) == "unimol")
        assert ("--foundation_model" in words and flag(words, "--foundation_model")) == \
            (encoder(words) != "unimol" and encoder(words))
    assert flag(lines[-1], "--output_dir") == f"{root}/unimol/finetuned/seed44"
    assert not any(tmp_path.iterdir())


def test_every_runs_flags_are_checked_before_the_first_run(sweep, small_benchmark, tmp_path):
    """A bad arm is main.py's one-line error, naming the arm, before anything runs or is created."""
    common = dict(DATA_FILE=str(small_benchmark), OUTPUT_ROOT=str(tmp_path / "out"), UNIMOL_WEIGHTS="random")
    for arm, message in (("--no_such_flag", "arm 'mine': main.py does not know --no_such_flag"),
                         ("--finetune_encoder --epochs none", "arm 'mine': argument --epochs: invalid int value"),
                         ("--finetune_encoder --freeze_layers 0-20", "arm 'mine': --freeze_layers '0-20'"),
                         ("--lora_rank 4", "arm 'mine': --lora_rank apply to fine-tuning only")):
        status, lines, err = sweep("--jobs", "2", ARMS="frozen mine", ARM_mine=arm, **common)
        assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1 and not lines, err
    # a GPU the planning machine lacks is the machine that runs the lines' business
    status, lines, err = sweep("--print-commands", DEVICE="cuda", **common)
    assert status == 0 and {flag(w, "--device") for w in lines} == {"cuda"}
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, settings, message", [
    (["--jobs", "0"], {}, "--jobs takes the number of runs at once, 1 or more, not '0'"),
    (["--jobs=two"], {}, "not 'two'"),
    (["--jobs"], {}, "--jobs needs the number of runs at once"),
    (["--bogus"], {}, "unknown argument --bogus (see --help)"),
    (["--print-commands", "--jobs", "2"], {}, "--jobs runs the sweep on this machine"),
    (["--print-compare-commands"], {"JOB_GPUS": "0 1"}, "JOB_GPUS assigns GPUs to --jobs slots"),
    (["--jobs", "2"], {"JOB_GPUS": " "}, "JOB_GPUS names no GPU"),
    (["--print-commands"], {"PYTHON": "no-such-python"}, "PYTHON: 'no-such-python' is not an executable"),
    (["--jobs", "2"], {"SEEDS": "1 2 1"}, "SEEDS gives seed 1 twice"),
    (["--print-commands"], {"ENCODER_LRS": "1e-5 1e-5"}, "ARMS gives arm finetuned_lr1e-5 twice"),
    (["--jobs", "2"], {"EXTRA_ARGS": "--force_recompute_cache"}, "would delete caches other runs are reading"),
    ([], {"EXTRA_ARGS": '--cache_dir "oops'}, "EXTRA_ARGS: No closing quotation"),
    ([], {"ARMS": "finetuned"}, "ARMS must include frozen"),
    ([], {"ARMS": "frozen lora nosuch"}, "ARMS: unknown arm 'nosuch'"),
    ([], {"ARMS": "frozen bad-name"}, "ARMS: 'bad-name' is not a valid arm name"),
    ([], {"FOUNDATION_MODELS": "minimol chemprop"}, "FOUNDATION_MODELS: unknown encoder 'chemprop'"),
    ([], {"FOUNDATION_MODELS": "minimol minimol"}, "FOUNDATION_MODELS gives minimol twice"),
    ([], {"FOUNDATION_MODELS": "unimol minimol", "ARMS": "frozen ffn"},
     "arm 'minimol/ffn': --finetune_strategy ffn is for Uni-Mol; MiniMol takes layers or lora"),
    ([], {"FOUNDATION_MODELS": "minimol unimol", "EXTRA_ARGS": "--conformer_timeout 300"},
     "EXTRA_ARGS gives --conformer_timeout to every encoder's runs, but MiniMol takes no --conformer_timeout: pass "
     "it in UNIMOL_ARGS"),
    ([], {"DEVICE": "gpu"}, "arm 'frozen': --device gpu: expected auto, cpu, cuda or cuda:N"),
], ids=["jobs-0", "jobs-word", "jobs-no-value", "unknown-argument", "print-with-jobs", "print-with-job-gpus",
        "blank-job-gpus", "print-no-python", "seed-twice", "arm-twice", "force-cache-with-jobs", "extra-args-quotes",
        "no-frozen-arm", "unknown-arm", "arm-name", "unknown-encoder", "encoder-twice", "strategy-for-encoder",
        "uni-mol-flag-for-every-encoder", "device"])
def test_settings_that_do_not_fit_are_one_line_errors(sweep, small_benchmark, tmp_path, args, settings, message):
    """Exit 2, one line, nothing created; a seed or arm given twice would be one run folder twice."""
    values = dict(DATA_FILE=str(small_benchmark), OUTPUT_ROOT=str(tmp_path / "out"), UNIMOL_WEIGHTS="random")
    status, lines, err = sweep(*args, **dict(values, **settings))
    assert status == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not lines and not any(tmp_path.iterdir())


def test_a_missing_data_file_stops_the_sweep(sweep, tmp_path):
    status, _, err = sweep(DATASETS="nope", OUTPUT_ROOT=str(tmp_path))
    assert status == 1 and err == "error: ./data/raw/nope.json not found for dataset nope (set DATA_FILE, or see " \
                                  "README 'Getting the real inputs')\n"


def test_what_belongs_to_the_machine_that_runs_a_line_is_not_checked_here(sweep, small_benchmark, tmp_path):
    """Uni-Mol's checkpoint and a GPU are checked where each run starts; printed lines name them as given.
    An explicit --amp off in EXTRA_ARGS is every encoder's precision."""
    values = dict(DATA_FILE=str(small_benchmark), OUTPUT_ROOT="out", FOUNDATION_MODELS="minimol unimol")
    status, lines, err = sweep("--print-commands", "--print-compare-commands", DEVICE="cuda:1",
                               EXTRA_ARGS="--amp off", **values)  # no ./weights/ here
    assert status == 0 and not err, err
    assert {flag(w, "--unimol_weights") for w in lines[:-1] if "/unimol/" in flag(w, "--output_dir")} == \
        {"./weights/mol_pre_no_h_220816.pt"} and {flag(w, "--device") for w in lines[:-1]} == {"cuda:1"}
    status, lines, err = sweep("--print-compare-commands", UNIMOL_WEIGHTS="missing.pt", **values)
    assert status == 0 and len(lines) == 1 and not any(tmp_path.iterdir())


def test_data_seeds_draw_the_molecules_again_for_every_arm_and_seed(sweep, small_benchmark):
    status, lines, err = sweep("--print-commands", DATA_FILE=str(small_benchmark), OUTPUT_ROOT="out", SEEDS="1 2",
                               DATA_SEEDS="42 7", UNIMOL_WEIGHTS="random")
    assert status == 0 and not err, err
    assert [(flag(w, "--data_seed"), flag(w, "--seed"), flag(w, "--output_dir")) for w in lines] == [
        (d, s, f"out/{flag(lines[0], '--dataset')}/{arm}/data{d}_seed{s}")
        for d in ("42", "7") for s in ("1", "2") for arm in ("frozen", "finetuned")]


@pytest.mark.parametrize("settings, message", [
    ({"DATA_SEEDS": "42 x"}, "DATA_SEEDS: 'x' is not a data seed"),
    ({"SEEDS": "1 two"}, "SEEDS: 'two' is not a seed (whole numbers"),
    ({"SEEDS": " "}, "SEEDS names no seed"),
    ({"DATA_SEEDS": "42 -1"}, "DATA_SEEDS: '-1' is not a data seed"),
    ({"DATA_SEEDS": "42 43 42"}, "DATA_SEEDS gives data seed 42 twice"),
    ({"DATA_SEEDS": "42 43", "DATA_SEED": "1"}, "DATA_SEED and DATA_SEEDS both set")])
def test_data_seeds_that_do_not_fit_are_one_line_errors(sweep, small_benchmark, tmp_path, settings, message):
    status, lines, err = sweep("--print-commands", DATA_FILE=str(small_benchmark), OUTPUT_ROOT=str(tmp_path / "o"),
                               **settings)
    assert status == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1 and not lines


def test_runs_at_once_share_the_cores_unless_the_caller_set_threads(monkeypatch):
    """--jobs K gives each run cores / K threads (at least 1); an OMP_NUM_THREADS of the caller's is kept, and one
    run at a time gets the caller's environment as it is."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep_jobs.os, "sched_getaffinity", lambda pid: set(range(8)))
    assert sweep_jobs.job_env(0, [], 2) == (dict(sweep_jobs.os.environ, OMP_NUM_THREADS="4"), " with OMP_NUM_THREADS=4")
    assert sweep_jobs.job_env(1, [], 16)[0]["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in sweep_jobs.job_env(0, [], 1)[0]
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env, note = sweep_jobs.job_env(1, ["0", "5"], 4)
    assert env["OMP_NUM_THREADS"] == "3" and env["CUDA_VISIBLE_DEVICES"] == "5" and note == " on CUDA_VISIBLE_DEVICES=5"


def test_the_results_reproduction_command_plans_the_documented_sweep():
    """docs/results.md's command, with --print-commands for --jobs 2 (planning checks every run's flags): 36 runs per
    benchmark (MiniMol 3 arms, ECFP frozen only, x 3 data draws x 3 seeds), 108 in all, into the folders it names,
    every run with the same head recipe."""
    block = re.search(r"```bash\n(for f in scaffold assay size; do.*?)```", (ROOT / "docs" / "results.md").read_text(),
                      re.S).group(1)
    assert block.count("--jobs 2") == 1
    env = {k: v for k, v in os.environ.items() if k not in SWEEP_VARS} | {"PYTHON": sys.executable}
    proc = subprocess.run(["bash", "-c", block.replace("--jobs 2", "--print-commands")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = [shlex.split(line) for line in proc.stdout.splitlines()]
    folders = [flag(words, "--output_dir") for words in runs]
    assert len(folders) == 108 and len(set(folders)) == 108
    assert {(flag(w, "--batch_size", last=True), flag(w, "--lr", last=True), flag(w, "--epochs", last=True))
            for w in runs} == {("32", "1e-3", "200")}
    assert sum("/minimol/lora_lr1e4/data43_seed44" in f for f in folders) == 3
    assert {f.split("/")[2] for f in folders} == {f"demo_ec50_{s}" for s in ("scaffold", "assay", "size")}
    assert sum("/ecfp/frozen/" in f for f in folders) == 27


def test_arms_share_the_heads_recipe_unless_the_sweep_is_as_designed(sweep, small_benchmark):
    """RECIPE=controlled (the default): when an arm fine-tunes, every run trains its head at the fine-tuned batch
    (256 per side), which the frozen arm can always use; BATCH_SIZE or an arm's own --batch_size come after it.
    RECIPE=as-designed: main.py's per-mode defaults (frozen 4096, fine-tuned 256)."""
    common = dict(DATA_FILE=str(small_benchmark), OUTPUT_ROOT="out", SEEDS="1", UNIMOL_WEIGHTS="random")
    batch = lambda lines: {flag(w, "--output_dir").split("/")[-2]: flag(w, "--batch_size", last=True)  # noqa: E731
                           if "--batch_size" in w else None for w in lines}
    status, lines, err = sweep("--print-commands", **common)
    assert status == 0 and batch(lines) == {"frozen": "256", "finetuned": "256"}, err
    assert batch(sweep("--print-commands", RECIPE="as-designed", **common)[1]) == {"frozen": None, "finetuned": None}
    assert batch(sweep("--print-commands", BATCH_SIZE="64", **common)[1]) == {"frozen": "64", "finetuned": "64"}
    assert batch(sweep("--print-commands", ARMS="frozen big", ARM_big="--finetune_encoder --batch_size 512",
                       **common)[1]) == {"frozen": "256", "big": "512"}  # an arm differs in what it defines
    assert batch(sweep("--print-commands", FOUNDATION_MODELS="ecfp", **common)[1]) == {"frozen": None}  # all frozen
    status, lines, err = sweep("--print-commands", RECIPE="seed", **common)
    assert status == 2 and err == "error: RECIPE: 'seed' is not a recipe (controlled or as-designed)\n" and not lines

"""The comparison sweep behind run_finetune_comparison.sh, on the command line: its options and usage, then
the plan (sweep_plan.py) printed as shell lines for a scheduler (--print-commands) or run on this machine
(sweep_jobs.py: one run after the other, or K at once with --jobs K)."""
import os
import re
import shlex
import shutil
import signal
import sys
import time

from encoders import ENCODERS, FOUNDATION_MODELS
from sweep_jobs import MAIN, run_pool, run_serial
from sweep_plan import (DEFAULTS, DEMO, DEMO_FILE, DEMO_RANDOM_INIT_ARGS, STRATEGY_ARMS, Options, SweepError,
                        demo_encoders, plan_sweep)
from settings import DEFAULT_DATASET, FINETUNE_BATCH_SIZE, FROZEN_BATCH_SIZE


def parse_options(argv):
    options, rest = {}, list(argv)
    while rest:
        word = rest.pop(0)
        if word == "--demo":
            options["demo"] = True
        elif word == "--force":
            options["force"] = True
        elif word in ("--jobs", "--jobs=") or word.startswith("--jobs="):
            if word == "--jobs" and not rest:
                raise SweepError("--jobs needs the number of runs at once (see --help)")
            value = rest.pop(0) if word == "--jobs" else word.removeprefix("--jobs=")
            if not re.fullmatch(r"[1-9][0-9]*", value):
                raise SweepError(f"--jobs takes the number of runs at once, 1 or more, not '{value}'")
            options["jobs"], options["jobs_given"] = int(value), True
        elif word == "--print-commands":
            options["print_runs"] = True
        elif word == "--print-compare-commands":
            options["print_compare"] = True
        else:
            raise SweepError(f"unknown argument {word} (see --help)")
    jobs_given = options.pop("jobs_given", False)
    parsed = Options(**options)
    if parsed.printing and jobs_given:
        raise SweepError("--jobs runs the sweep on this machine; --print-commands / --print-compare-commands run "
                         "nothing")
    return parsed


def interpreter_path(python, pwd):
    """The interpreter by absolute path, for printed lines that run from anywhere."""
    path = shutil.which(python) if "/" not in python else os.path.join(pwd, python)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise SweepError(f"PYTHON: '{python}' is not an executable interpreter")
    return path


def command_line(pwd, python, args):
    """One shell line that runs main.py with `args` from the caller's folder, from anywhere."""
    return " ".join(shlex.quote(word) for word in ("cd", "--", pwd)) + " && " + \
        " ".join(shlex.quote(word) for word in (python, MAIN, *args))


def main(argv, env=os.environ):
    if any(word in ("-h", "--help") for word in argv):
        print(usage())
        return 0
    started = time.monotonic()
    try:
        options = parse_options(argv)
        python = env.get("PYTHON") or "python3"
        gpus = (env.get("JOB_GPUS") or "").split()
        if env.get("JOB_GPUS") and options.printing:
            raise SweepError("JOB_GPUS assigns GPUs to --jobs slots; printed commands get theirs from whatever runs "
                             "them (unset JOB_GPUS)")
        if env.get("JOB_GPUS") and not gpus:
            raise SweepError('JOB_GPUS names no GPU (e.g. JOB_GPUS="0 1")')
        pwd = env.get("PWD") if env.get("PWD") and os.path.realpath(env["PWD"]) == os.getcwd() else os.getcwd()
        path = interpreter_path(python, pwd) if options.printing else python
        plan = plan_sweep(env, options, check=options.print_runs or not options.printing)
        for note in plan.notes:
            print(note, file=sys.stderr if options.printing else sys.stdout, flush=True)
        if options.printing:
            runs = [run.args for run in plan.runs] if options.print_runs else []
            compares = [plan.compare_args(dataset) for dataset in plan.datasets] if options.print_compare else []
            print("\n".join(command_line(pwd, path, args) for args in runs + compares))
            return 0
        (run_serial if options.jobs == 1 else run_pool)(plan, options, python, gpus)
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.status
    except KeyboardInterrupt:
        return 130
    print(f"sweep finished in {round(time.monotonic() - started)} s; summaries under "
          f"{plan.output_root}/<dataset>/comparison_summary.txt")
    return 0


def usage():
    return USAGE.format(encoders=" ".join(FOUNDATION_MODELS), demo_encoders=" ".join(demo_encoders()),
                        strategy_arms=", ".join(STRATEGY_ARMS), strategies=" / ".join(STRATEGY_ARMS),
                        random_init=DEMO_RANDOM_INIT_ARGS,
                        demo_args="; ".join(f"{k.upper()}_ARGS='{i.demo_args}'" for k, i in ENCODERS.items()
                                            if i.demo_args),
                        frozen_only=" ".join(name for name, info in ENCODERS.items() if not info.finetunable) or "none",
                        arms=DEFAULTS["ARMS"], seeds=DEFAULTS["SEEDS"], output_root=DEFAULTS["OUTPUT_ROOT"],
                        dataset=DEFAULT_DATASET, demo=DEMO, demo_file=DEMO_FILE, recipe=DEFAULTS["RECIPE"],
                        finetune_batch=FINETUNE_BATCH_SIZE, frozen_batch=FROZEN_BATCH_SIZE)


USAGE = """\
usage: run_finetune_comparison.sh [--demo] [--force] [--jobs K] [--print-commands] [--print-compare-commands]
                                  [--help]

Runs the arms in ARMS (default: {arms}) per dataset and seed with the same --data_seed:
  frozen     Energy-DPO on frozen encoder features (the reference every other arm is compared with)
  finetuned  --finetune_encoder, with main.py's --freeze_layers and --encoder_lr defaults
  {strategy_arms}   --finetune_encoder --finetune_strategy {strategies}
  <name>     any arm defined as ARM_<name>="main.py flags"
FOUNDATION_MODELS="{demo_encoders}" runs every arm for each encoder, in OUTPUT_ROOT/<dataset>/<encoder>/<arm>/
(with unimol alone, the default, the arms sit directly in OUTPUT_ROOT/<dataset>/); attention and ffn are
Uni-Mol arms; a frozen-only encoder ({frozen_only}) runs the frozen arms and skips the others, saying so.
The summary then has one section per encoder, pretrained encoders first.
ENCODER_LRS="1e-6 5e-6 2e-5" and FREEZE_SPECS="0-12 0-10 none" expand each fine-tuned arm into one
arm per value (e.g. finetuned_lr1e-6_freeze0-10). Then writes comparison_summary.{{txt,json,csv}}
and comparison.png in OUTPUT_ROOT/<dataset>/.
Every run's flags are checked by main.py before the first run starts (a bad arm is a one-line error).
Runs whose test_metrics.json exists are skipped; an interrupted run is resumed (every run gets
main.py's --auto_resume: finished -> exits 0 untouched, last.pt -> resumes, else starts).

  --demo    the same sweep on the shipped demo scaffold benchmark, small sizes (CPU-friendly), for every
            encoder ({demo_encoders}: MiniMol's real weights; Uni-Mol's if present, else random-init)
  --force   rerun finished runs (their results are replaced): runs get --overwrite, not --auto_resume
  --jobs K  up to K runs at once on this machine [1: one after the other]. With K > 1 each run's
            output goes to RUN/sweep_console.log (main.py also writes RUN/training.log), a line says
            when each run starts and ends, and a dataset's summary is written once all its runs
            have ended. The first failed run stops the launching of new ones: the running ones are
            waited for, the failed ones are named, and the exit status is 1. The runs share the
            caches (safe: cache writes are atomic) and the cores: each run gets OMP_NUM_THREADS =
            cores / K (at least 1; an OMP_NUM_THREADS you set is kept), and with
            EXTRA_ARGS='--num_workers N' each run starts N conformer processes.
            GPUs: with JOB_GPUS="0 1 2 3", the run in slot i (0..K-1) gets CUDA_VISIBLE_DEVICES set
            to JOB_GPUS' entry i mod its length (K=4: one run per GPU; K=8: two per GPU; an entry
            may be a list such as 0,1). Without JOB_GPUS, CUDA_VISIBLE_DEVICES is left alone, so
            every run sees the same GPUs.
  --print-commands
            run nothing; print one line per run to stdout (datasets, then data seeds, then seeds, then arms: line N
            is run N), e.g. for a SLURM array: sed -n "${{SLURM_ARRAY_TASK_ID}}p" runs.txt | bash
            Each line is a whole shell command: cd to this directory (relative paths resolve there,
            as in the sweep), then the interpreter and main.py by absolute path, every word quoted,
            with --auto_resume, so running a line again is safe: a finished run exits
            0 untouched, an interrupted one resumes. With --force the lines carry --overwrite
            instead and rerun from scratch each time. Without UNIMOL_WEIGHTS the lines name
            main.py's default checkpoint (they do not depend on the UNIMOL_WEIGHT_DIR where they run).
  --print-compare-commands
            run nothing; print each dataset's --mode compare line, to run once its runs have
            finished. With --print-commands too, these lines come after all run lines.
  Printing runs and creates nothing; it checks the settings, that the data files exist and every
  run's flags (as the sweep does before it runs anything). The lines need this directory, the
  interpreter, the data and the Uni-Mol checkpoint at the same paths where they run (the device and
  the checkpoint are checked there, when each run starts).

Environment overrides. The sweep has no defaults of its own for main.py's settings: a variable
that is unset (or empty) passes no flag, so main.py's default applies (shown as [main.py's]; `python
main.py --help` and docs/cli.md list them).
Relative paths resolve against the current directory; --demo changes the marked defaults.
  SEEDS           training seeds                       [{seeds}]
  FOUNDATION_MODELS  encoders, each runs every arm     [unimol] (demo: {demo_encoders}; any of {encoders})
  DATASETS        dataset names                        [DATA_FILE's stem if set, else {dataset}]
                                                       (demo: {demo[DATASETS]})
  DATA_FILE       data file, one dataset only          [./data/raw/<dataset>.json]
                                                       (demo: the shipped {demo_file})
  RECIPE          how the arms' heads train            [{recipe}]
                  controlled: every arm the same head recipe (with a fine-tuned arm, every run gets the
                  fine-tuned batch, {finetune_batch} per side, unless BATCH_SIZE or the arm sets one), so the arms
                  differ only in what they define; as-designed: main.py's per-mode defaults (frozen
                  {frozen_batch}, fine-tuned {finetune_batch} per side: the fine-tuned arm takes up to 16 times the head
                  updates, and the summary says how many times)
  EPOCHS          the epoch budget, --epochs           [main.py's] (demo: {demo[EPOCHS]})
  PATIENCE        epochs without validation gain before a run stops, --patience     [main.py's]
  BATCH_SIZE      molecules per side per step          [RECIPE's]
  TRAIN_SIZE      training molecules per side          [main.py's] (demo: {demo[TRAIN_SIZE]})
  VAL_SIZE        validation molecules per side        [main.py's] (demo: {demo[VAL_SIZE]})
  TEST_SIZE       test molecules per side              [main.py's] (demo: {demo[TEST_SIZE]})
  DATA_SEED       subsampling seed, shared by the arms [main.py's]
  DATA_SEEDS      several draws of the molecules: every arm and seed runs once per data seed, in
                  <arm>/data<D>_seed<N>/ (each draw shared by every arm, so comparisons stay paired);
                  the summary then gives the spread over draws and over seeds apart, and the paired
                  Improvement's 95% interval over the draws                          [DATA_SEED alone]
  UNIMOL_WEIGHTS  checkpoint or 'random' (Uni-Mol runs) [main.py's]
                                                       (demo: main.py's default file if present, else random)
  DEVICE          auto, cpu, cuda, cuda:N              [main.py's]
  OOD_VAL_SPLIT   random or domain (honest validation) [main.py's]
  FREEZE_LAYERS   frozen layers of the fine-tuned arm  [main.py's]
  ENCODER_LR      encoder learning rate (fine-tuned)   [main.py's]
  OUTPUT_ROOT     where runs and summaries go          [{output_root}]
                                                       (demo: {demo[OUTPUT_ROOT]})
  <ENCODER>_ARGS  more main.py flags for that encoder's runs (after the ones above), e.g. MINIMOL_ARGS []
                                                       (demo: {demo_args}; random-init Uni-Mol:
                                                       UNIMOL_ARGS='{random_init}')
  EXTRA_ARGS      more main.py flags for every run, split with shell quoting rules
                  (e.g. EXTRA_ARGS='--cache_dir "/data/my cache" --num_workers 4')      []
  PYTHON          interpreter                          [.venv/bin/python next to this script if present, else python3]
  JOB_GPUS        GPUs for the --jobs slots, e.g. "0 1 2 3" (see --jobs)             []
The head learning rate is main.py's --lr; change it with EXTRA_ARGS='--lr ...'."""



if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stops the runs of a --jobs sweep (run_pool's finally)
    sys.exit(main(sys.argv[1:]))

"""The comparison sweep behind run_finetune_comparison.sh: datasets × seeds × arms (× encoders) → runs
of main.py → a summary per dataset.

The sweep is planned whole before anything runs: every run's main.py arguments are built from the
environment (the script's documented variables) and checked by main.py's own parser and checks, so a
typo in an arm is a one-line error before the first run trains. The plan is then printed
(--print-commands) or run: one run after the other, or K at once (--jobs K), each run its own
main.py process with --auto_resume (a finished run is skipped, an interrupted one resumes)."""
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli import check_arguments, typed_flags
from encoders import DEFAULT_ENCODER, ENCODER_FLAGS, ENCODERS, FOUNDATION_MODELS, WEIGHTS_OPTIONS, refused_flags
from runs import FINISHED, REFERENCE_ARM, RunKey
from settings import DEFAULT_DATASET

SCRIPT = "run_finetune_comparison.sh"
HERE = os.path.dirname(os.path.abspath(__file__))
MAIN = os.path.join(HERE, "main.py")
BUILTIN_ARMS = {"frozen": "", "finetuned": "--finetune_encoder",
                **{s: f"--finetune_encoder --finetune_strategy {s}" for s in ("attention", "ffn", "lora")}}
# Environment variables that become one main.py flag each, for every run (unset or empty: main.py's default)
COMMON_FLAGS = {"EPOCHS": "--epochs", "BATCH_SIZE": "--batch_size", "TRAIN_SIZE": "--train_size",
                "VAL_SIZE": "--val_size", "TEST_SIZE": "--test_size", "DATA_SEED": "--data_seed", "DEVICE": "--device",
                "OOD_VAL_SPLIT": "--ood_val_split"}
FINETUNE_FLAGS = {"FREEZE_LAYERS": "--freeze_layers", "ENCODER_LR": "--encoder_lr"}  # fine-tuned arms only
DEMO = {"DATASETS": "demo_ec50_scaffold", "EPOCHS": "5", "TRAIN_SIZE": "200", "VAL_SIZE": "100", "TEST_SIZE": "200",
        "OUTPUT_ROOT": "./outputs/finetune_comparison_demo"}
# An encoder whose checkpoint is missing in the demo runs random-init: its rows only show that the pipeline
# runs, so it gets half the molecules (half the cold-cache work)
DEMO_RANDOM_INIT_ARGS = "--train_size 100 --val_size 50 --test_size 100"
STOP_WAIT_S = 10  # how long an interrupted sweep waits for its runs to stop on their own


class SweepError(Exception):
    """A one-line error; `status` 2 for settings, 1 for missing inputs."""

    def __init__(self, message, status=2):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Options:
    demo: bool = False
    force: bool = False
    jobs: int = 1
    print_runs: bool = False
    print_compare: bool = False

    @property
    def printing(self):
        return self.print_runs or self.print_compare


@dataclasses.dataclass(frozen=True)
class Run:
    dataset: str
    arm: str  # as its folder names it: frozen, lora_lr1e-4, or <encoder>/<arm> in a sweep over encoders
    key: RunKey  # its data seed (DATA_SEEDS; None: one draw) and training seed
    folder: str  # OUTPUT_ROOT/<dataset>/<arm>/<its key's folder>, as sweep.py reads it
    args: tuple  # main.py's arguments

    @property
    def seed(self):
        return self.key.seed

    @property
    def name(self):
        return f"{self.dataset} {self.arm} {self.key.label}"


@dataclasses.dataclass(frozen=True)
class Plan:
    runs: tuple
    datasets: tuple
    output_root: str
    notes: tuple = ()  # said before anything runs (which weights the demo uses, arms an encoder skips)

    def compare_args(self, dataset):
        return ("--mode", "compare", "--output_dir", f"{self.output_root}/{dataset}")


# ----------------------------------------------------------------------------- settings → plan

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


def words(name, text):
    """TEXT split with shell quoting rules (never evaluated); a quoting error names the variable."""
    try:
        return shlex.split(text or "")
    except ValueError as exc:
        raise SweepError(f"{name}: {exc}: {text}") from None


def given(env, name):
    return env.get(name) or None  # unset or empty: the variable passes nothing


def repeated(values, message):
    seen = set()
    for value in values:
        if value in seen:
            raise SweepError(message % value)
        seen.add(value)


def demo_encoders():
    """The demo's encoders: those whose weights need no download first, then the others."""
    return sorted(FOUNDATION_MODELS, key=lambda name: ENCODERS[name].weights is not None)


def plan_sweep(env, options, check=True):
    """The sweep's runs, in order (datasets, then data seeds, then seeds, then arms), from the environment `env`;
    SweepError for settings that do not fit. `check`: every run's arguments through main.py's checks."""
    env, notes = dict(env), []
    if options.demo:
        if not given(env, "DATASETS") and not given(env, "DATA_FILE"):
            env["DATASETS"] = DEMO["DATASETS"]
        if not given(env, "DATA_FILE"):
            env["DATA_FILE"] = os.path.join(HERE, "data", "demo", "demo_ec50_scaffold.json")
        for name, value in DEMO.items():
            if name != "DATASETS" and not given(env, name):
                env[name] = value
        env["FOUNDATION_MODELS"] = given(env, "FOUNDATION_MODELS") or " ".join(demo_encoders())
        for weights in WEIGHTS_OPTIONS:
            if given(env, weights.variable):
                continue
            path = weights.default_path()
            if os.path.isfile(path):
                notes.append(f"== demo: {weights.label} weights {path}")
            else:
                notes.append(f"== demo: no checkpoint at {path}; using a random-init encoder "
                             f"({weights.variable}=random)")
                env[weights.variable] = "random"
                for info in ENCODERS.values():
                    if info.weights == weights:
                        env.setdefault(f"{info.name.upper()}_ARGS", DEMO_RANDOM_INIT_ARGS)
        for info in ENCODERS.values():  # its head's recipe; set but empty: the user's "no extra flags"
            env.setdefault(f"{info.name.upper()}_ARGS", info.demo_args)
    seeds = (given(env, "SEEDS") or "42 43 44").split()
    data_seeds = data_seeds_of(env)
    output_root = given(env, "OUTPUT_ROOT") or "./outputs/finetune_comparison"
    if given(env, "DATASETS"):
        datasets = env["DATASETS"].split()
    elif given(env, "DATA_FILE"):
        datasets = [os.path.basename(env["DATA_FILE"]).removesuffix(".json").removesuffix(".csv")]
    else:
        datasets = [DEFAULT_DATASET]
    if not datasets or not seeds:
        raise SweepError("DATASETS and SEEDS must name at least one dataset and seed")
    if given(env, "DATA_FILE") and len(datasets) != 1:
        raise SweepError(f"DATA_FILE names one file but DATASETS has {len(datasets)} datasets")
    extra = words("EXTRA_ARGS", env.get("EXTRA_ARGS"))
    encoder_args = {name: words(f"{name.upper()}_ARGS", env.get(f"{name.upper()}_ARGS")) for name in ENCODERS}
    if "--force_recompute_cache" in extra and (options.jobs > 1 or options.printing):
        raise SweepError("EXTRA_ARGS: --force_recompute_cache with runs at once (--jobs, printed commands) would "
                         "delete caches other runs are reading; clear the cache folder before the sweep instead")
    arms = expand_arms(env)
    encoders = (given(env, "FOUNDATION_MODELS") or DEFAULT_ENCODER).split()
    if not encoders:
        raise SweepError(f"FOUNDATION_MODELS names no encoder ({', '.join(FOUNDATION_MODELS)})")
    for name in encoders:
        if name not in ENCODERS:
            raise SweepError(f"FOUNDATION_MODELS: unknown encoder '{name}' ({', '.join(FOUNDATION_MODELS)})")
    repeated(encoders, "FOUNDATION_MODELS gives %s twice")
    typed = typed_flags(extra, ENCODER_FLAGS)
    for name in encoders:  # EXTRA_ARGS goes to every run: a flag of some encoders only belongs in their own _ARGS
        refused = refused_flags(ENCODERS[name], typed)
        if refused:
            takers = [f"{other.upper()}_ARGS" for other in encoders if refused[0] in ENCODERS[other].options]
            raise SweepError(f"EXTRA_ARGS gives --{refused[0]} to every encoder's runs, but {ENCODERS[name].label} "
                             f"takes no --{refused[0]}: pass it in {' or '.join(takers) or 'its takers _ARGS'}")
    if encoders != [DEFAULT_ENCODER]:  # each encoder runs every arm, in <encoder>/<arm>/
        arms, skipped = per_encoder(arms, encoders)
        notes += [f"== {name}: frozen only ({ENCODERS[name].label} has no layers to fine-tune); its fine-tuned arms "
                  f"are skipped: {' '.join(names)}" for name, names in skipped.items()]
    repeated(seeds, "SEEDS gives seed %s twice")
    repeated(data_seeds, "DATA_SEEDS gives data seed %s twice")
    repeated(datasets, "DATASETS gives dataset %s twice")
    repeated([arm for arm, _, _ in arms], "ARMS gives arm %s twice (after the ENCODER_LRS / FREEZE_SPECS expansion)")
    data_files = []
    for dataset in datasets:
        data_file = given(env, "DATA_FILE") or f"./data/raw/{dataset}.json"
        if not os.path.isfile(data_file):
            raise SweepError(f"{data_file} not found for dataset {dataset} (set DATA_FILE, or see README 'Getting the "
                             f"real inputs')", status=1)
        data_files.append(data_file)
    common = [word for name, flag in COMMON_FLAGS.items() if given(env, name) for word in (flag, env[name])]
    finetune = [word for name, flag in FINETUNE_FLAGS.items() if given(env, name) for word in (flag, env[name])]
    mode = ["--overwrite"] if options.force else ["--auto_resume"]
    runs = []
    for dataset, data_file in zip(datasets, data_files):
        for data_seed in data_seeds:
            for seed in seeds:
                for arm, encoder, flags in arms:
                    own = weights_args(ENCODERS[encoder], env, options.printing) + encoder_args[encoder]
                    tuned = (finetune if "--finetune_encoder" in flags else []) + flags
                    key = RunKey(data_seed and int(data_seed), int(seed) if seed.isdigit() else seed)
                    folder = f"{output_root}/{dataset}/{arm}/{key.folder}"
                    draw = ["--data_seed", data_seed] if data_seed else []
                    args = ["--mode", "train", "--dataset", dataset, "--data_file", data_file, "--seed", seed,
                            "--output_dir", folder, *common, *draw, *own, *tuned, *mode, *extra]
                    runs.append(Run(dataset, arm, key, folder, tuple(args)))
    if check:
        for run in runs:
            check_run(run)
    return Plan(tuple(runs), tuple(datasets), output_root, tuple(notes))


def weights_args(info, env, printing):
    """The flag naming an encoder's weights file for its runs: its sweep variable (e.g. UNIMOL_WEIGHTS), else
    nothing (main.py's default place); a printed line must not depend on the weights folder variable of the
    shell that runs it, so there the default is spelled out."""
    weights = info.weights
    value = weights and (given(env, weights.variable) or (weights.default_path() if printing else None))
    return [f"--{weights.flag}", value] if value else []


def data_seeds_of(env):
    """DATA_SEEDS' values as written ([None]: one draw, by DATA_SEED or main.py's default); SweepError for
    a value that is not a seed."""
    if not given(env, "DATA_SEEDS"):
        return [None]
    if given(env, "DATA_SEED"):
        raise SweepError("DATA_SEED and DATA_SEEDS both set: DATA_SEEDS draws the molecules once per seed; unset "
                         "DATA_SEED")
    values = env["DATA_SEEDS"].split()
    wrong = [value for value in values if not value.isdigit()]
    if wrong:
        raise SweepError(f"DATA_SEEDS: '{wrong[0]}' is not a data seed (whole numbers, 0 or more, e.g. "
                         f"DATA_SEEDS=\"42 43 44\")")
    return values


def expand_arms(env):
    """[(arm, flags)] from ARMS (built-in names or ARM_<name>), each fine-tuned arm expanded into one
    arm per ENCODER_LRS and per FREEZE_SPECS value."""
    out = []
    lrs, specs = (given(env, "ENCODER_LRS") or "").split() or [""], (given(env, "FREEZE_SPECS") or "").split() or [""]
    for name in (given(env, "ARMS") or "frozen finetuned").split():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise SweepError(f"ARMS: '{name}' is not a valid arm name (letters, digits, _)")
        if given(env, f"ARM_{name}"):
            flags = words(f"ARM_{name}", env[f"ARM_{name}"])
        elif name in BUILTIN_ARMS:
            flags = BUILTIN_ARMS[name].split()
        else:
            raise SweepError(f"ARMS: unknown arm '{name}'; built-in: {' '.join(BUILTIN_ARMS)}, or define "
                             f"ARM_{name}=\"flags\"")
        if "--finetune_encoder" not in flags:
            out.append((name, flags))
            continue
        for lr in lrs:
            for spec in specs:
                out.append((name + (f"_lr{lr}" if lr else "") + (f"_freeze{spec}" if spec else ""),
                            flags + (["--encoder_lr", lr] if lr else []) + (["--freeze_layers", spec] if spec else [])))
    if REFERENCE_ARM not in [arm for arm, _ in out]:
        raise SweepError(f"ARMS must include {REFERENCE_ARM}, the arm every other arm is compared with")
    return [(arm, DEFAULT_ENCODER, flags) for arm, flags in out]


def per_encoder(arms, encoders):
    """Every arm for each encoder, as <encoder>/<arm>; a frozen-only encoder's fine-tuned arms are left out."""
    out, skipped = [], {}
    for name in encoders:
        for arm, _, flags in arms:
            if "--finetune_encoder" in flags and not ENCODERS[name].finetunable:
                skipped.setdefault(name, []).append(arm)
                continue
            own = [] if name == DEFAULT_ENCODER else ["--foundation_model", name]
            out.append((f"{name}/{arm}", name, own + flags))
    return out, skipped


def check_run(run):
    """main.py's own parsing and checks of a run's arguments, now (nothing is created): SweepError naming the
    arm. What belongs to the machine that runs the line is checked only for its form: the device (a GPU
    may be there; checking one here would also load torch) and the encoder's weights file."""
    error = check_arguments(run.args, {"--device": "cpu", **{f"--{w.flag}": "random" for w in WEIGHTS_OPTIONS}})
    if error:
        raise SweepError(f"arm '{run.arm}': {error}")


# ----------------------------------------------------------------------------- printing

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


# ----------------------------------------------------------------------------- running

def finished(run, options):
    if os.path.isfile(os.path.join(run.folder, FINISHED)) and not options.force:
        print(f"== {run.name}: finished, skipping ({run.folder})", flush=True)
        return True
    return False


def job_env(slot, gpus, jobs):
    """(environment, note) for the run in `slot` of `jobs` at once: its JOB_GPUS entry, and with jobs > 1
    its share of the cores as OMP_NUM_THREADS (unless the caller set it). Without it every run starts a
    thread per core: on 2 cores two MiniMol fine-tuning runs at once took 72 s against 46 s one after the
    other, and 27 s with one thread each."""
    env, parts = dict(os.environ), []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
        parts.append(f"on CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}")
    if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // jobs))
        parts.append(f"with OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    return env, "".join(" " + part for part in parts)


def stop(processes):
    """Let interrupted runs end as a stopped run should (its atomic writes cleaned up, its log complete):
    Ctrl-C reached them too, from the terminal; those still running after STOP_WAIT_S (the sweep alone
    was interrupted, or sent SIGTERM) get the interrupt now."""
    deadline = time.monotonic() + STOP_WAIT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)
    for process in processes:
        process.wait()


def run_to_end(command, env=None):
    """A command's exit status; an interrupted sweep stops it gently first (stop)."""
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except BaseException:
        stop([process])
        raise


def compare(python, plan, dataset):
    return run_to_end([python, MAIN, *plan.compare_args(dataset)]) == 0


def run_serial(plan, options, python, gpus):
    """One run after the other, each one's output on the console; each dataset's summary after its runs."""
    env, note = job_env(0, gpus, 1)
    for dataset in plan.datasets:
        for run in (r for r in plan.runs if r.dataset == dataset):
            if finished(run, options):
                continue
            print(f"== {run.name} -> {run.folder}{note}", flush=True)
            if run_to_end([python, MAIN, *run.args], env) != 0:
                raise SweepError(f"run failed: {run.name} (log: {run.folder}/training.log); sweep stopped", status=1)
        if not compare(python, plan, dataset):
            raise SweepError(f"the summary of {dataset} failed", status=1)


def run_pool(plan, options, python, gpus):
    """Up to options.jobs runs at once, each in a slot 0..K-1 (its JOB_GPUS entry), its output in
    RUN/sweep_console.log; a dataset's summary once all its runs have ended. The first failed run stops
    the launching: the running ones are waited for, the failed ones named."""
    running, failed, free, summarized = {}, [], list(range(options.jobs)), set()
    left = {dataset: sum(r.dataset == dataset for r in plan.runs) for dataset in plan.datasets}

    def summarize(dataset):
        if left[dataset] == 0 and not failed and dataset not in summarized:
            summarized.add(dataset)
            print(f"== {dataset}: all runs finished; writing the summary", flush=True)
            if not compare(python, plan, dataset):
                print(f"error: the summary of {dataset} failed", file=sys.stderr, flush=True)
                failed.append(f"the summary of {dataset}")

    def reap():
        while True:
            ended = [p for p in running if p.poll() is not None]
            if ended:
                break
            time.sleep(0.2)
        for process in ended:
            run, slot, started = running.pop(process)
            if process.returncode == 0:
                print(f"== {run.name}: finished in {round(time.monotonic() - started)} s", flush=True)
            else:
                print(f"error: run failed (exit {process.returncode}): {run.name} (output: "
                      f"{run.folder}/sweep_console.log, log: {run.folder}/training.log)", file=sys.stderr, flush=True)
                failed.append(run.name)
            free.append(slot)
            left[run.dataset] -= 1
            summarize(run.dataset)

    try:
        for dataset in plan.datasets:
            for run in (r for r in plan.runs if r.dataset == dataset):
                if failed:
                    break
                if finished(run, options):
                    left[dataset] -= 1
                    continue
                while not free:
                    reap()
                if failed:
                    break
                slot = free.pop(0)
                try:
                    Path(run.folder).mkdir(parents=True, exist_ok=True)
                except OSError:
                    print(f"error: run failed: {run.name}: cannot create the folder {run.folder}", file=sys.stderr)
                    failed.append(run.name)
                    free.append(slot)
                    break
                env, note = job_env(slot, gpus, options.jobs)
                with open(os.path.join(run.folder, "sweep_console.log"), "w") as log:
                    process = subprocess.Popen([python, MAIN, *run.args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
                running[process] = (run, slot, time.monotonic())
                print(f"== {run.name} -> {run.folder} (started{note}; output in {run.folder}/sweep_console.log)",
                      flush=True)
            if failed:
                break
            summarize(dataset)
        if failed and running:
            print(f"== a run failed: launching no more; waiting for the {len(running)} running run(s)", file=sys.stderr,
                  flush=True)
        while running:
            reap()
    finally:  # an interrupted sweep stops its runs; the next sweep resumes or restarts them
        if running:
            print(f"== stopping {len(running)} running run(s) (the next sweep resumes or restarts them): "
                  f"{' '.join(run.folder for run, _, _ in running.values())}", file=sys.stderr, flush=True)
            stop(list(running))
    if failed:
        raise SweepError(f"sweep stopped; failed: {'; '.join(failed)} (finished runs are kept; the next sweep resumes "
                         f"the rest)", status=1)


def usage():
    encoders = " ".join(FOUNDATION_MODELS)
    return USAGE.format(encoders=encoders, demo_encoders=" ".join(demo_encoders()), builtin=", ".join(BUILTIN_ARMS),
                        demo_args="; ".join(f"{k.upper()}_ARGS='{i.demo_args}'" for k, i in ENCODERS.items()
                                            if i.demo_args),
                        random_init=DEMO_RANDOM_INIT_ARGS, frozen_only=" ".join(
                            name for name, info in ENCODERS.items() if not info.finetunable) or "none")


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


USAGE = """\
usage: run_finetune_comparison.sh [--demo] [--force] [--jobs K] [--print-commands] [--print-compare-commands]
                                  [--help]

Runs the arms in ARMS (default: frozen finetuned) per dataset and seed with the same --data_seed:
  frozen     Energy-DPO on frozen encoder features (the reference every other arm is compared with)
  finetuned  --finetune_encoder, with main.py's --freeze_layers and --encoder_lr defaults
  attention, ffn, lora   --finetune_encoder --finetune_strategy attention / ffn / lora
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
  SEEDS           training seeds                       [42 43 44]
  FOUNDATION_MODELS  encoders, each runs every arm     [unimol] (demo: {demo_encoders}; any of {encoders})
  DATASETS        dataset names                        [DATA_FILE's stem if set, else lbap_general_ec50_scaffold]
                                                       (demo: demo_ec50_scaffold)
  DATA_FILE       data file, one dataset only          [./data/raw/<dataset>.json]
                                                       (demo: the shipped data/demo/demo_ec50_scaffold.json)
  EPOCHS          max epochs, --epochs                 [main.py's] (demo: 5)
  BATCH_SIZE      molecules per side per step          [main.py's]
  TRAIN_SIZE      training molecules per side          [main.py's] (demo: 200)
  VAL_SIZE        validation molecules per side        [main.py's] (demo: 100)
  TEST_SIZE       test molecules per side              [main.py's] (demo: 200)
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
  OUTPUT_ROOT     where runs and summaries go          [./outputs/finetune_comparison]
                                                       (demo: ./outputs/finetune_comparison_demo)
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

"""The comparison sweep's plan: its environment (the documented variables of run_finetune_comparison.sh) →
datasets × data seeds × seeds × arms (× encoders) → one main.py run each, in order, every run's arguments
checked by the command line's own checks (cli.py) before anything runs. sweep_jobs.py runs a plan,
sweep_cli.py prints it."""
import dataclasses
import os
import re
import shlex
from typing import NamedTuple

from cli import check_arguments, typed_flags
from encoders import (DEFAULT_ENCODER, ENCODER_FLAGS, ENCODERS, FOUNDATION_MODELS, STRATEGIES, WEIGHTS_OPTIONS,
                      refused_flags)
from runs import REFERENCE_ARM, RunKey, arm_folder, run_path
from settings import DEFAULT_DATASET, FINETUNE_BATCH_SIZE, ModelSpec

HERE = os.path.dirname(os.path.abspath(__file__))
# An arm is a name and the main.py flags it adds: frozen, the default strategy's fine-tuning, each other strategy
STRATEGY_ARMS = [s for s in STRATEGIES if s != ModelSpec.finetune_strategy]  # named as their strategy
BUILTIN_ARMS = {REFERENCE_ARM: "", "finetuned": "--finetune_encoder",
                **{s: f"--finetune_encoder --finetune_strategy {s}" for s in STRATEGY_ARMS}}
# Environment variables that become one main.py flag each, for every run (unset or empty: main.py's default)
COMMON_FLAGS = {"EPOCHS": "--epochs", "PATIENCE": "--patience", "BATCH_SIZE": "--batch_size",
                "TRAIN_SIZE": "--train_size", "VAL_SIZE": "--val_size", "TEST_SIZE": "--test_size", "DATA_SEED": "--data_seed",
                "DEVICE": "--device", "OOD_VAL_SPLIT": "--ood_val_split"}
FINETUNE_FLAGS = {"FREEZE_LAYERS": "--freeze_layers", "ENCODER_LR": "--encoder_lr"}  # fine-tuned arms only
# The sweep's own defaults (for variables that are not main.py flags)
DEFAULTS = {"SEEDS": "42 43 44", "ARMS": f"{REFERENCE_ARM} finetuned", "OUTPUT_ROOT": "./outputs/finetune_comparison",
            "RECIPE": "controlled"}
# How the arms' heads train: controlled (every arm the same head recipe: what the arms compare is what they
# define) or as-designed (main.py's per-mode defaults: the frozen arm's batch is 16 times the fine-tuned one's)
RECIPES = ("controlled", "as-designed")
DEMO = {"DATASETS": "demo_ec50_scaffold", "EPOCHS": "5", "TRAIN_SIZE": "200", "VAL_SIZE": "100", "TEST_SIZE": "200",
        "OUTPUT_ROOT": "./outputs/finetune_comparison_demo"}
DEMO_FILE = "data/demo/demo_ec50_scaffold.json"  # under this folder
# An encoder whose checkpoint is missing in the demo runs random-init: its rows only show that the pipeline
# runs, so it gets half the molecules (half the cold-cache work)
DEMO_RANDOM_INIT_ARGS = "--train_size 100 --val_size 50 --test_size 100 --calibration_size 100"


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
    folder: str  # OUTPUT_ROOT/<dataset>/<arm>/<its key's folder> (runs.run_path), as sweep.py reads it
    args: tuple  # main.py's arguments

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


def demo_environment(env):
    """(env with the demo's defaults wherever the caller set nothing, the notes saying which weights it uses)."""
    env, notes = dict(env), []
    if not given(env, "DATASETS") and not given(env, "DATA_FILE"):
        env["DATASETS"] = DEMO["DATASETS"]
    if not given(env, "DATA_FILE"):
        env["DATA_FILE"] = os.path.join(HERE, DEMO_FILE)
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
            notes.append(f"== demo: no checkpoint at {path}; using a random-init encoder ({weights.variable}=random)")
            env[weights.variable] = "random"
            for info in ENCODERS.values():
                if info.weights == weights:
                    env.setdefault(f"{info.name.upper()}_ARGS", DEMO_RANDOM_INIT_ARGS)
    for info in ENCODERS.values():  # its head's recipe; set but empty: the user's "no extra flags"
        env.setdefault(f"{info.name.upper()}_ARGS", info.demo_args)
    return env, notes


def datasets_of(env):
    """[(dataset, its data file)] from DATASETS / DATA_FILE; SweepError for a file that is not there."""
    if given(env, "DATASETS"):
        datasets = env["DATASETS"].split()
    elif given(env, "DATA_FILE"):
        datasets = [os.path.basename(env["DATA_FILE"]).removesuffix(".json").removesuffix(".csv")]
    else:
        datasets = [DEFAULT_DATASET]
    if not datasets:
        raise SweepError("DATASETS names no dataset")
    if given(env, "DATA_FILE") and len(datasets) != 1:
        raise SweepError(f"DATA_FILE names one file but DATASETS has {len(datasets)} datasets")
    repeated(datasets, "DATASETS gives dataset %s twice")
    out = []
    for dataset in datasets:
        data_file = given(env, "DATA_FILE") or f"./data/raw/{dataset}.json"
        if not os.path.isfile(data_file):
            raise SweepError(f"{data_file} not found for dataset {dataset} (set DATA_FILE, or see README 'Getting the "
                             f"real inputs')", status=1)
        out.append((dataset, data_file))
    return out


def encoders_of(env, extra):
    """FOUNDATION_MODELS' encoders; SweepError for an unknown one, or for a flag in EXTRA_ARGS (`extra`) that
    one of them does not take."""
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
    return encoders


def plan_sweep(env, options, check=True):
    """The sweep's runs, in order (datasets, then data seeds, then seeds, then arms), from the environment `env`;
    SweepError for settings that do not fit. `check`: every run's arguments through the command line's checks."""
    env, notes = demo_environment(env) if options.demo else (dict(env), [])
    seeds = seeds_of(env, "SEEDS", DEFAULTS["SEEDS"])
    data_seeds = data_seeds_of(env)
    output_root = given(env, "OUTPUT_ROOT") or DEFAULTS["OUTPUT_ROOT"]
    datasets = datasets_of(env)
    extra = words("EXTRA_ARGS", env.get("EXTRA_ARGS"))
    if "--force_recompute_cache" in extra and (options.jobs > 1 or options.printing):
        raise SweepError("EXTRA_ARGS: --force_recompute_cache with runs at once (--jobs, printed commands) would "
                         "delete caches other runs are reading; clear the cache folder before the sweep instead")
    arms, encoders = named_arms(env), encoders_of(env, extra)
    for rule in ARM_RULES:
        arms, said = rule(arms, env, encoders)
        notes += said
    repeated(seeds, "SEEDS gives seed %s twice")
    repeated(data_seeds, "DATA_SEEDS gives data seed %s twice")
    repeated([arm.name for arm in arms], "ARMS gives arm %s twice (after the ENCODER_LRS / FREEZE_SPECS expansion)")
    encoder_args = {name: words(f"{name.upper()}_ARGS", env.get(f"{name.upper()}_ARGS")) for name in ENCODERS}
    common = recipe_args(env, arms) + \
        [word for name, flag in COMMON_FLAGS.items() if given(env, name) for word in (flag, env[name])]
    finetune = [word for name, flag in FINETUNE_FLAGS.items() if given(env, name) for word in (flag, env[name])]
    mode = ["--overwrite"] if options.force else ["--auto_resume"]
    runs = []
    for dataset, data_file in datasets:
        for data_seed in data_seeds:
            for seed in seeds:
                for arm in arms:
                    own = weights_args(ENCODERS[arm.encoder], env, options.printing) + encoder_args[arm.encoder]
                    tuned = (finetune if "--finetune_encoder" in arm.flags else []) + arm.flags
                    key = RunKey(data_seed and int(data_seed), int(seed))
                    folder = run_path(f"{output_root}/{dataset}", arm.name, key)
                    draw = ["--data_seed", data_seed] if data_seed else []
                    args = ["--mode", "train", "--dataset", dataset, "--data_file", data_file, "--seed", seed,
                            "--output_dir", folder, *common, *draw, *own, *tuned, *mode, *extra]
                    runs.append(Run(dataset, arm.name, key, folder, tuple(args)))
    if check:
        for run in runs:
            check_run(run)
    return Plan(tuple(runs), tuple(dataset for dataset, _ in datasets), output_root, tuple(notes))


def recipe_args(env, arms):
    """The head recipe every run of a controlled sweep (RECIPE=controlled, the default) shares: when an arm
    fine-tunes, the batch size main.py gives fine-tuned runs (FINETUNE_BATCH_SIZE per side, where memory needs
    it), for every arm (a frozen arm can always use it); BATCH_SIZE, an arm's or an encoder's own flags come
    after, so an arm differs in what it defines. RECIPE=as-designed passes nothing: each run gets main.py's
    defaults for its mode (the seed's design: frozen 4096, fine-tuned 256 per side)."""
    recipe = given(env, "RECIPE") or DEFAULTS["RECIPE"]
    if recipe not in RECIPES:
        raise SweepError(f"RECIPE: '{recipe}' is not a recipe ({' or '.join(RECIPES)})")
    if recipe != "controlled" or not any("--finetune_encoder" in arm.flags for arm in arms):
        return []
    return ["--batch_size", str(FINETUNE_BATCH_SIZE)]


def weights_args(info, env, printing):
    """The flag naming an encoder's weights file for its runs: its sweep variable (e.g. UNIMOL_WEIGHTS), else
    nothing (main.py's default place); a printed line must not depend on the weights folder variable of the
    shell that runs it, so there the default is spelled out."""
    weights = info.weights
    value = weights and (given(env, weights.variable) or (weights.default_path() if printing else None))
    return [f"--{weights.flag}", value] if value else []


def seeds_of(env, name, default):
    """A seed variable's values as written; SweepError naming the variable for one that is not a seed."""
    values = (given(env, name) or default).split()
    if not values:
        raise SweepError(f"{name} names no seed (whole numbers, 0 or more, e.g. {name}=\"42 43 44\")")
    wrong = [value for value in values if not value.isdigit()]
    if wrong:
        raise SweepError(f"{name}: '{wrong[0]}' is not a {'data ' * (name == 'DATA_SEEDS')}seed (whole numbers, 0 or "
                         f"more, e.g. {name}=\"42 43 44\")")
    return values


def data_seeds_of(env):
    """DATA_SEEDS' values as written ([None]: one draw, by DATA_SEED or main.py's default); SweepError for
    a value that is not a seed."""
    if not given(env, "DATA_SEEDS"):
        return [None]
    if given(env, "DATA_SEED"):
        raise SweepError("DATA_SEED and DATA_SEEDS both set: DATA_SEEDS draws the molecules once per seed; unset "
                         "DATA_SEED")
    return seeds_of(env, "DATA_SEEDS", "")


class Arm(NamedTuple):
    name: str  # as its folder names it (<encoder>/<arm> in a sweep over several encoders)
    encoder: str
    flags: list  # the main.py flags that make it what it is


def named_arms(env):
    """[Arm] from ARMS: built-in names or ARM_<name>="flags" (the frozen arm among them)."""
    out = []
    for name in (given(env, "ARMS") or DEFAULTS["ARMS"]).split():
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise SweepError(f"ARMS: '{name}' is not a valid arm name (letters, digits, _)")
        if given(env, f"ARM_{name}"):
            flags = words(f"ARM_{name}", env[f"ARM_{name}"])
        elif name in BUILTIN_ARMS:
            flags = BUILTIN_ARMS[name].split()
        else:
            raise SweepError(f"ARMS: unknown arm '{name}'; built-in: {' '.join(BUILTIN_ARMS)}, or define "
                             f"ARM_{name}=\"flags\"")
        out.append(Arm(name, DEFAULT_ENCODER, flags))
    if REFERENCE_ARM not in [arm.name for arm in out]:
        raise SweepError(f"ARMS must include {REFERENCE_ARM}, the arm every other arm is compared with")
    return out


# ----------------------------------------------------------------------------- arm rules
# Each rule takes the arms so far, the environment and the encoders, and returns the arms it makes (and notes
# to say before anything runs); plan_sweep applies ARM_RULES in order to named_arms' arms.

def by_rate_and_spec(arms, env, encoders):
    """Each fine-tuned arm once per ENCODER_LRS value and per FREEZE_SPECS value (e.g. finetuned_lr1e-5_freeze0-10)."""
    lrs, specs = (given(env, "ENCODER_LRS") or "").split() or [""], (given(env, "FREEZE_SPECS") or "").split() or [""]
    out = []
    for arm in arms:
        if "--finetune_encoder" not in arm.flags:
            out.append(arm)
            continue
        out += [Arm(arm.name + (f"_lr{lr}" if lr else "") + (f"_freeze{spec}" if spec else ""), arm.encoder,
                    arm.flags + (["--encoder_lr", lr] if lr else []) + (["--freeze_layers", spec] if spec else []))
                for lr in lrs for spec in specs]
    return out, []


def per_encoder(arms, env, encoders):
    """Every arm for each encoder, in its <encoder>/<arm> folder, when the sweep has several (or another than
    the default); a frozen-only encoder's fine-tuned arms are left out, said in a note."""
    if encoders == [DEFAULT_ENCODER]:
        return arms, []
    out, skipped = [], {}
    for name in encoders:
        for arm in arms:
            if "--finetune_encoder" in arm.flags and not ENCODERS[name].finetunable:
                skipped.setdefault(name, []).append(arm.name)
                continue
            own = [] if name == DEFAULT_ENCODER else ["--foundation_model", name]
            out.append(Arm(arm_folder(arm.name, name), name, own + arm.flags))
    notes = [f"== {name}: frozen only ({ENCODERS[name].label} has no layers to fine-tune); its fine-tuned arms are "
             f"skipped: {' '.join(names)}" for name, names in skipped.items()]
    return out, notes


ARM_RULES = (by_rate_and_spec, per_encoder)


def check_run(run):
    """The command line's own parsing and checks of a run's arguments, now (nothing is created): SweepError
    naming the arm. What belongs to the machine that runs the line is checked only for its form: the device
    (a GPU may be there; checking one here would also load torch) and the encoder's weights file."""
    error = check_arguments(run.args, {"--device": "cpu", **{f"--{w.flag}": "random" for w in WEIGHTS_OPTIONS}})
    if error:
        raise SweepError(f"arm '{run.arm}': {error}")

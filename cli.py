"""The command line (usage: README.md, docs/cli.md): the parser, its checks, and the typed settings (settings.py,
where the defaults live) that the flags become, once. main.py (the entry point), the sweep planner and
Python users take the parser and the checks from here; the argparse Namespace never leaves this module.
Light: torch loads only for a device check that needs it."""
import argparse
import dataclasses
import math
import re
from pathlib import Path

import distributed
import good
from data import benchmark_name, good_spec, missing_data_file
from encoders import (BUILD_OPTIONS, ENCODER_FLAGS, FOUNDATION_MODELS, STRATEGIES, WEIGHTS_OPTIONS, encoder_info,
                      flag_error, frozen_layers)
from settings import (DEFAULT_DATASET, FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE, FROZEN_BATCH_SIZE,
                      FROZEN_EVAL_BATCH_SIZE, DataSpec, EncoderSettings, FeaturizeJob, GoodSpec, ModelSpec,
                      MoleculeSettings, OtherBenchmark, PredictJob, PrepareJob, RunFolder, ScoreJob, ScoringSettings,
                      TrainConfig, TrainJob)

MODES = ("train", "eval", "predict", "featurize", "prepare", "compare", "analyze", "weights")
TEAM_MODES = ("train", "featurize", "predict")  # the modes that run under torchrun
ALL, TRAIN, EVAL, PREDICT, FEATURIZE, ANALYZE = set(MODES), {"train"}, {"eval"}, {"predict"}, {"featurize"}, {"analyze"}
PREPARE, BENCHMARK = {"prepare"}, {"train", "eval", "prepare"}  # BENCHMARK: the modes that read a benchmark
SCORING = EVAL | PREDICT  # modes that score with a finished run's checkpoint
LOGGED_MODES = ("train", "eval", "analyze")  # the modes that write a log file
MOLECULES = TRAIN | SCORING | FEATURIZE  # modes that prepare molecules under the molecule limits
GOOD_FLAGS = ("good_domain", "good_shift")
CROSS_EVAL_FLAGS = ("dataset", "test_size", "data_seed", *GOOD_FLAGS)  # eval honours them only with --data_file
FINETUNE_ONLY = ("finetune_strategy", "lora_rank", "lora_alpha", "lora_dropout", "warmup_epochs", "lr_schedule",
                 "encoder_lr", "freeze_layers", "grad_checkpointing")
LORA_ONLY = ("lora_rank", "lora_alpha", "lora_dropout")
DEVICE_FORM = r"auto|cpu|cuda(:\d+)?"
D, C, M, T, E = ModelSpec, MoleculeSettings, DataSpec, TrainConfig, EncoderSettings  # where defaults live


def build_parser():
    """The parser. Each flag records the modes that accept it (`modes`) and whether it is a runtime
    flag (`runtime`: it changes where and how fast, not what, so it may differ on --resume, and
    eval / predict take it from the command line when given instead of from the run)."""
    p = argparse.ArgumentParser(description="Energy-DPO out-of-distribution detection on the Uni-Mol encoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def add(group, flag, modes, runtime=False, **kw):
        action = group.add_argument(flag, **kw)
        action.modes, action.runtime = frozenset(modes), runtime

    add(p, "--mode", ALL, choices=MODES, default="train",
        help="eval: re-score a run's test split, or with --data_file another benchmark; prepare: build a GOOD "
             "benchmark as a DrugOOD JSON; compare: summarise a sweep under --output_dir; analyze: what fine-tuning "
             "changed there; "
             "weights: download Uni-Mol's checkpoint from the hub")
    g = p.add_argument_group("data")
    add(g, "--dataset", BENCHMARK, help=f"name used in outputs (default: the --data_file stem, else "
        f"{DEFAULT_DATASET}); without --data_file also picks data/raw/<dataset>.json; "
        f"{', '.join(good.CLI_DATASETS)}: GOOD's benchmark, built from its raw file (--data_file)")
    add(g, "--data_file", BENCHMARK, help="DrugOOD JSON (default: ./data/raw/<dataset>.json); eval: another "
        "benchmark, a DrugOOD JSON or a CSV with smiles and is_ood (0/1) columns; GOOD: its raw file as downloaded")
    add(g, "--good_domain", BENCHMARK, help=f"GOOD: {' or '.join(good.GOOD_DOMAINS)} (default {GoodSpec.domain})")
    add(g, "--good_shift", BENCHMARK, help=f"GOOD: {' or '.join(good.GOOD_SHIFTS)} (default {GoodSpec.shift})")
    add(g, "--train_size", TRAIN, type=int, default=M.train_size, help="molecules per side (ID and OOD) for training")
    add(g, "--val_size", TRAIN, type=int, default=M.val_size, help="molecules per side for validation")
    add(g, "--test_size", TRAIN | EVAL, type=int, default=M.test_size,
        help="molecules per side for testing (eval --data_file: default the run's)")
    add(g, "--data_seed", TRAIN | EVAL, type=int, default=M.data_seed,
        help="seed of the subsampling, independent of --seed (eval --data_file: default the run's)")
    add(g, "--calibration_size", TRAIN, type=int, default=M.calibration_size,
        help="ID molecules that no other role uses, drawn to calibrate predict's p-values (fewer when the file "
             "holds fewer; 0 or none left: the validation ID molecules, which model selection also uses)")
    add(g, "--ood_val_split", TRAIN, choices=["random", "domain"], default=M.ood_val_split,
        help="how ood_val becomes OOD train and OOD val: random = disjoint molecules of the same domains "
             "(the reference protocol; GOOD: cut 70/30), domain = disjoint domain_ids (honest validation)")
    add(g, "--cache_dir", ALL, True, default=C.cache_dir, help="conformer, feature, GOOD caches (eval/predict: run's)")
    add(g, "--force_recompute_cache", ALL, True, action="store_true", help="drop and rebuild the caches used")
    add(g, "--num_workers", ALL, True, type=int, default=C.num_workers,
        help="processes for conformer (Uni-Mol) or graph (MiniMol) generation (ECFP takes none)")
    add(g, "--max_heavy_atoms", MOLECULES, type=int, default=C.max_heavy_atoms,
        help="skip larger molecules (reported) before 3D embedding or MiniMol's graph, which they could exhaust memory in")
    add(g, "--conformer_timeout", MOLECULES, type=float, default=C.conformer_timeout,
        help="Uni-Mol: seconds of 3D embedding per molecule before it is skipped (reported)")
    g = p.add_argument_group("encoder")
    add(g, "--foundation_model", TRAIN | FEATURIZE, choices=FOUNDATION_MODELS, default=D.foundation_model,
        help="the pretrained encoder (eval/predict/analyze: the run's, from its checkpoint)")
    for weights in WEIGHTS_OPTIONS:
        add(g, f"--{weights.flag}", TRAIN | SCORING | FEATURIZE | ANALYZE, help=weights.help)
    add(g, "--encode_batch_size", ALL, True, type=int, default=E.encode_batch_size,
        help="molecules per frozen encoder forward pass (Uni-Mol; MiniMol: graphs per ONNX call; ECFP takes none)")
    add(g, "--amp", TRAIN | FEATURIZE, choices=["off", "bf16"], default="bf16" if D.amp else "off",
        help="bf16 autocast of the Uni-Mol forward")
    g = p.add_argument_group("fine-tuning the encoder")
    add(g, "--finetune_encoder", TRAIN, action="store_true", help="train part of the encoder with the head")
    add(g, "--encoder_lr", TRAIN, type=float, default=T.encoder_lr, help="learning rate of the encoder parameters")
    add(g, "--freeze_layers", TRAIN, default=D.freeze_layers,
        help="frozen layers (Uni-Mol's 15 transformer layers, MiniMol's 16 message-passing layers): ranges and lists "
             "(0-12, 0-5,7,9-12), none, all; default all but the last two (0-12 for Uni-Mol, 0-13 for MiniMol)")
    add(g, "--finetune_strategy", TRAIN, choices=STRATEGIES, default=D.finetune_strategy,
        help="what trains in the layers --freeze_layers leaves: whole layers, the attention, the FFN, "
             "or LoRA adapters (peft) on linear maps (Uni-Mol: in_proj/out_proj/fc1/fc2); MiniMol: layers or lora")
    add(g, "--lora_rank", TRAIN, type=int, default=D.lora_rank, help="rank r of the LoRA adapters")
    add(g, "--lora_alpha", TRAIN, type=float, default=D.lora_alpha, help="LoRA scale: updates are (alpha/r)·BA")
    add(g, "--lora_dropout", TRAIN, type=float, default=D.lora_dropout,
        help="dropout on the adapters' input; peft's default 0 (at 0.05 LoRA runs at 0.71x the per-step speed of "
             "`layers` on CPU, at 0 faster than `layers`)")
    add(g, "--warmup_epochs", TRAIN, type=int, default=T.warmup_epochs,
        help="linear warm-up of the encoder learning rate")
    add(g, "--lr_schedule", TRAIN, choices=["constant", "cosine"], default=T.lr_schedule,
        help="encoder learning rate after the warm-up (cosine: down to 0 at the end of the last epoch)")
    add(g, "--grad_accum_steps", TRAIN, type=int, default=T.grad_accum_steps, help="micro-batches per optimizer step")
    add(g, "--grad_checkpointing", TRAIN | SCORING, True, action="store_true",
        help="recompute trainable layers in backward")
    g = p.add_argument_group("energy head and loss")
    add(g, "--hidden_dim", TRAIN, type=int, default=D.hidden_dim, help="width of the energy head's first layer")
    add(g, "--head_dropout", TRAIN, type=float, default=D.head_dropout, help="dropout in the energy head")
    add(g, "--loss_type", TRAIN, choices=["dpo", "bce", "mse", "hinge"], default=D.loss_type,
        help="pairwise loss on ID vs OOD energies")
    add(g, "--dpo_beta", TRAIN, type=float, default=D.dpo_beta, help="DPO temperature")
    add(g, "--lambda_reg", TRAIN, type=float, default=D.lambda_reg, help="weight of the energy-magnitude penalty")
    add(g, "--hinge_margin", TRAIN, type=float, default=D.hinge_margin, help="margin of --loss_type hinge")
    g = p.add_argument_group("training")
    add(g, "--epochs", TRAIN, type=int, default=T.epochs,
        help="the epoch budget: early stopping (--patience) ends a run before it; a run it cuts while still improving "
             "is flagged (convergence_warning)")
    add(g, "--batch_size", TRAIN, type=int,
        help=f"per side (default {FROZEN_BATCH_SIZE}; {FINETUNE_BATCH_SIZE} when fine-tuning)")
    add(g, "--eval_batch_size", ALL, True, type=int, help=f"default {FROZEN_EVAL_BATCH_SIZE}; "
        f"{FINETUNE_EVAL_BATCH_SIZE} when fine-tuning; eval/predict: the run's")
    add(g, "--lr", TRAIN, type=float, default=T.lr, help="learning rate of the energy head")
    add(g, "--weight_decay", TRAIN, type=float, default=T.weight_decay, help="AdamW weight decay")
    add(g, "--grad_clip", TRAIN, type=float, default=T.grad_clip, help="max gradient norm")
    add(g, "--patience", TRAIN, type=int, default=T.patience,
        help="epochs without validation gain before stopping; 0 = off")
    add(g, "--seed", TRAIN, type=int, default=T.seed, help="training seed: head initialisation, shuffling, dropout")
    g = p.add_argument_group("runs")
    add(g, "--output_dir", ALL, True,
        help="run directory (default: outputs/<dataset>/<foundation_model>_<loss>_seed<seed>)")
    add(g, "--model_path", SCORING, help="eval/predict: a best_model.pt (its folder is the run)")
    add(g, "--overwrite", ALL, True, action="store_true", help="replace a finished or started run / output file")
    add(g, "--resume", TRAIN | PREDICT, True, action="store_true",
        help="continue an interrupted run from its last.pt, or an interrupted predict after its last complete chunk")
    add(g, "--auto_resume", TRAIN, True, action="store_true",
        help="for schedulers: a finished run exits 0 untouched, an interrupted one resumes from its "
             "last.pt, anything else starts (replacing a started folder without last.pt)")
    add(g, "--device", ALL, True, default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("predict / featurize")
    add(g, "--input", PREDICT | FEATURIZE,
        help=".smi (SMILES, then a name) or .csv (a 'smiles' column, all columns kept)")
    add(g, "--smiles_column", PREDICT | FEATURIZE,
        help="the SMILES column of a .csv --input (default: 'smiles', any case)")
    add(g, "--smiles", PREDICT | FEATURIZE, nargs="+", help="SMILES given on the command line")
    add(g, "--shard", PREDICT, help="predict: I/N scores the I-th of N contiguous slices of the input (array jobs); "
        "the shards' outputs, concatenated in shard order without their repeated headers, equal the unsharded output")
    add(g, "--chunk_rows", PREDICT, type=int, default=PredictJob.chunk_rows,
        help="predict: input rows read, scored and written at a time (bounds memory; the unit of --resume)")
    add(g, "--fdr", PREDICT, type=float, help="predict: is_ood by Benjamini-Hochberg over the input's p-values at "
        "this false-discovery rate, e.g. 0.1 (default: energy above the run's 95%% validation-ID threshold)")
    add(g, "--output", PREDICT | FEATURIZE | PREPARE, help="predict: CSV to write; featurize: .npy; prepare: .json")
    return p


def flag_actions(parser):
    return {a.dest: a for a in parser._actions if hasattr(a, "modes")}


def runtime_flags(parser):  # the flags that change where and how fast, not what (see build_parser)
    return {dest for dest, a in flag_actions(parser).items() if a.runtime}


def given_flags(parser, argv):
    """The destinations of the flags the user typed (argparse fills in the others; words it does not know
    are left to the caller)."""
    unset = object()
    # argparse fills in defaults only for attributes the namespace does not have yet
    namespace = argparse.Namespace(**{dest: unset for dest in flag_actions(parser)})
    parsed, _ = parser.parse_known_args(argv, namespace)
    return {dest for dest, value in vars(parsed).items() if value is not unset}


def _flags(names):
    return ", ".join("--" + f for f in sorted(names))


# ----------------------------------------------------------------------------- checks

def device_form_error(device):
    """The error message for a --device value of no known form, or None (whether this machine has the
    device is resolve_device's question)."""
    if re.fullmatch(DEVICE_FORM, device):
        return None
    return f"--device {device}: expected auto, cpu, cuda or cuda:N"


def resolve_device(device):
    """auto → cuda when there is one; an error message for a device of no known form, or one this machine lacks."""
    error = device_form_error(device)
    if error or device == "cpu":
        return device, error
    import torch  # noqa: PLC0415 - the one heavy import before dispatch: `--help` stays light
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu", None
    if not torch.cuda.is_available():
        return device, f"--device {device}: CUDA is not available on this machine (use --device cpu)"
    return device, None


def check_numbers(args):
    """An error message for a number outside its range, or None."""
    for name in ("epochs", "train_size", "val_size", "test_size", "encode_batch_size", "grad_accum_steps",
                 "chunk_rows", "batch_size", "eval_batch_size"):  # the last two: None = the default
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    if args.hidden_dim < 2:
        return "--hidden_dim must be at least 2 (the head halves it)"
    for name in ("lr", "encoder_lr", "dpo_beta", "grad_clip", "lambda_reg", "weight_decay", "hinge_margin"):
        if not math.isfinite(getattr(args, name)):
            return f"--{name} must be a finite number, not {getattr(args, name)}"
    if args.lr <= 0 or args.encoder_lr <= 0 or args.dpo_beta <= 0 or args.grad_clip <= 0:
        return "--lr, --encoder_lr, --dpo_beta and --grad_clip must be positive"
    if args.lora_rank < 1 or not args.lora_alpha > 0 or not 0 <= args.lora_dropout < 1 or args.warmup_epochs < 0:
        return "--lora_rank must be at least 1, --lora_alpha positive, --lora_dropout in [0, 1), --warmup_epochs ≥ 0"
    if not 0 <= args.head_dropout < 1:
        return "--head_dropout must be in [0, 1)"
    negative = [name for name in ("lambda_reg", "weight_decay", "patience", "num_workers", "data_seed",
                                  "calibration_size")
                if getattr(args, name) < 0]
    if negative:
        return f"--{negative[0]} cannot be negative"
    if args.fdr is not None and not 0 < args.fdr < 1:
        return f"--fdr {args.fdr}: a false-discovery rate is between 0 and 1, e.g. 0.1"
    if args.max_heavy_atoms < 1 or not args.conformer_timeout > 0 or not math.isfinite(args.conformer_timeout):
        return "--max_heavy_atoms and --conformer_timeout must be positive"
    return None


def check_good(args, given):
    """Resolve a GOOD dataset's domain and shift (settings.GoodSpec's defaults); an error message for
    GOOD flags that do not fit, or None."""
    name, gave = good.CLI_DATASETS.get(args.dataset), given & set(GOOD_FLAGS)
    if not name:
        what = f"{_flags(gave)} appl{'y' if len(gave) > 1 else 'ies'} to" if gave else "--mode prepare builds"
        return (f"{what} a GOOD benchmark only: pass --dataset {', '.join(good.CLI_DATASETS)}"
                if gave or args.mode == "prepare" else None)
    args.good_domain, args.good_shift = args.good_domain or GoodSpec.domain, args.good_shift or GoodSpec.shift
    try:
        good.check_choices(name, args.good_domain, args.good_shift)
    except ValueError as exc:
        return f"--good_domain {args.good_domain} --good_shift {args.good_shift}: {exc}"
    return None if args.data_file and Path(args.data_file).is_file() else good.missing_raw_file(name, args.data_file)


def check_encoder(args, given):
    """Resolve --freeze_layers (the encoder's default: all but its last two layers); an error message
    for flags the chosen encoder does not take (train / featurize, which choose it), or None."""
    info = encoder_info(args.foundation_model)
    typed = {flag: getattr(args, flag) for flag in given if flag in ENCODER_FLAGS}
    tuning = sorted(given & {"finetune_encoder", *FINETUNE_ONLY})
    error = flag_error(info, typed, args.finetune_strategy, tuning) if args.mode in TRAIN | FEATURIZE else None
    if error or not info.finetunable:
        return error
    if args.freeze_layers is None:
        args.freeze_layers = info.default_freeze_layers
    try:
        frozen_layers(info, args.freeze_layers, finetuned=args.finetune_encoder)
    except ValueError as exc:
        return str(exc)
    return None


def check_placement(args):
    """The device resolved (auto → what the machine has); an error message for one this machine or a
    torchrun team cannot use, or None."""
    args.device, error = resolve_device(args.device)
    if error or not distributed.launched_by_torchrun():
        return error
    if args.mode not in TEAM_MODES:
        return f"--mode {args.mode} runs in one process; start it with python, not torchrun"
    if args.device not in ("cpu", "cuda"):
        return f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda"
    downloading = [w.flag for w in WEIGHTS_OPTIONS if getattr(args, w.flag) == "download"]
    if downloading:
        return f"--{downloading[0]} download: fetch the checkpoint once first (make weights), not from every process"
    return None


def check_files(args):
    """The files the mode reads and writes: an error message for one missing or in the way, or None."""
    if args.mode in PREDICT | FEATURIZE | PREPARE:
        if not args.output:
            return f"--mode {args.mode} needs --output"
        out = Path(args.output)
        outputs = [out] + ([out.with_suffix(".rows.csv"), out.with_suffix(".failed.csv")]
                           if args.mode == "featurize" else [])
        if out.is_dir():
            return f"--output {out} is a folder; name the file to write"
        existing = [str(p) for p in outputs if p.exists()]
        if existing and not args.overwrite:
            return f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; pass --overwrite to replace"
    if args.output_dir and Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        return f"--output_dir {args.output_dir} is a file, not a folder"
    if args.mode == "eval" and args.data_file and not Path(args.data_file).is_file():
        return f"{args.data_file}: file not found (eval --data_file: a DrugOOD JSON or a CSV with smiles, is_ood)"
    return None


def resolve_training(args):
    """train: the dataset name, data file, batch sizes (by whether the encoder is fine-tuned) and run folder."""
    args.dataset = args.dataset or (Path(args.data_file).stem if args.data_file else DEFAULT_DATASET)
    args.data_file = args.data_file or f"./data/raw/{args.dataset}.json"
    batch, eval_batch = ((FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE) if args.finetune_encoder
                         else (FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE))
    args.batch_size = args.batch_size or batch
    args.eval_batch_size = args.eval_batch_size or eval_batch
    args.output_dir = args.output_dir or (f"outputs/{benchmark_name(vars(args))}/"
                                          f"{args.foundation_model}_{args.loss_type}_seed{args.seed}")
    return None if Path(args.data_file).is_file() else missing_data_file(args.data_file)


def check_weights(args):
    """The chosen encoder's weights file (train / featurize: its default place when not given); an error
    message for a weights file that is not there, or None."""
    info = encoder_info(args.foundation_model)
    if info.weights and args.mode in TRAIN | FEATURIZE:
        setattr(args, info.weights.flag, getattr(args, info.weights.flag) or info.weights.default_path())
    for weights in WEIGHTS_OPTIONS:
        path = getattr(args, weights.flag)
        if path not in (None, "random", "download") and not Path(path).is_file():
            return weights.missing(path)
    return None


def validate(args, given, parser):
    """Resolve defaults in `args` and reject inconsistent flags; returns an error message or None."""
    accepted = {dest for dest, a in flag_actions(parser).items() if args.mode in a.modes}
    if args.mode == "eval" and not args.data_file and given & set(CROSS_EVAL_FLAGS):
        return (f"--mode eval re-scores the run's own test split with the run's data settings; "
                f"{_flags(given & set(CROSS_EVAL_FLAGS))} apply only to another benchmark given with --data_file")
    if given - accepted:
        source = " (they come from the run's checkpoint)" if args.mode in SCORING else ""
        return f"--mode {args.mode} does not use {_flags(given - accepted)}{source}"
    error = check_numbers(args) or check_good(args, given) or check_encoder(args, given)
    if error:
        return error
    if args.mode == "train" and given & set(FINETUNE_ONLY) and not args.finetune_encoder:
        return f"{_flags(given & set(FINETUNE_ONLY))} apply to fine-tuning only: add --finetune_encoder"
    if given & set(LORA_ONLY) and args.finetune_strategy != "lora":
        return f"{_flags(given & set(LORA_ONLY))} apply to --finetune_strategy lora only"
    if sum((args.resume, args.overwrite, args.auto_resume)) > 1:
        return "--resume, --auto_resume and --overwrite contradict each other; pass one"
    error = check_placement(args)
    if error:
        return error
    if args.mode in ("compare", "analyze") and not args.output_dir:
        return f"--mode {args.mode} needs --output_dir SWEEP/<dataset> (holding frozen/seed*/ and <arm>/seed*/)"
    if args.mode in SCORING and not (args.output_dir or args.model_path):
        return f"--mode {args.mode} needs --output_dir RUN or --model_path RUN/best_model.pt"
    if args.shard is not None:
        parts = args.shard.split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
            return f"--shard {args.shard}: expected I/N with 1 ≤ I ≤ N, e.g. 1/4"
    if args.mode in PREDICT | FEATURIZE and bool(args.input) == bool(args.smiles):
        return f"--mode {args.mode} needs exactly one of --input FILE or --smiles ..."
    error = check_files(args) or (resolve_training(args) if args.mode == "train" else None)
    return error or check_weights(args)


def check_arguments(argv, stand_ins=()):
    """The one-line error the command line would give for `argv` (parsing included), or None; nothing is
    created. `stand_ins`: {flag: value} replacing a flag's value for the check (a planner checks a run
    whose device and weights belong to the machine that will run it, for their form only)."""
    parser = build_parser()
    parser.exit_on_error = False
    stand_ins = dict(stand_ins)
    for before, word in zip(argv, argv[1:]):
        if before == "--device" and device_form_error(word):
            return device_form_error(word)
    argv = [stand_ins.get(before, word) for before, word in zip((None, *argv), argv)]
    argv += [] if "--device" in argv else ["--device", stand_ins.get("--device", "cpu")]
    try:
        args, unknown = parser.parse_known_args(argv)
    except Exception as exc:  # noqa: BLE001 - argparse's ArgumentError and friends: a bad value
        return str(exc)
    if unknown:
        return f"main.py does not know {' '.join(unknown)} (python main.py --help)"
    return validate(args, given_flags(parser, argv), parser)


def typed_flags(argv, names):
    """{flag: value} of the flags among `names` that `argv` gives, as parsed; {} when it does not parse (then
    check_arguments says why)."""
    parser = build_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
        given = given_flags(parser, argv)
    except Exception:  # noqa: BLE001 - argparse's errors: a bad value, reported by check_arguments
        return {}
    return {flag: getattr(args, flag) for flag in names if flag in given}


# ----------------------------------------------------------------------------- flags → typed settings

@dataclasses.dataclass
class Command:
    """A checked command line: its mode, what to fetch before it runs, and its typed settings (job)."""
    mode: str
    device: str  # resolved: auto is cuda or cpu
    fetch: tuple  # WeightsOptions to download into their default place first (--mode weights, --<flag> download)
    args: argparse.Namespace
    given: set
    parser: argparse.ArgumentParser

    @property
    def logged(self):
        return self.mode in LOGGED_MODES

    def jobs(self, device, fetched):
        """The mode's typed settings, as the positional arguments of its runner (pipeline / predict), once
        the process knows its device (a torchrun rank's own) and the downloads' paths ({flag: path})."""
        args, given, mode = self.args, self.given, self.mode
        args.device = device
        for flag, path in fetched.items():
            setattr(args, flag, path)
        if mode == "train":
            return (train_job(args, self.parser),)
        if mode == "eval":
            return score_job(args, given), other_benchmark(args, given)
        if mode == "predict":
            return score_job(args, given), predict_job(args)
        if mode == "featurize":
            return (featurize_job(args),)
        if mode == "prepare":
            return (PrepareJob(good_spec(vars(args)), args.data_file, Path(args.output)),)
        if mode == "compare":
            return (Path(args.output_dir),)
        return (score_job(args, given),)  # analyze


class UsageError(Exception):
    """A command line that does not fit: one line, exit status 2."""


def parse(argv):
    """The Command `argv` asks for; UsageError for one that does not fit (argparse's own errors exit 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    error = validate(args, given, parser)
    if error:
        raise UsageError(error)
    fetch = tuple(w for w in WEIGHTS_OPTIONS if args.mode == "weights" or getattr(args, w.flag) == "download")
    return Command(args.mode, args.device, fetch, args, given, parser)


def _fields(cls, args, **renamed):
    """cls(...) from the flags named like its fields (and `renamed`: field=value)."""
    names = {f.name for f in dataclasses.fields(cls)} - set(renamed)
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **renamed)


def encoder_settings(args):
    return EncoderSettings({flag: getattr(args, flag) for flag in BUILD_OPTIONS}, args.encode_batch_size)


def resume_ignores(args, parser):
    """Flags that may differ when a run is resumed: the runtime ones, and those that do not apply to
    it (a frozen run's fine-tuning flags, the LoRA flags of another strategy), whose defaults may
    have changed since it started."""
    ignored = runtime_flags(parser)
    if not args.finetune_encoder:
        ignored |= set(FINETUNE_ONLY)
    if args.finetune_strategy != "lora":
        ignored |= set(LORA_ONLY)
    return ignored


def train_job(args, parser):
    flags = vars(args)
    return TrainJob(data=_fields(DataSpec, args, dataset=benchmark_name(flags), good=good_spec(flags)),
                    molecules=MoleculeSettings.from_flags(flags), encoder=encoder_settings(args),
                    model=ModelSpec.from_flags(flags), train=_fields(TrainConfig, args),
                    run=RunFolder(Path(args.output_dir), args.overwrite, args.resume, args.auto_resume),
                    flags=dict(flags), flag_defaults=vars(parser.parse_args([])),
                    resume_ignores=frozenset(resume_ignores(args, parser)))


def given_value(args, given, name):
    """The flag's value if the user gave it, else None (for eval / predict / analyze: the run's own)."""
    return getattr(args, name) if name in given else None


def score_job(args, given):
    """eval / predict / analyze: what the user gave; None (or no entry) wherever the run's own value applies."""
    where = Path(args.model_path) if args.model_path else Path(args.output_dir) / "best_model.pt"
    molecules = {f: getattr(args, f) for f in ("cache_dir", "num_workers", "max_heavy_atoms", "conformer_timeout")
                 if f in given} | {"force": args.force_recompute_cache}
    scoring = ScoringSettings(*(given_value(args, given, f) for f in ("eval_batch_size", "encode_batch_size")))
    return ScoreJob(path=Path(args.output_dir) if args.mode == "analyze" else where,
                    encoder_flags={flag: getattr(args, flag) for flag in BUILD_OPTIONS if flag in given},
                    molecules=molecules, scoring=scoring, device=args.device, overwrite=args.overwrite)


def predict_job(args):
    shard = tuple(map(int, args.shard.split("/"))) if args.shard else None
    return PredictJob(input=args.input, smiles=args.smiles, smiles_column=args.smiles_column, output=Path(args.output),
                      shard=shard, resume=args.resume, overwrite=args.overwrite, chunk_rows=args.chunk_rows,
                      fdr=args.fdr)


def featurize_job(args):
    flags = vars(args)
    return FeaturizeJob(input=args.input, smiles=args.smiles, smiles_column=args.smiles_column,
                        output=Path(args.output), encoder=encoder_settings(args),
                        molecules=MoleculeSettings.from_flags(flags), model=ModelSpec.from_flags(flags),
                        device=args.device)


def other_benchmark(args, given):
    if not args.data_file:
        return None
    flags = vars(args)
    return OtherBenchmark(args.data_file, benchmark_name(flags) if args.dataset else Path(args.data_file).stem,
                          given_value(args, given, "test_size"), given_value(args, given, "data_seed"),
                          good_spec(flags))

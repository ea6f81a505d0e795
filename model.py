"""The Energy-DPO model: the MLP energy head, its losses, the model (the head, with the encoder when
it is fine-tuned), and self-describing checkpoints. The encoders live in encoders/."""
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from encoders import BUILD_OPTIONS, build_encoder, public_class, weights_flag
from encoders.base import load_weights_only
from settings import ModelSpec, MoleculeSettings, TrainConfig
from utils import InputError, atomic_path


def __getattr__(name):
    """The encoders' public classes (UniMolEncoder, FinetunableUniMolEncoder, MiniMolEncoder, ...), importable
    from here as the design shows them (`from model import UniMolEncoder`); each loads with its encoder."""
    try:
        return public_class(name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


class EnergyHead(nn.Module):
    """width → h → h/2 → 1 MLP (width: the encoder's features, e.g. 512 for Uni-Mol, 2048 for ECFP);
    higher energy means more out-of-distribution."""

    def __init__(self, in_dim=512, hidden_dim=256, dropout=0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim // 2), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden_dim // 2, 1))

    def forward(self, features):
        return self.net(features).squeeze(-1)


def energy_loss(e_id, e_ood, loss_type="dpo", beta=0.1, lambda_reg=0.01, margin=1.0):
    """Loss over a batch of ID and OOD energies; pairwise losses use all n×m pairs."""
    delta = e_ood[None, :] - e_id[:, None]
    if loss_type == "dpo":
        main = F.softplus(-beta * delta).mean()  # = -log sigmoid(beta * delta)
    elif loss_type == "hinge":
        main = F.relu(margin - delta).mean()
    elif loss_type == "bce":
        logits = torch.cat([e_id, e_ood])
        main = F.binary_cross_entropy_with_logits(logits, torch.cat([torch.zeros_like(e_id), torch.ones_like(e_ood)]))
    elif loss_type == "mse":
        main = F.mse_loss(torch.sigmoid(e_id), torch.zeros_like(e_id)) + \
            F.mse_loss(torch.sigmoid(e_ood), torch.ones_like(e_ood))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return main + lambda_reg * (e_id.pow(2).mean() + e_ood.pow(2).mean())


@torch.no_grad()
def pair_diagnostics(e_id, e_ood):
    delta = e_ood[None, :] - e_id[:, None]
    return {"misranked": (delta < 0).float().mean().item(), "margin": delta.mean().item(),
            "e_id": e_id.mean().item(), "e_ood": e_ood.mean().item()}


class EnergyDPOModel(nn.Module):
    """The energy head with its loss settings (a ModelSpec), and its encoder.

    forward() takes a batch of frozen features (a tensor) or, when the encoder is fine-tuned, a batch
    of the encoder's own inputs (conformers, graphs or cached prefix states). A frozen run trains on
    cached features and needs no encoder here (encoder=None); built from settings or loaded from a
    checkpoint, the model holds its encoder, frozen or fine-tuned, and score_smiles scores SMILES."""

    def __init__(self, spec, encoder=None, seed=0):
        super().__init__()
        if spec.finetune_encoder != (encoder is not None and encoder.trains):
            raise ValueError("a fine-tuned model needs its fine-tunable encoder; a frozen model's encoder "
                             "does not train")
        if encoder is not None and encoder.weights_id != spec.encoder_weights:
            raise ValueError(f"encoder {encoder.weights_id} is not the model's {spec.encoder_weights}")
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the head's initial weights depend on the training seed only
            self.head = EnergyHead(spec.in_dim, spec.hidden_dim, spec.head_dropout)
        self.encoder = encoder
        self.loss_kwargs = dict(loss_type=spec.loss_type, beta=spec.dpo_beta, lambda_reg=spec.lambda_reg,
                                margin=spec.hinge_margin)

    @classmethod
    def from_settings(cls, settings, weights=None, seed=None, grad_checkpointing=None):
        """The model the settings describe, with its encoder: FinetunableUniMolEncoder(freeze_layers=...)
        when `finetune_encoder` and `foundation_model` is 'unimol', the frozen UniMolEncoder() when not
        fine-tuned (and the other encoders' forms likewise). `settings`: a ModelSpec, or flags named
        like its fields (an argparse Namespace of the command line's flags, or a dict). `weights` (the
        encoder's weights file where it takes one, e.g. Uni-Mol's checkpoint path or 'random'), `seed` (of
        the head's initial weights) and `grad_checkpointing`: when not given, the flags' (--unimol_weights,
        --seed, --grad_checkpointing), else the command line's defaults (the default place, seed 42, off)."""
        flags = {} if isinstance(settings, ModelSpec) else settings if isinstance(settings, dict) else vars(settings)
        spec = settings if isinstance(settings, ModelSpec) else ModelSpec.from_flags(flags)
        options = {flag: flags.get(flag) for flag in BUILD_OPTIONS}
        if weights is not None:
            options[weights_flag(spec.encoder)] = weights
        if grad_checkpointing is not None:
            options["grad_checkpointing"] = grad_checkpointing
        seed = flags.get("seed", TrainConfig.seed) if seed is None else seed
        encoder = build_encoder(spec, **options)
        return cls(dataclasses.replace(spec, encoder_weights=encoder.weights_id, in_dim=encoder.width), encoder, seed)

    @property
    def finetune_encoder(self):
        return self.spec.finetune_encoder

    @property
    def foundation_model(self):
        return self.spec.foundation_model

    @property
    def freeze_layers(self):
        """The frozen encoder layers as --freeze_layers writes them (None for a frozen model)."""
        return (self.spec.freeze_layers or self.spec.encoder.default_freeze_layers) if self.finetune_encoder else None

    def forward(self, batch):
        """Energies of frozen features (a tensor) or of a batch of the fine-tuned encoder's inputs."""
        return self.head(batch if isinstance(batch, torch.Tensor) else self.encoder.forward_chunks(batch))

    def score_smiles(self, smiles, settings=None, device=None):
        """Energies (n,) of SMILES as written, through encoder.encode_smiles (MoleculeSettings:
        caches and molecule limits); higher is more out-of-distribution. With autograd when the
        encoder is fine-tuned; a finished run's threshold and warnings: scoring.load_run."""
        features = self.encoder.encode_smiles(smiles, settings or MoleculeSettings(), device=device)
        return self.head(features.to(next(self.head.parameters()).device))

    def loss(self, e_id, e_ood):
        return energy_loss(e_id, e_ood, **self.loss_kwargs)

    def checkpoint_state(self):
        """Head weights and, when fine-tuning, only the encoder tensors that train."""
        state = {"head": self.head.state_dict()}
        if self.finetune_encoder:
            state["encoder_trainable"] = self.encoder.trainable_state()
        return state

    def load_checkpoint_state(self, state, source):
        if self.finetune_encoder != ("encoder_trainable" in state):
            raise InputError(f"{source}: checkpoint and model disagree on whether the encoder was fine-tuned")
        try:
            self.head.load_state_dict(state["head"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise InputError(f"{source}: its head weights do not fit a {self.spec.hidden_dim}-wide head "
                             f"({str(exc).splitlines()[0][:150]})") from None
        if self.finetune_encoder:
            self.encoder.load_trainable_state(state["encoder_trainable"], source)


def save_checkpoint(path, payload):
    """torch.save through the atomic write: a crash or a full disk never leaves half a checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path):
    """A checkpoint's payload, loaded without executing code; a broken file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such checkpoint; train first (--mode train) or pass --model_path")
    state = load_weights_only(path, "a checkpoint of this tool", "restore the run's own file, or train it again")
    if not isinstance(state, dict) or not {"model_spec", "model"} <= set(state):
        raise InputError(f"{path}: not a checkpoint of this tool (no model_spec / model entries); "
                         f"it may predate self-describing checkpoints: retrain the run")
    return state


def load_model(path, options=None, state=None):
    """Rebuild the model a checkpoint describes, with its encoder built with `options` (its build options,
    e.g. {"unimol_weights": a path or 'random'}); refuse weights other than those it was trained on.
    `state`: the checkpoint's payload when the caller has loaded it already. Returns (model, encoder,
    payload)."""
    state = load_checkpoint(path) if state is None else state
    try:
        spec = ModelSpec(**state["model_spec"])
    except TypeError as exc:
        raise InputError(f"{path}: unreadable model_spec ({exc})") from None
    encoder = build_encoder(spec, **(options or {}))
    if encoder.weights_id != spec.encoder_weights:
        raise InputError(f"{path} was trained on encoder {spec.encoder_weights}, "
                         f"but the encoder loaded now is {encoder.weights_id}")
    model = EnergyDPOModel(spec, encoder)
    model.load_checkpoint_state(state["model"], path)
    return model, encoder, state

"""What an encoder is: the interface every encoder implements, and what the implementations share.

An encoder (encoders/<name>.py) has a frozen form, a subclass of Encoder, and where it can be
fine-tuned a fine-tunable form, a subclass of the frozen one with the same interface. Callers use
only what is written here:

  who it is        info (its EncoderInfo), identity / weights_id, is_random_init, width, trains,
                   total_params
  molecules        prepare(smiles, settings) → ({SMILES: entry}, {SMILES: why not}): the molecule limits,
                   then its own prepare_within through its own cache; describe_inputs(report, ...) adds
                   what data_report.json says of them
  frozen features  encode(entries, batch_size, device) → (n, width) float32 array; store_dir /
                   store_meta say where, and on what, the feature cache of its features depends
  fine-tuning      role_inputs(entries) (batches of whole inputs), prefix_states / prefix_inputs (the
                   frozen prefix run once and cached), forward_chunks(batch) → (n, width) tensor,
                   trainable_state / load_trainable_state, layer_of(parameter name), base_weights()
  Python use       encode_smiles(smiles) → (n, width) tensor in input order

Molecules are always SMILES as written: their atom order seeds Uni-Mol's conformer and MiniMol's
Laplacian basis, so a molecule written another way is another cache entry."""
import pickle

import numpy as np
import torch
import torch.nn as nn

from molecules import canonicalize, parse_within
from settings import RANDOM_INIT_SEED, EncoderSettings, MoleculeSettings, parse_freeze_spec
from utils import InputError

BATCH = EncoderSettings.encode_batch_size


class Encoder(nn.Module):
    """An encoder's frozen form; a fine-tunable form overrides the fine-tuning part."""
    info = None  # its EncoderInfo (encoders/__init__.py)
    # Whether it is a fine-tunable form, whose features change as it trains: never cached as frozen
    # features (a class fact, not requires_grad, which a user may switch off to run it for inference)
    trains = False

    def __init__(self, identity):
        super().__init__()
        self.training = False  # encoders start in eval mode; each form calls eval() once its parts exist
        self.identity = identity
        self.frozen_layers = frozenset(range(self.info.n_layers))
        self.frozen_prefix = self.info.n_layers  # leading frozen layers: run once, cacheable
        self.strategy = None  # what trains in the layers that are not frozen (fine-tunable forms)

    # ------------------------------------------------------------------ who it is
    @property
    def weights_id(self):
        return self.identity.text

    @property
    def is_random_init(self):
        return self.identity.is_random_init

    @property
    def width(self):
        return self.info.width

    @property
    def total_params(self):
        return sum(p.numel() for p in self.parameters())

    def frozen_twin(self):
        """The frozen form on the same base weights (itself when it is frozen): baselines and analyze
        compare a fine-tuned encoder with it."""
        return self

    def frozen_modules(self):
        """The parts that never train: they always run in eval mode (no dropout)."""
        return list(self.children())

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------------ molecules and frozen features
    def prepare(self, smiles, settings=MoleculeSettings()):
        """({SMILES: its input entry}, {SMILES: why it has none}) for SMILES as written. A molecule that
        does not parse or is above settings.max_heavy_atoms fails before any cache is read: the limit
        holds for molecules an earlier run cached too."""
        within, failures = [], {}
        for s in dict.fromkeys(smiles):
            try:
                parse_within(s, settings.max_heavy_atoms)
                within.append(s)
            except ValueError as exc:
                failures[s] = str(exc)
        prepared, more = self.prepare_within(within, settings)
        return prepared, failures | more

    def prepare_within(self, smiles, settings):
        """prepare() for SMILES already checked to parse within the limits (each encoder's own)."""
        raise NotImplementedError

    def describe_inputs(self, report, prepared, smiles):
        """Add to a data report what it should say about these molecules' inputs (e.g. fallbacks)."""

    def store_dir(self, cache_dir, what):
        """The cache folder of its frozen features (what='features') or frozen-prefix states ('prefix')."""
        raise NotImplementedError

    def store_meta(self, what):
        """What those caches depend on (their meta.json: a change clears them)."""
        raise NotImplementedError

    def store_check(self, what):
        """A function raising ValueError for a stored entry of those caches that is damaged in a way
        only this encoder can tell (store.store_get), or None."""
        return None

    def encode(self, entries, batch_size=BATCH, device="cpu"):
        """(n, width) float32 frozen features of prepared entries, in order."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fine-tuning (fine-tunable forms)
    def role_inputs(self, entries):
        """A role's whole inputs, batched for running inside the model (see batching.py)."""
        raise NotImplementedError(f"{self.info.label} is frozen here: it does not run inside the model")

    def prefix_states(self, entries, batch_size=BATCH, device="cpu"):
        """Per entry, the state after the frozen prefix as {name: array} (first axis may vary)."""
        raise NotImplementedError(f"{self.info.label} is frozen here: it has no frozen prefix to cache")

    def prefix_inputs(self, states):
        """A role's cached prefix states, batched for the trainable layers."""
        raise NotImplementedError(f"{self.info.label} is frozen here: it has no frozen prefix to cache")

    def forward_chunks(self, batch):
        """(n, width) features of one batch of role_inputs / prefix_inputs, in the batch's order."""
        raise NotImplementedError(f"{self.info.label} is frozen here: it does not run inside the model")

    def trainable_network(self):
        """The module whose parameter names a checkpoint's encoder tensors and analyze use."""
        raise NotImplementedError(f"{self.info.label} is frozen here: nothing in it trains")

    def trainable_state(self):
        """The tensors that train: all a fine-tuned checkpoint needs beside the base weights."""
        return {k: v.detach().cpu().clone() for k, v in self.trainable_network().named_parameters()
                if v.requires_grad}

    def load_trainable_state(self, state, source):
        network = self.trainable_network()
        expected = {k for k, v in network.named_parameters() if v.requires_grad}
        if set(state) != expected:
            raise InputError(f"{source}: its fine-tuned encoder tensors do not match --freeze_layers / "
                             f"--finetune_strategy ({len(set(state) ^ expected)} differ, e.g. "
                             f"{sorted(set(state) ^ expected)[:3]})")
        try:
            network.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise InputError(f"{source}: its fine-tuned encoder tensors do not fit "
                             f"({str(exc).splitlines()[0][:150]})") from None

    @staticmethod
    def layer_of(name):
        """The --freeze_layers layer (or other part) a trainable parameter belongs to, as analyze names it."""
        raise NotImplementedError

    def base_weights(self):
        """The pretrained weights as arrays, named as trainable_state names its tensors."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Python use
    def encode_smiles(self, smiles, settings=None, batch_size=BATCH, device=None):
        """(n, width) float32 tensor of SMILES as written, in input order, through the caches in
        settings.cache_dir (MoleculeSettings: ./cache by default).

        A frozen encoder gives the features `--mode featurize` writes, without autograd. A
        fine-tunable one runs its layers in one pass with autograd on (in train mode with dropout, in
        eval mode without), so gradients reach exactly its trainable parameters. A SMILES that cannot
        be prepared is an InputError naming it; prepare_rows() tells which rows fail instead."""
        smiles = [smiles] if isinstance(smiles, str) else list(smiles)
        written, prepared, failed = prepare_rows(self, smiles, settings or MoleculeSettings())
        if failed:
            row, reason = next(iter(failed.items()))
            raise InputError(f"SMILES {row} ({smiles[row]!r}) has no {self.info.label} {self.info.inputs}: {reason}"
                             f"{f' ({len(failed)} of {len(smiles)} failed)' if len(failed) > 1 else ''}")
        entries = [prepared[written[row]] for row in range(len(smiles))]
        device = device or next(self.parameters(), torch.empty(0)).device
        if not self.trains:
            return torch.from_numpy(self.encode(entries, batch_size, device))
        self.to(device)
        return self.forward_chunks(self.role_inputs(entries).batch(torch.arange(len(entries)), device))


def prepare_rows(encoder, smiles, settings=MoleculeSettings()):
    """User-given SMILES → ({row: SMILES as written}, {SMILES: input entry}, {row: why not}): each
    row's SMILES stripped and checked to parse, each distinct one prepared once."""
    written, failed = {}, {}
    for row, raw in enumerate(smiles):
        value, reason = canonicalize(raw.strip())
        if value is None:
            failed[row] = reason
        else:
            written[row] = raw.strip()
    prepared, failures = encoder.prepare(list(dict.fromkeys(written.values())), settings)
    for row in [r for r, s in written.items() if s in failures]:
        failed[row] = failures[written.pop(row)]
    return written, prepared, failed


def load_weights_only(path, what, remedy):
    """torch.load of a file a user hands in, never executing code: a file that holds Python objects
    beyond tensors and plain containers, or is no torch file at all, is a one-line InputError naming
    it as `what` and saying `remedy` (never torch's advice to load it with code execution)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise InputError(f"{path}: not a plain weights file: it holds Python objects that only code execution "
                             f"could load, and this tool never loads a file that way; {remedy}") from None
        raise InputError(f"{path}: not {what} ({str(exc).splitlines()[0][:120]}); {remedy}") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"{path}: not {what} ({str(exc).splitlines()[0][:120]}); {remedy}") from None


def add_lora(network, targets, lora):
    """peft LoRA adapters on the linear maps `targets` of `network`; only the adapters train. The
    A matrices are seeded, B starts at zero: the adapters start as a no-op."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - only LoRA runs need peft
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        inject_adapter_in_model(config, network)
    for name, param in network.named_parameters():
        param.requires_grad_("lora_" in name)


def frozen_layer_set(freeze_layers, info):
    """The frozen layer indices a fine-tunable form is given: a --freeze_layers spec ('0-12', 'none'),
    a collection of indices, or None (all but the last two layers), checked against its layers."""
    if freeze_layers is None:
        freeze_layers = info.default_freeze_layers
    if isinstance(freeze_layers, str):
        try:
            frozen = parse_freeze_spec(freeze_layers, info.n_layers)
        except ValueError as exc:
            raise InputError(f"{exc} ({info.label})") from None
    else:
        frozen = sorted({int(i) for i in freeze_layers})
        outside = [i for i in frozen if not 0 <= i < info.n_layers]
        if outside:
            raise InputError(f"freeze_layers {outside}: outside {info.label}'s layers 0-{info.n_layers - 1}")
    if len(frozen) == info.n_layers:
        raise InputError(f"freeze_layers {freeze_layers!r} leaves no {info.label} layer to fine-tune")
    return frozenset(frozen)


def as_float_array(rows, width):
    """Rows as one (n, width) float32 array (an empty one for no rows)."""
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)

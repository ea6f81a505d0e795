"""What an encoder is: the two protocols every encoder's forms follow, and what their implementations share.

An encoder (encoders/<name>.py) has a frozen form, which follows FrozenEncoder, and where it can be
fine-tuned a fine-tunable form, which follows FinetunableEncoder as well (its subclass, with the same
frozen interface). Callers use only what the protocols name; `encoder.trains` tells the two apart.

Molecules are always SMILES as written: their atom order seeds Uni-Mol's conformer and MiniMol's
Laplacian basis, so a molecule written another way is another cache entry."""
import pickle
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from encoders import EncoderId, EncoderInfo, frozen_layers, strategy_error
from molecules import canonicalize, parse_within
from settings import EncoderSettings, LoraSpec, ModelSpec, MoleculeSettings
from utils import InputError

BATCH = EncoderSettings.encode_batch_size
LORA_INIT_SEED = 0  # the seed of the LoRA adapters' A matrices (B starts at zero: a no-op at step 0)


class FrozenEncoder(Protocol):
    """An encoder that turns prepared molecules into features, unchanged by training (every encoder's
    frozen form; Python users call encode_smiles)."""
    info: EncoderInfo  # the registry's description (encoders/__init__.py)
    identity: EncoderId  # which weights make its numbers
    trains: bool  # False: its features are cached as frozen features; True: a FinetunableEncoder

    def prepare(self, smiles, settings: MoleculeSettings) -> tuple:
        """({SMILES: input entry}, {SMILES: why it has none}) for SMILES as written, through its own cache;
        the molecule limits first (EncoderModule.prepare does this and calls prepare_within)."""

    def input_report(self, prepared, smiles) -> dict:
        """What data_report.json says of these molecules' inputs (e.g. fallbacks), as {field: value}."""

    def store_dir(self, cache_dir, what): """The cache folder of its frozen features (what='features')."""

    def store_meta(self, what) -> dict: """What that cache depends on (its meta.json: a change clears it)."""

    def encode(self, entries, batch_size, device) -> np.ndarray:
        """(n, width) float32 frozen features of prepared entries, in order."""

    def frozen_twin(self) -> "FrozenEncoder":
        """The frozen form on the same base weights (itself when frozen): baselines compare with it."""

    def encode_smiles(self, smiles, settings=None, batch_size=BATCH, device=None) -> torch.Tensor:
        """(n, width) features of SMILES as written, in input order (EncoderModule)."""


class FinetunableEncoder(FrozenEncoder, Protocol):
    """An encoder that runs inside the model with part of its layers trainable. Its leading frozen
    layers (frozen_prefix of them) run once per molecule and are cached."""
    frozen_layers: frozenset  # the --freeze_layers indices
    frozen_prefix: int  # leading frozen layers: run without autograd, cacheable
    strategy: str  # what trains in the other layers (--finetune_strategy)

    def role_inputs(self, entries): """A role's whole inputs, batched for running inside the model (batching.py)."""

    def prefix_states(self, entries, batch_size, device) -> list:
        """Per entry, the state after the frozen prefix as {name: array} (the first axis may vary)."""

    def prefix_inputs(self, states): """A role's cached prefix states, batched for the trainable layers."""

    def check_prefix_state(self, entry):
        """Raise ValueError for a stored prefix state that is damaged (the prefix cache's check on read)."""

    def forward_chunks(self, batch) -> torch.Tensor:
        """(n, width) features of one batch of role_inputs / prefix_inputs, in the batch's order."""

    def trainable_network(self) -> nn.Module:
        """The module whose parameter names a checkpoint's encoder tensors and analyze use."""

    def trainable_state(self) -> dict: """The tensors that train: all a checkpoint needs beside the base weights."""

    def load_trainable_state(self, state, source): """Load trainable_state's tensors (InputError if they do not fit)."""

    def layer_of(self, name) -> str:
        """The --freeze_layers layer (or other part) a trainable parameter belongs to, as analyze names it."""

    def base_weights(self) -> dict: """The pretrained weights as arrays, named as trainable_state names its tensors."""


# ----------------------------------------------------------------------------- what every form shares

class EncoderModule(nn.Module):
    """What every encoder's frozen form shares: who it is, the molecule limits before its own
    prepare_within, eval mode for the parts that never train, and encode_smiles."""
    info = None  # its EncoderInfo
    # A class fact, not requires_grad (which a user may switch off to run a fine-tunable form for
    # inference): a form that trains never has its features cached as frozen features
    trains = False

    def __init__(self, identity):
        super().__init__()
        self.training = False  # encoders start in eval mode; each form calls eval() once its parts exist
        self.identity = identity

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
        return self

    def frozen_modules(self):
        """The parts that never train: they always run in eval mode (no dropout)."""
        return list(self.children())

    def train(self, mode=True):
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def prepare(self, smiles, settings=MoleculeSettings()):
        """FrozenEncoder.prepare: a molecule that does not parse or is above settings.max_heavy_atoms fails
        before any cache is read (the limit holds for molecules an earlier run cached too); the others go
        to the encoder's own prepare_within(smiles, settings)."""
        within, failures = [], {}
        for s in dict.fromkeys(smiles):
            try:
                parse_within(s, settings.max_heavy_atoms)
                within.append(s)
            except ValueError as exc:
                failures[s] = str(exc)
        prepared, more = self.prepare_within(within, settings)
        return prepared, failures | more

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


class Finetuning:
    """What the fine-tunable forms share (a mixin before their frozen form): which layers train and by
    which strategy, checked once, and their trainable tensors in and out of checkpoints."""
    trains = True

    def setup_finetuning(self, freeze_layers, strategy, lora):
        """Check and record the frozen layers (FinetunableEncoder.frozen_layers: a spec, indices or None),
        the strategy and the LoRA settings (None: peft's defaults); returns the trainable layer indices."""
        n_layers = self.info.n_layers
        error = strategy_error(self.info, strategy)
        if error:
            raise InputError(error)
        try:
            self.frozen_layers = frozen_layers(self.info, freeze_layers)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        self.strategy, self.lora = strategy, lora or ModelSpec().lora
        self.frozen_prefix = next((i for i in range(n_layers) if i not in self.frozen_layers), n_layers)
        return [i for i in range(n_layers) if i not in self.frozen_layers]

    def trainable_state(self):
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


def prepare_rows(encoder, smiles, settings=MoleculeSettings()):
    """User-given SMILES → ({row: SMILES as written}, {SMILES: input entry}, {row: why not}): each
    row's SMILES stripped and checked to parse, each distinct one prepared once; a row that is no
    string (None, a number) fails, named."""
    written, failed = {}, {}
    for row, raw in enumerate(smiles):
        if not isinstance(raw, str):
            failed[row] = f"not a SMILES string but {type(raw).__name__} {raw!r:.40}"
            continue
        value, reason = canonicalize(raw.strip())
        if value is None:
            failed[row] = reason
        else:
            written[row] = raw.strip()
    prepared, failures = encoder.prepare(list(dict.fromkeys(written.values())), settings)
    for row in [r for r, s in written.items() if s in failures]:
        failed[row] = failures[written.pop(row)]
    return written, prepared, dict(sorted(failed.items()))


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


def add_lora(network, targets, lora: LoraSpec):
    """peft LoRA adapters on the linear maps `targets` of `network`; only the adapters train. The
    A matrices are seeded, B starts at zero: the adapters start as a no-op."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415 - only LoRA runs need peft
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LORA_INIT_SEED)
        inject_adapter_in_model(config, network)
    for name, param in network.named_parameters():
        param.requires_grad_("lora_" in name)


def as_float_array(rows, width):
    """Rows as one (n, width) float32 array (an empty one for no rows)."""
    return np.concatenate(rows).astype(np.float32) if rows else np.zeros((0, width), np.float32)

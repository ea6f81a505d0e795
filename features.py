"""Molecules → what the model consumes, through the on-disk caches, per encoder.

Uni-Mol: conformers (data.get_conformers), then frozen features or frozen-prefix states, cached per
(encoder weights, preprocessing version, precision). MiniMol: fingerprints of its 2D graphs, cached
per (ONNX file, featuriser settings). Every cache is keyed by the SMILES as written: a molecule
written another way is another entry, because its atom order seeds the conformer (Uni-Mol) and
the Laplacian basis (MiniMol)."""
import functools
import logging
from pathlib import Path

import numpy as np

import distributed
from data import PREPROCESS_VERSION, get_conformers, in_workers, parse_within
from minimol import featurizer_id, graph_arrays
from model import ConformerInputs, FeatureInputs, GraphInputs, GraphPrefixInputs, PrefixInputs, finetuning
from settings import ENCODER_NAMES, ConformerSettings, EncoderSettings, ModelSpec
from store import cached_entries
from utils import InputError, progress

BATCH = EncoderSettings.encode_batch_size
log = logging.getLogger("energy_dpo.features")
PREFIX_CHUNK = 512  # molecules per prefix-cache shard: bounds the memory of one write


def _store_tag(encoder):
    identity = encoder.identity
    tag = identity.sha256[:16] if identity.sha256 else f"random-init-seed{identity.random_init_seed}"
    return f"{tag}-p{PREPROCESS_VERSION}{'-bf16' if encoder.amp else ''}"


def _meta(encoder, kind, **more):
    return {"kind": kind, "encoder_weights": encoder.weights_id, **more, "preprocess_version": PREPROCESS_VERSION,
            "autocast": "bf16" if encoder.amp else "off"}


def cached_features(smiles, store_dir, meta, compute, force=False):
    """Rows of a dense per-molecule array, computing (via `compute(missing)` → rows) what is not stored."""
    def compute_entries(missing):
        log.info("encoding %d molecules into %s", len(missing), store_dir)
        return {s: {"features": row[None]} for s, row in zip(missing, compute(missing))}, {}
    entries, _ = cached_entries(smiles, store_dir, meta, compute_entries, distributed.current(), force)
    return np.stack([entries[s]["features"][0] for s in smiles])


def _transposed_bonds(entry):
    """A MiniMol entry to or from the store, whose arrays may vary only in their first axis: there
    edge_index is (bonds, 2), in memory (2, bonds) as MiniMol takes it."""
    return {k: (np.ascontiguousarray(v.T) if k == "edge_index" else v) for k, v in entry.items()}


def minimol_graphs(smiles, cache_dir, force=False, num_workers=1, max_heavy_atoms=ConformerSettings.max_heavy_atoms):
    """MiniMol's featurised graphs ({SMILES: {key: array}}, {SMILES: reason}) for SMILES as written,
    cached per featuriser settings, made in `num_workers` processes; the molecules its featuriser
    cannot take, or above `max_heavy_atoms`, are failures (not cached, never a placeholder)."""
    featurizer = featurizer_id()
    meta = {"kind": "minimol-graphs", "featurizer": featurizer}
    directory = Path(cache_dir) / "minimol-graphs"
    job = functools.partial(_graph_job, settings=featurizer["settings"], max_heavy_atoms=max_heavy_atoms)

    def compute(missing):
        made = in_workers(job, missing, num_workers, f"MiniMol graphs ({num_workers} workers)")
        graphs = {s: graph for s, (graph, _) in zip(missing, made) if graph is not None}
        return graphs, {s: reason for s, (graph, reason) in zip(missing, made) if graph is None}
    entries, failures = cached_entries(list(dict.fromkeys(smiles)), directory, meta, compute, distributed.current(),
                                       force)
    return {s: _transposed_bonds(e) for s, e in entries.items()}, failures


def _graph_job(smiles, settings, max_heavy_atoms):
    """(graph, None) or (None, why not), in a featurisation worker."""
    try:
        parse_within(smiles, max_heavy_atoms)
        return _transposed_bonds(graph_arrays(smiles, settings)), None
    except ValueError as exc:
        return None, str(exc)


def preparer(encoder, conf, batch_size=BATCH):
    """How molecules become `encoder`'s inputs, for data.load_benchmark / prepare_inputs: None for
    Uni-Mol (conformers made with `conf`), else a function SMILES → (entries, failures)."""
    if encoder.identity.kind == "minimol":
        return functools.partial(minimol_graphs, cache_dir=conf.cache_dir, force=conf.force,
                                 num_workers=conf.num_workers, max_heavy_atoms=conf.max_heavy_atoms)
    return None


def prepare_molecules(encoder, smiles, conf, batch_size=BATCH):
    """({SMILES: the encoder's input entry}, {SMILES: failure reason}) for any encoder."""
    prepare = preparer(encoder, conf, batch_size)
    return prepare(smiles) if prepare else get_conformers(smiles, conf)


def frozen_features(encoder, smiles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """Frozen features (n, 512) for SMILES, from the feature cache or the encoder. `conformers`:
    the molecules' prepared inputs (conformers for Uni-Mol, featurised graphs for MiniMol; see preparer)."""
    if not smiles:
        return np.zeros((0, ModelSpec.in_dim), np.float32)
    minimol = encoder.identity.kind == "minimol"

    def compute(missing):
        rows = encoder.encode([conformers[s] if minimol else conformers[s][:2] for s in missing], batch_size, device)
        bad = [s for s, row in zip(missing, rows) if not np.isfinite(row).all()]
        if bad:
            raise InputError(f"{ENCODER_NAMES[encoder.identity.kind]} ({encoder.weights_id}) gives non-finite "
                             f"features for {len(bad)} molecules, e.g. {bad[0]}; nothing was written")
        return rows
    meta = ({"kind": "minimol-fingerprints", "encoder_weights": encoder.weights_id,
             "featurizer": encoder.featurizer} if minimol else _meta(encoder, "unimol-cls-features"))
    return cached_features(smiles, feature_store_dir(encoder, cache_dir), meta, compute, force)


def feature_store_dir(encoder, cache_dir):
    if encoder.identity.kind == "minimol":
        return Path(cache_dir) / f"minimol-features-{encoder.identity.sha256[:16]}"
    return Path(cache_dir) / f"features-{_store_tag(encoder)}"


def prefix_store_dir(encoder, cache_dir):
    if encoder.identity.kind == "minimol":
        return Path(cache_dir) / f"minimol-prefix-{encoder.identity.sha256[:16]}-k{encoder.frozen_prefix}"
    return Path(cache_dir) / f"prefix-{_store_tag(encoder)}-k{encoder.frozen_prefix}"


def prefix_inputs(encoder, smiles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """PrefixInputs (GraphPrefixInputs for MiniMol) for SMILES: the frozen prefix runs once per
    molecule (cached on disk). Uni-Mol's states are kept in float16 (its pair bias grows with the
    square of the atoms); MiniMol's are small and kept in float32, exactly as the uncached run sees them."""
    minimol = encoder.identity.kind == "minimol"
    if minimol:
        meta = {"kind": "minimol-prefix-states", "encoder_weights": encoder.weights_id, "dtype": "float32",
                "featurizer": encoder.featurizer, "frozen_prefix_layers": encoder.frozen_prefix}
    else:
        meta = _meta(encoder, "unimol-prefix-states", dtype="float16", frozen_prefix_layers=encoder.frozen_prefix)
    directory = prefix_store_dir(encoder, cache_dir)
    entries = {}
    unique = list(dict.fromkeys(smiles))
    for start in progress(range(0, len(unique), PREFIX_CHUNK), desc="prefix cache", leave=False):
        def compute(missing):
            if minimol:
                states = [_transposed_bonds(e) for e in encoder.prefix_states([conformers[s] for s in missing],
                                                                              batch_size, device)]
            else:
                states = encoder.prefix_states([conformers[s][:2] for s in missing], batch_size, device)
            return dict(zip(missing, states)), {}
        found, _ = cached_entries(unique[start:start + PREFIX_CHUNK], directory, meta, compute,
                                  distributed.current(), force and start == 0)
        entries.update(found)
    if minimol:
        return GraphPrefixInputs([_transposed_bonds(entries[s]) for s in smiles])
    return PrefixInputs([entries[s] for s in smiles], encoder.unimol.args.encoder_attention_heads)


def model_inputs(encoder, roles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False, cache_prefix=True):
    """Per role, what the model consumes: frozen features (one cached encoder pass for all roles);
    when fine-tuning, the cached output of the frozen prefix, or the encoder's whole inputs
    (conformers, MiniMol graphs) when layer 0 trains or `cache_prefix` is off (molecules scored once:
    Uni-Mol's prefix states take ~160 KB per molecule on disk)."""
    everything = [s for mols in roles.values() for s in mols]
    if not finetuning(encoder):
        rows = frozen_features(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = lambda part: FeatureInputs(rows[part])  # noqa: E731
    elif encoder.frozen_prefix and cache_prefix:
        cached = prefix_inputs(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = cached.part
    elif encoder.identity.kind == "minimol":
        make = lambda part: GraphInputs([conformers[s] for s in everything[part]])  # noqa: E731
    else:
        make = lambda part: ConformerInputs([conformers[s][:2] for s in everything[part]],  # noqa: E731
                                            encoder.dictionary)
    out, start = {}, 0
    for role, mols in roles.items():
        out[role] = make(slice(start, start + len(mols)))
        start += len(mols)
    return out

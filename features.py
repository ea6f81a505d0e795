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
from data import PREPROCESS_VERSION, get_conformers
from model import ConformerInputs, FeatureInputs, FinetunableUniMolEncoder, PrefixInputs
from settings import EncoderSettings, ModelSpec
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


def minimol_features(encoder, smiles, cache_dir, batch_size=BATCH, force=False):
    """MiniMol fingerprints ({SMILES: (512,) row}, {SMILES: reason}) for SMILES as written; the
    molecules its featuriser cannot take are failures (not cached, never a placeholder row)."""
    meta = {"kind": "minimol-fingerprints", "encoder_weights": encoder.weights_id,
            "featurizer": encoder.featurizer_settings}
    directory = Path(cache_dir) / f"minimol-features-{encoder.identity.sha256[:16]}"

    def compute(missing):
        graphs, failures = {}, {}
        for s in progress(missing, desc="MiniMol graphs", leave=False):
            try:
                graphs[s] = encoder.graph(s)
            except ValueError as exc:
                failures[s] = str(exc)
        log.info("encoding %d molecules into %s", len(graphs), directory)
        rows = encoder.encode(list(graphs.values()), batch_size)
        bad = [s for s, row in zip(graphs, rows) if not np.isfinite(row).all()]
        if bad:
            raise InputError(f"MiniMol ({encoder.weights_id}) gives non-finite features for {len(bad)} molecules, "
                             f"e.g. {bad[0]}; nothing was written")
        return {s: {"features": row[None]} for s, row in zip(graphs, rows)}, failures
    entries, failures = cached_entries(list(dict.fromkeys(smiles)), directory, meta, compute, distributed.current(),
                                       force)
    return {s: e["features"][0] for s, e in entries.items()}, failures


def preparer(encoder, conf, batch_size=BATCH):
    """How molecules become `encoder`'s inputs, for data.load_benchmark / prepare_inputs: None for
    Uni-Mol (conformers made with `conf`), else a function SMILES → (entries, failures)."""
    if encoder.identity.kind == "minimol":
        return functools.partial(minimol_features, encoder, cache_dir=conf.cache_dir, batch_size=batch_size,
                                 force=conf.force)
    return None


def prepare_molecules(encoder, smiles, conf, batch_size=BATCH):
    """({SMILES: the encoder's input entry}, {SMILES: failure reason}) for any encoder."""
    prepare = preparer(encoder, conf, batch_size)
    return prepare(smiles) if prepare else get_conformers(smiles, conf)


def frozen_features(encoder, smiles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """Frozen features (n, 512) for SMILES, from the feature cache or the encoder. `conformers`:
    the molecules' prepared inputs (for MiniMol its fingerprints already, see preparer)."""
    if not smiles:
        return np.zeros((0, ModelSpec.in_dim), np.float32)
    if encoder.identity.kind == "minimol":
        return np.stack([conformers[s] for s in smiles]).astype(np.float32)

    def compute(missing):
        rows = encoder.encode([conformers[s][:2] for s in missing], batch_size, device)
        bad = [s for s, row in zip(missing, rows) if not np.isfinite(row).all()]
        if bad:
            raise InputError(f"Uni-Mol ({encoder.weights_id}) gives non-finite features for {len(bad)} molecules, "
                             f"e.g. {bad[0]}; nothing was written")
        return rows
    return cached_features(smiles, feature_store_dir(encoder, cache_dir),
                           _meta(encoder, "unimol-cls-features"), compute, force)


def feature_store_dir(encoder, cache_dir):
    return Path(cache_dir) / f"features-{_store_tag(encoder)}"


def prefix_store_dir(encoder, cache_dir):
    return Path(cache_dir) / f"prefix-{_store_tag(encoder)}-k{encoder.frozen_prefix}"


def prefix_inputs(encoder, smiles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """PrefixInputs for SMILES: the frozen prefix runs once per molecule (cached on disk)."""
    meta = _meta(encoder, "unimol-prefix-states", dtype="float16", frozen_prefix_layers=encoder.frozen_prefix)
    directory = prefix_store_dir(encoder, cache_dir)
    entries = {}
    unique = list(dict.fromkeys(smiles))
    for start in progress(range(0, len(unique), PREFIX_CHUNK), desc="prefix cache", leave=False):
        def compute(missing):
            states = encoder.prefix_states([conformers[s][:2] for s in missing], batch_size, device)
            return dict(zip(missing, states)), {}
        found, _ = cached_entries(unique[start:start + PREFIX_CHUNK], directory, meta, compute,
                                  distributed.current(), force and start == 0)
        entries.update(found)
    return PrefixInputs([entries[s] for s in smiles], encoder.unimol.args.encoder_attention_heads)


def model_inputs(encoder, roles, conformers, cache_dir, batch_size=BATCH, device="cpu", force=False, cache_prefix=True):
    """Per role, what the model consumes: frozen features (one cached encoder pass for all roles);
    when fine-tuning, the cached output of the frozen prefix, or conformers when layer 0 trains or
    `cache_prefix` is off (molecules scored once: prefix states take ~160 KB per molecule on disk)."""
    everything = [s for mols in roles.values() for s in mols]
    if not isinstance(encoder, FinetunableUniMolEncoder):
        rows = frozen_features(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = lambda part: FeatureInputs(rows[part])  # noqa: E731
    elif encoder.frozen_prefix and cache_prefix:
        cached = prefix_inputs(encoder, everything, conformers, cache_dir, batch_size, device, force)
        make = lambda part: PrefixInputs(cached.entries[part], cached.heads)  # noqa: E731
    else:
        make = lambda part: ConformerInputs([conformers[s][:2] for s in everything[part]],  # noqa: E731
                                            encoder.dictionary)
    out, start = {}, 0
    for role, mols in roles.items():
        out[role] = make(slice(start, start + len(mols)))
        start += len(mols)
    return out

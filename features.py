"""Molecules → what the model consumes, through the on-disk caches, for any encoder.

An encoder prepares molecules (Uni-Mol: conformers, MiniMol: graphs) into its own cache; here its
frozen features, or when it is fine-tuned the states after its frozen prefix, are cached in the
folder and on the keys it names (encoder weights, preprocessing, precision). Every cache is keyed by
the SMILES as written: a molecule written another way is another entry, because its atom order
seeds its inputs (Uni-Mol's conformer, MiniMol's Laplacian basis)."""
import logging
from collections import Counter

import numpy as np

import distributed
from batching import FeatureInputs, Subset
from data import CALIBRATION, check_roles, finalize_report
from encoders.base import BATCH
from molecules import reason_kind
from store import cached_entries
from utils import InputError, progress

log = logging.getLogger("energy_dpo.features")
PREFIX_CHUNK = 512  # molecules per prefix-cache shard: bounds the memory of one write


def attach_inputs(encoder, roles, report, settings, source):
    """The encoder's inputs for every role molecule ({SMILES: entry}); molecules without one leave the
    roles and are recorded in the report (finalised here). Returns (roles, prepared)."""
    everything = [s for mols in roles.values() for s in mols]
    prepared, failures = encoder.prepare(everything, settings)
    if failures:
        reasons = Counter(reason_kind(r) for r in failures.values())
        log.warning("%d molecules without %s %s, skipped: %s", len(failures), encoder.info.label, encoder.info.inputs,
                    ", ".join(f"{n} {why}" for why, n in reasons.most_common()))
    for smiles, reason in failures.items():
        role = next(r for r in roles if smiles in roles[r])
        report["skipped"].append({"split": role, "index": None, "value": smiles, "reason": reason})
    roles = {r: [s for s in mols if s in prepared] for r, mols in roles.items()}
    for r in roles:
        report["roles"][r]["used"] = len(roles[r])
    if CALIBRATION in roles and not roles[CALIBRATION]:  # optional: without it, p-values calibrate on id_val
        del roles[CALIBRATION]
    report.update(encoder.input_report(prepared, everything))
    check_roles(roles, source)
    finalize_report(report)
    return roles, prepared


def cached_features(smiles, store_dir, meta, compute, force=False):
    """Rows of a dense per-molecule array, computing (via `compute(missing)` → rows) what is not stored."""
    def compute_entries(missing):
        log.info("encoding %d molecules into %s", len(missing), store_dir)
        return {s: {"features": row[None]} for s, row in zip(missing, compute(missing))}, {}
    entries, _ = cached_entries(smiles, store_dir, meta, compute_entries, distributed.current(), force)
    return np.stack([entries[s]["features"][0] for s in smiles])


def frozen_features(encoder, smiles, prepared, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """Frozen features (n, width) for SMILES, from the feature cache or the encoder. `prepared`: the
    molecules' inputs ({SMILES: entry}, encoder.prepare)."""
    if not smiles:
        return np.zeros((0, encoder.width), np.float32)

    def compute(missing):
        rows = encoder.encode([prepared[s] for s in missing], batch_size, device)
        bad = [s for s, row in zip(missing, rows) if not np.isfinite(row).all()]
        if bad:
            raise InputError(f"{encoder.info.label} ({encoder.weights_id}) gives non-finite features for "
                             f"{len(bad)} molecules, e.g. {bad[0]}; nothing was written")
        return rows
    return cached_features(smiles, encoder.store_dir(cache_dir, "features"), encoder.store_meta("features"), compute,
                           force)


def prefix_inputs(encoder, smiles, prepared, cache_dir, batch_size=BATCH, device="cpu", force=False):
    """The encoder's batch source of cached frozen-prefix states for SMILES: the frozen prefix runs
    once per molecule (cached on disk, in shards of PREFIX_CHUNK molecules)."""
    directory, meta = encoder.store_dir(cache_dir, "prefix"), encoder.store_meta("prefix")
    entries = {}
    unique = list(dict.fromkeys(smiles))
    for start in progress(range(0, len(unique), PREFIX_CHUNK), desc="prefix cache", leave=False):
        def compute(missing):
            states = encoder.prefix_states([prepared[s] for s in missing], batch_size, device)
            return dict(zip(missing, states)), {}
        found, _ = cached_entries(unique[start:start + PREFIX_CHUNK], directory, meta, compute,
                                  distributed.current(), force and start == 0, encoder.check_prefix_state)
        entries.update(found)
    return encoder.prefix_inputs([entries[s] for s in smiles])


def model_inputs(encoder, roles, prepared, cache_dir, batch_size=BATCH, device="cpu", force=False, cache_prefix=True):
    """Per role, what the model consumes: frozen features (one cached encoder pass for all roles);
    when fine-tuning, the cached output of the frozen prefix, or the encoder's whole inputs when
    layer 0 trains or `cache_prefix` is off (molecules scored once: Uni-Mol's prefix states take
    ~160 KB per molecule on disk)."""
    everything = [s for mols in roles.values() for s in mols]
    if not encoder.trains:
        rows = frozen_features(encoder, everything, prepared, cache_dir, batch_size, device, force)
        make = lambda part: FeatureInputs(rows[part])  # noqa: E731
    elif encoder.frozen_prefix and cache_prefix:
        states = prefix_inputs(encoder, everything, prepared, cache_dir, batch_size, device, force)
        make = lambda part: Subset(states, range(len(everything))[part])  # noqa: E731
    else:
        make = lambda part: encoder.role_inputs([prepared[s] for s in everything[part]])  # noqa: E731
    out, start = {}, 0
    for role, mols in roles.items():
        out[role] = make(slice(start, start + len(mols)))
        start += len(mols)
    return out

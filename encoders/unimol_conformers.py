"""Uni-Mol's inputs: heavy-atom conformers exactly as unimol_tools makes them for the no-H model, from
the SMILES as written, cached per preprocessing version; and the dictionary that reads their atoms.
No torch: conformer worker processes stay light."""
import functools
import hashlib
import importlib.util
import logging
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rdkit import Chem
from rdkit.Chem import AllChem, rdDistGeom

import distributed
from molecules import in_workers, parse_within
from settings import MoleculeSettings
from store import cached_entries
from utils import InputError

log = logging.getLogger("energy_dpo.unimol")

MAX_ATOMS = 256  # Uni-Mol's crop size
CONFORMER_SEED = 42  # the seed unimol_tools embeds with; the pretrained weights saw these conformers
# Bump when anything that changes model inputs changes (conformer recipe, crop, centring, cache keys).
# 2: conformers are made from the SMILES as written (as unimol_tools does), not the canonical form.
PREPROCESS_VERSION = 2


def unimol_dict_path():
    """The no-H Uni-Mol v1 dictionary that unimol_tools ships (found without importing it)."""
    spec = importlib.util.find_spec("unimol_hf")
    if spec is None or spec.origin is None:
        raise InputError("unimol_tools is not installed (its unimol_hf dictionary is missing); run `make install`")
    return Path(spec.origin).parent / "pretrained" / "unimol-v1-noh" / "mol.dict.txt"


def unimol_elements():
    symbols = {line.split()[0] for line in unimol_dict_path().read_text().splitlines() if line.strip()}
    return {s for s in symbols if not s.startswith("[")}


def _crop_rng(smiles):
    # unimol_tools crops with the global unseeded RNG; seed per molecule so every run crops alike.
    return np.random.default_rng(int.from_bytes(hashlib.sha256(smiles.encode()).digest()[:8], "little"))


def make_conformer(smiles, max_heavy_atoms=MoleculeSettings.max_heavy_atoms,
                   timeout_s=MoleculeSettings.conformer_timeout):
    """Heavy atoms and centred coordinates exactly as unimol_tools prepares them for the no-H model,
    from the SMILES string as given (its atom order seeds the embedding).

    Returns (atoms, coords, is_2d) or raises ValueError with the reason. unimol_tools replaces a
    conformer it cannot make with zeros; here that molecule fails instead, and so does one above
    `max_heavy_atoms` (checked before any 3D work) or whose embedding runs past `timeout_s`.
    """
    mol = Chem.AddHs(parse_within(smiles, max_heavy_atoms))
    params = rdDistGeom.ETKDGv3()  # what EmbedMolecule(mol, randomSeed=42) uses, plus a time limit
    params.randomSeed = CONFORMER_SEED
    params.timeout = max(1, math.ceil(timeout_s))
    try:
        started = time.monotonic()
        is_2d = AllChem.EmbedMolecule(mol, params) != 0
        if is_2d and time.monotonic() - started >= params.timeout:
            raise ValueError(f"3D embedding exceeded --conformer_timeout {timeout_s:g} s")
        if is_2d:
            AllChem.Compute2DCoords(mol)
        else:
            try:
                AllChem.MMFFOptimizeMolecule(mol)
            except Exception:  # noqa: BLE001 - unimol_tools keeps the unoptimised conformer too
                pass
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - RDKit raises assorted C++ errors
        raise ValueError(f"conformer generation failed ({exc})") from None
    atoms = np.array([a.GetSymbol() for a in mol.GetAtoms()])
    coords = mol.GetConformer().GetPositions().astype(np.float32)
    heavy = atoms != "H"
    if not heavy.any():
        raise ValueError("no atoms after hydrogen removal")
    atoms, coords = crop_and_centre(smiles, atoms[heavy], coords[heavy])
    return atoms.astype("<U3"), coords, bool(is_2d)


def crop_and_centre(smiles, atoms, coords):
    """Keep at most MAX_ATOMS atoms (a reproducible choice per molecule), centred on their centroid."""
    if len(atoms) > MAX_ATOMS:
        keep = _crop_rng(smiles).choice(len(atoms), MAX_ATOMS, replace=False)
        atoms, coords = atoms[keep], coords[keep]
    return atoms, (coords - coords.mean(axis=0)).astype(np.float32)


def _conformer_job(smiles, max_heavy_atoms, timeout_s):
    try:
        return smiles, make_conformer(smiles, max_heavy_atoms, timeout_s), None
    except ValueError as exc:
        return smiles, None, str(exc)


def _generate_conformers(smiles_list, settings):
    """(smiles, result, reason) in input order."""
    job = functools.partial(_conformer_job, max_heavy_atoms=settings.max_heavy_atoms, timeout_s=settings.conformer_timeout)
    return in_workers(job, smiles_list, settings.num_workers, f"conformers ({settings.num_workers} workers)")


def conformer_store_dir(cache_dir):
    return Path(cache_dir) / f"conformers-v{PREPROCESS_VERSION}"


def _compute_conformers(smiles_list, settings):
    log.info("generating %d conformers", len(smiles_list))
    new, failures = {}, {}
    for smiles, result, reason in _generate_conformers(smiles_list, settings):
        if result is None:
            failures[smiles] = reason
        else:
            atoms, coords, is_2d = result
            new[smiles] = {"atoms": atoms, "coords": coords, "is_2d": np.array([is_2d])}
    return new, failures


def get_conformers(smiles_list, settings=MoleculeSettings()):
    """Conformers for SMILES as written: {smiles: (atoms, coords, is_2d)} and {smiles: failure reason}.
    Failures are not cached (a larger limit may let them through later)."""
    meta = {"kind": "unimol-no-h-conformers", "preprocess_version": PREPROCESS_VERSION,
            "conformer_seed": CONFORMER_SEED, "max_atoms": MAX_ATOMS}
    entries, failures = cached_entries(smiles_list, conformer_store_dir(settings.cache_dir), meta,
                                       lambda missing: _compute_conformers(missing, settings), distributed.current(),
                                       settings.force)
    return {s: (e["atoms"], e["coords"], bool(e["is_2d"][0])) for s, e in entries.items()}, failures


def summarize_conformers(report, conformers, smiles_list):
    """What a data report says of these conformers: 2D fallbacks, elements read as [UNK], crops."""
    known = unimol_elements()
    two_d = [s for s in smiles_list if s in conformers and conformers[s][2]]
    unknown = Counter()
    unknown_mols = 0
    for s in smiles_list:
        if s in conformers:
            extra = [a for a in conformers[s][0] if a not in known]
            unknown.update(extra)
            unknown_mols += bool(extra)
    report["conformer_2d_fallback"] = {"count": len(two_d), "smiles": two_d[:100]}
    report["unknown_elements"] = {"molecules": unknown_mols, "atoms_by_element": dict(unknown)}
    if two_d:
        log.warning("%d molecules got 2D coordinates (3D embedding failed), as unimol_tools would give them",
                    len(two_d))
    if unknown:
        log.warning("%d molecules hold elements outside the Uni-Mol dictionary, read as [UNK]: %s", unknown_mols,
                    ", ".join(f"{e} ×{n}" for e, n in unknown.most_common()))
    report["cropped_to_256_atoms"] = sum(1 for s in smiles_list if s in conformers and len(conformers[s][0]) == MAX_ATOMS)

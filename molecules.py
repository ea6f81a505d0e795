"""Molecules as RDKit reads them: a SMILES' identity (its canonical form), the size limit checked
before any encoder input is made, warnings about what an encoder makes of a molecule, why a molecule
was skipped, and preparing many molecules in worker processes. No torch: worker processes stay light."""
import functools
import multiprocessing
import re
import sys

from rdkit import Chem, RDLogger

from utils import progress

RDLogger.DisableLog("rdApp.*")


@functools.lru_cache(maxsize=None)  # streaming callers empty it per chunk: forget_parsed()
def canonicalize(smiles):
    """Canonical SMILES, or (None, reason) for molecules the encoder cannot take."""
    if not smiles.strip():
        return None, "empty SMILES"
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return None, "RDKit cannot parse SMILES"
    if not any(atom.GetAtomicNum() != 1 for atom in mol.GetAtoms()):
        return None, "no atoms after hydrogen removal"
    return Chem.MolToSmiles(mol), None


def parse_within(smiles, max_heavy_atoms):
    """The RDKit molecule of a SMILES as written, or ValueError when it does not parse or has more
    than `max_heavy_atoms` heavy atoms (checked before any encoder input is made: a 5,000-atom
    polymer would stall a batch for minutes)."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError("RDKit cannot parse SMILES")
    if mol.GetNumHeavyAtoms() > max_heavy_atoms:
        raise ValueError(f"{mol.GetNumHeavyAtoms()} heavy atoms, above --max_heavy_atoms {max_heavy_atoms}")
    return mol


def _worker_init():
    # Torch's intra-op threads in forked workers can deadlock RDKit embedding (Uni-Mol PR #304).
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def in_workers(job, smiles_list, num_workers, desc):
    """[job(s) for s in smiles_list], in `num_workers` forked processes when there are enough molecules.
    Workers take the largest molecules first so that a slow macrocycle does not leave the other cores
    idle at the end. `job` must be picklable (a module-level function or a partial of one)."""
    if num_workers <= 1 or len(smiles_list) < 2 * num_workers:
        return [job(s) for s in progress(smiles_list, desc=desc, leave=False)]
    largest_first = sorted(range(len(smiles_list)), key=lambda i: -_atom_count(smiles_list[i]))
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(num_workers, initializer=_worker_init) as pool:
        jobs = pool.imap_unordered(functools.partial(_numbered, job), [(i, smiles_list[i]) for i in largest_first])
        done = dict(progress(jobs, total=len(smiles_list), desc=desc, leave=False))
    return [done[i] for i in range(len(smiles_list))]


def _numbered(job, numbered):
    i, smiles = numbered
    return i, job(smiles)


def _atom_count(smiles):
    mol = Chem.MolFromSmiles(smiles)
    return mol.GetNumAtoms() if mol is not None else 0


def forget_parsed():
    """Empty the parsed-molecule cache: a caller streaming millions of molecules calls it per chunk,
    so that memory does not grow with the input."""
    canonicalize.cache_clear()


def canonical(smiles):
    """The identity of a molecule kept in a role (it was checked to parse when it was read)."""
    return canonicalize(smiles)[0]


def reason_kind(reason):
    """A skip reason without its particulars, for counting: '351 heavy atoms, above
    --max_heavy_atoms 350' → 'heavy atoms, above --max_heavy_atoms'."""
    return re.sub(r"\s*\(.*\)|\s*\b[\d.]+\b\s*(s\b)?", " ", reason).strip().replace("  ", " ")


def molecule_warning(smiles):
    """Why an encoder's reading of a molecule may mislead ('' when nothing): salts and mixtures are read
    as one molecule, and a dummy atom (*, an R-group or attachment point) as an unknown atom."""
    mol = Chem.MolFromSmiles(smiles)
    warnings = []
    fragments = len(Chem.GetMolFrags(mol))
    if fragments > 1:
        warnings.append(f"{fragments} fragments (salt or mixture) scored as one molecule; strip counter-ions first")
    dummies = sum(atom.GetAtomicNum() == 0 for atom in mol.GetAtoms())
    if dummies:
        warnings.append(f"{dummies} dummy atom{'s' if dummies > 1 else ''} (*) scored as an unknown atom; write the "
                        f"real substituent or cap it with H")
    return "; ".join(warnings)

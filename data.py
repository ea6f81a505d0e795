"""DrugOOD loading, ID/OOD roles, Uni-Mol conformers and the on-disk caches.

Everything here is chemistry and bookkeeping; nothing imports torch or unimol_tools, so conformer
worker processes stay light. The Uni-Mol dictionary is only read for its set of element symbols.
"""
import csv
import functools
import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem
from tqdm import tqdm

RDLogger.DisableLog("rdApp.*")
log = logging.getLogger("energy_dpo")

SPLITS = ("train", "iid_val", "iid_test", "ood_val", "ood_test")
ROLES = ("id_train", "id_val", "id_test", "ood_train", "ood_val", "ood_test")
MAX_ATOMS = 256  # Uni-Mol's crop size
CONFORMER_SEED = 42  # the seed unimol_tools embeds with; the pretrained weights saw these conformers
# Bump when anything that changes model inputs changes (conformer recipe, crop, centring).
PREPROCESS_VERSION = 1


class InputError(Exception):
    """A problem with user-supplied data, reported as one line without a traceback."""


def unimol_dict_path():
    """The no-H Uni-Mol v1 dictionary that unimol_tools ships (found without importing it)."""
    spec = importlib.util.find_spec("unimol_hf")
    if spec is None or spec.origin is None:
        raise InputError("unimol_tools is not installed (its unimol_hf dictionary is missing); run `make install`")
    return Path(spec.origin).parent / "pretrained" / "unimol-v1-noh" / "mol.dict.txt"


def unimol_elements():
    symbols = {line.split()[0] for line in unimol_dict_path().read_text().splitlines() if line.strip()}
    return {s for s in symbols if not s.startswith("[")}


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ----------------------------------------------------------------------------- molecules

@functools.lru_cache(maxsize=None)
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


def unknown_elements(smiles, known):
    mol = Chem.MolFromSmiles(smiles)
    return sorted({a.GetSymbol() for a in mol.GetAtoms() if a.GetSymbol() != "H" and a.GetSymbol() not in known})


def _crop_rng(smiles):
    # unimol_tools crops with the global unseeded RNG; seed per molecule so every run crops alike.
    return np.random.default_rng(int.from_bytes(hashlib.sha256(smiles.encode()).digest()[:8], "little"))


def make_conformer(smiles):
    """Heavy atoms and centred coordinates exactly as unimol_tools prepares them for the no-H model.

    Returns (atoms, coords, is_2d) or raises ValueError with the reason. unimol_tools replaces a
    conformer it cannot make with zeros; here that molecule fails instead.
    """
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError("RDKit cannot parse SMILES")
    mol = Chem.AddHs(mol)
    try:
        is_2d = AllChem.EmbedMolecule(mol, randomSeed=CONFORMER_SEED) != 0
        if is_2d:
            AllChem.Compute2DCoords(mol)
        else:
            try:
                AllChem.MMFFOptimizeMolecule(mol)
            except Exception:  # noqa: BLE001 - unimol_tools keeps the unoptimised conformer too
                pass
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


def _conformer_job(smiles):
    try:
        return smiles, make_conformer(smiles), None
    except ValueError as exc:
        return smiles, None, str(exc)


def _worker_init():
    # Torch's intra-op threads in forked workers can deadlock RDKit embedding (Uni-Mol PR #304).
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _generate_conformers(smiles_list, num_workers):
    """(smiles, result, reason) in input order. Workers take the largest molecules first so that a
    slow macrocycle does not leave the other cores idle at the end."""
    desc = f"conformers ({num_workers} workers)"
    if num_workers <= 1 or len(smiles_list) < 2 * num_workers:
        return [_conformer_job(s) for s in tqdm(smiles_list, desc=desc, leave=False)]
    largest_first = sorted(smiles_list, key=lambda s: -Chem.MolFromSmiles(s).GetNumAtoms())
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(num_workers, initializer=_worker_init) as pool:
        jobs = pool.imap_unordered(_conformer_job, largest_first)
        done = {job[0]: job for job in tqdm(jobs, total=len(smiles_list), desc=desc, leave=False)}
    return [done[s] for s in smiles_list]


# ----------------------------------------------------------------------------- caches
# A store is a directory with meta.json (what its entries depend on) and immutable shard folders
# of .npy files: no pickle, memory-mapped on read. Entries are keyed by canonical SMILES; each
# field of an entry is an array whose first axis may differ between entries (atoms, tokens, ...).

def open_store(directory, meta, force=False):
    directory = Path(directory)
    if force and directory.exists():
        log.info("--force_recompute_cache: clearing %s", directory)
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        try:
            on_disk = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            on_disk = None
        if on_disk != meta:
            log.warning("cache %s was made for %s, not %s: clearing it", directory, on_disk, meta)
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
    if not meta_path.exists():
        atomic_write_json(meta_path, meta)
    return directory


def _read_shard(shard):
    fields = json.loads((shard / "fields.json").read_text())
    keys = np.load(shard / "keys.npy", allow_pickle=False)
    arrays, offsets = {}, {}
    for field in fields:
        arrays[field] = np.load(shard / f"{field}.npy", mmap_mode="r", allow_pickle=False)
        offsets[field] = np.load(shard / f"{field}.offsets.npy", allow_pickle=False)
        if len(offsets[field]) != len(keys) + 1 or offsets[field][-1] != len(arrays[field]):
            raise ValueError(f"{field} offsets do not match the data")
    return keys, arrays, offsets


def store_get(directory, keys):
    """{key: {field: array}} for the wanted keys present in the store. A corrupt shard is deleted
    with a warning, so that its entries are recomputed."""
    wanted, found = set(keys), {}
    for shard in sorted(Path(directory).glob("shard-*")):
        try:
            shard_keys, arrays, offsets = _read_shard(shard)
        except (OSError, ValueError, KeyError, EOFError, json.JSONDecodeError) as exc:
            log.warning("corrupt cache shard %s (%s): deleting it; its entries will be recomputed", shard, exc)
            if shard.is_dir():
                shutil.rmtree(shard)
            else:
                shard.unlink()
            continue
        for i, key in enumerate(shard_keys.tolist()):
            if key in wanted:
                found[key] = {f: a[offsets[f][i]:offsets[f][i + 1]] for f, a in arrays.items()}
    return found


def store_put(directory, entries):
    """Write {key: {field: array}} as a new shard (a temporary folder renamed into place)."""
    directory = Path(directory)
    tmp = directory / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    fields = list(next(iter(entries.values())))
    np.save(tmp / "keys.npy", np.array(list(entries), dtype=str))
    for field in fields:
        parts = [np.asarray(entry[field]) for entry in entries.values()]
        np.save(tmp / f"{field}.npy", np.concatenate(parts))
        np.save(tmp / f"{field}.offsets.npy", np.cumsum([0] + [len(p) for p in parts]))
    atomic_write_json(tmp / "fields.json", fields)
    os.replace(tmp, directory / f"shard-{uuid.uuid4().hex}")


def cached_entries(keys, directory, meta, compute, force=False):
    """Entries for `keys`: stored ones are read, the rest come from `compute(missing)`, which
    returns ({key: entry}, {key: failure reason}), and are stored. Failures are not stored."""
    directory = open_store(directory, meta, force)
    found = store_get(directory, keys)
    missing = [k for k in dict.fromkeys(keys) if k not in found]
    failures = {}
    if missing:
        new, failures = compute(missing)
        if new:
            store_put(directory, new)
        found.update(new)
    return found, failures


def conformer_store_dir(cache_dir):
    return Path(cache_dir) / f"conformers-v{PREPROCESS_VERSION}"


def _compute_conformers(smiles_list, num_workers):
    log.info("generating %d conformers", len(smiles_list))
    new, failures = {}, {}
    for smiles, result, reason in _generate_conformers(smiles_list, num_workers):
        if result is None:
            failures[smiles] = reason
        else:
            atoms, coords, is_2d = result
            new[smiles] = {"atoms": atoms, "coords": coords, "is_2d": np.array([is_2d])}
    return new, failures


def get_conformers(smiles_list, cache_dir, num_workers=1, force=False):
    """Conformers for canonical SMILES: {smiles: (atoms, coords, is_2d)} and {smiles: failure reason}."""
    meta = {"kind": "unimol-no-h-conformers", "preprocess_version": PREPROCESS_VERSION,
            "conformer_seed": CONFORMER_SEED, "max_atoms": MAX_ATOMS}
    entries, failures = cached_entries(smiles_list, conformer_store_dir(cache_dir), meta,
                                       lambda missing: _compute_conformers(missing, num_workers), force)
    return {s: (e["atoms"], e["coords"], bool(e["is_2d"][0])) for s, e in entries.items()}, failures


def cached_features(smiles_list, store_dir, meta, compute, force=False):
    """Rows of a dense per-molecule array, computing (via `compute(missing)` → rows) what is not stored."""
    def compute_entries(missing):
        log.info("encoding %d molecules into %s", len(missing), store_dir)
        return {s: {"features": row[None]} for s, row in zip(missing, compute(missing))}, {}
    entries, _ = cached_entries(smiles_list, store_dir, meta, compute_entries, force)
    return np.stack([entries[s]["features"][0] for s in smiles_list]) if smiles_list else np.zeros((0, 0), np.float32)


# ----------------------------------------------------------------------------- DrugOOD

def missing_data_file(path):
    return (f"{path}: file not found; pass --data_file with a DrugOOD JSON "
            f"(e.g. data/raw/lbap_general_ec50_scaffold.json, see README 'Data')")


def load_drugood(path):
    """Raw items per split, with schema checks that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(missing_data_file(path))
    try:
        with open(path) as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc}); is it a DrugOOD file?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("split"), dict):
        raise InputError(f"{path}: no top-level 'split' object; a DrugOOD file has "
                        f"{{cfg, split: {{{', '.join(SPLITS)}}}, statistics}}")
    missing = [s for s in SPLITS if s not in doc["split"]]
    if missing:
        raise InputError(f"{path}: 'split' lacks {', '.join(missing)} (has {', '.join(doc['split']) or 'nothing'})")
    for name in SPLITS:
        if not isinstance(doc["split"][name], list):
            raise InputError(f"{path}: split '{name}' is a {type(doc['split'][name]).__name__}, not a list of items")
    return {name: doc["split"][name] for name in SPLITS}


def _skip(report, split, index, value, reason):
    report["skipped"].append({"split": split, "index": index, "value": repr(value)[:200], "reason": reason})


def _canonical_split(items, split, report):
    """Canonical SMILES of every item in file order, duplicates dropped; every skip recorded."""
    out = {}
    for index, item in enumerate(tqdm(items, desc=f"checking {split}", leave=False, mininterval=2)):
        if not isinstance(item, dict) or "smiles" not in item:
            _skip(report, split, index, item, "item has no 'smiles' field")
            continue
        if not isinstance(item["smiles"], str):
            _skip(report, split, index, item["smiles"], "smiles is not a string")
            continue
        smiles, reason = canonicalize(item["smiles"])
        if smiles is None:
            _skip(report, split, index, item["smiles"], reason)
        elif smiles in out:
            report["duplicates_removed"][split] += 1
        else:
            out[smiles] = None
    return list(out)


def _sample(pool, n, rng):
    if n >= len(pool):
        return list(pool)
    return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]


def build_roles(path, sizes, data_seed, report):
    """ID/OOD roles from a DrugOOD file: train→ID train, iid_val→ID val, iid_test→ID test,
    ood_val→disjoint OOD train + OOD val, ood_test→OOD test. `sizes` = (train, val, test) per side."""
    splits = load_drugood(path)
    report.update({"data_file": str(path), "data_file_sha256": file_sha256(path),
                   "items_per_split": {s: len(v) for s, v in splits.items()}, "skipped": [],
                   "duplicates_removed": Counter(), "cross_split_duplicates_removed": Counter()})
    canon = {s: _canonical_split(splits[s], s, report) for s in SPLITS}
    # A molecule keeps its first role in split order; later copies would leak it between roles.
    seen, pools = set(), {}
    for split in SPLITS:
        pools[split] = [s for s in canon[split] if s not in seen]
        report["cross_split_duplicates_removed"][split] = len(canon[split]) - len(pools[split])
        seen.update(pools[split])
    id_mols = set().union(*(canon[s] for s in ("train", "iid_val", "iid_test")))
    ood_mols = set().union(*(canon[s] for s in ("ood_val", "ood_test")))
    overlap = id_mols & ood_mols
    if overlap:
        log.warning("%d molecules appear in both ID and OOD splits: removed from both", len(overlap))
    report["id_ood_overlap_removed"] = len(overlap)
    report["id_ood_overlap_examples"] = sorted(overlap)[:20]
    pools = {s: [m for m in p if m not in overlap] for s, p in pools.items()}

    train_n, val_n, test_n = sizes
    rng = lambda role: np.random.default_rng([data_seed, ROLES.index(role)])  # noqa: E731
    roles = {"id_train": _sample(pools["train"], train_n, rng("id_train")),
             "id_val": _sample(pools["iid_val"], val_n, rng("id_val")),
             "id_test": _sample(pools["iid_test"], test_n, rng("id_test")),
             "ood_test": _sample(pools["ood_test"], test_n, rng("ood_test"))}
    ood_pool = [pools["ood_val"][i] for i in rng("ood_train").permutation(len(pools["ood_val"]))]
    n_ood_train = train_n
    if train_n + val_n > len(ood_pool):
        n_ood_train = round(len(ood_pool) * train_n / (train_n + val_n))
        log.warning("ood_val has %d usable molecules, fewer than --train_size + --val_size = %d: "
                    "splitting it %d / %d", len(ood_pool), train_n + val_n, n_ood_train, len(ood_pool) - n_ood_train)
    roles["ood_train"] = sorted(ood_pool[:n_ood_train], key=pools["ood_val"].index)
    roles["ood_val"] = sorted(ood_pool[n_ood_train:n_ood_train + val_n], key=pools["ood_val"].index)
    roles = {r: roles[r] for r in ROLES}
    requested = dict(zip(ROLES, (train_n, val_n, test_n, train_n, val_n, test_n)))
    report["roles"] = {r: {"requested": requested[r], "available": None, "used": len(roles[r])} for r in ROLES}
    for role, split in zip(ROLES, ("train", "iid_val", "iid_test", "ood_val", "ood_val", "ood_test")):
        report["roles"][role]["available"] = len(pools[split])
        if len(roles[role]) < requested[role]:
            log.warning("%s: %d molecules requested, %d available", role, requested[role], len(roles[role]))
    check_roles(roles, path)
    return roles


def check_roles(roles, source):
    for role, mols in roles.items():
        if not mols:
            raise InputError(f"{source}: role {role} has no usable molecules; check the file's splits "
                            f"and data_report.json")
    for i, a in enumerate(ROLES):
        for b in ROLES[i + 1:]:
            leaked = set(roles[a]) & set(roles[b])
            if leaked:
                raise InputError(f"{source}: {len(leaked)} molecules leaked between {a} and {b}, "
                                f"e.g. {sorted(leaked)[0]}")


def attach_conformers(roles, report, cache_dir, num_workers, force, source):
    """Conformers for every role molecule; failures leave the roles and are recorded."""
    everything = [s for r in ROLES for s in roles[r]]
    conformers, failures = get_conformers(everything, cache_dir, num_workers, force)
    for smiles, reason in failures.items():
        role = next(r for r in ROLES if smiles in roles[r])
        report["skipped"].append({"split": role, "index": None, "value": smiles, "reason": reason})
    roles = {r: [s for s in mols if s in conformers] for r, mols in roles.items()}
    for r in ROLES:
        report["roles"][r]["used"] = len(roles[r])
    summarize_conformers(report, conformers, everything)
    check_roles(roles, source)
    return roles, conformers


def summarize_conformers(report, conformers, smiles_list):
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
    report["cropped_to_256_atoms"] = sum(1 for s in smiles_list if s in conformers and len(conformers[s][0]) == MAX_ATOMS)


def finalize_report(report):
    report["skipped_counts"] = dict(Counter(item["reason"].split(" (")[0] for item in report["skipped"]))
    for key in ("duplicates_removed", "cross_split_duplicates_removed"):
        report[key] = dict(report.get(key, {}))
    return report


def read_smiles_file(path):
    """SMILES from a .smi (first column) or .csv (a 'smiles' column) file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    lines = path.read_text().splitlines()
    if path.suffix.lower() == ".csv":
        rows = list(csv.reader(lines))
        if not rows:
            raise InputError(f"{path}: empty CSV")
        header = [h.strip().lower() for h in rows[0]]
        if "smiles" not in header:
            raise InputError(f"{path}: no 'smiles' column (columns: {', '.join(rows[0])})")
        col = header.index("smiles")
        return [row[col] if col < len(row) else "" for row in rows[1:]]
    smiles = [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]
    if smiles and smiles[0].lower() == "smiles":
        smiles = smiles[1:]
    return smiles


def load_benchmark(data_file, sizes, data_seed, cache_dir, num_workers=1, force=False):
    """Roles, their conformers and the data report for one DrugOOD file."""
    report = {}
    roles = build_roles(data_file, sizes, data_seed, report)
    roles, conformers = attach_conformers(roles, report, cache_dir, num_workers, force, data_file)
    return roles, conformers, finalize_report(report)


def conformers_for_inputs(smiles, cache_dir, num_workers=1, force=False):
    """User-given SMILES → ({row: canonical SMILES}, conformers, {row: failure reason})."""
    canon, failed = {}, {}
    for row, raw in enumerate(smiles):
        value, reason = canonicalize(raw)
        if value is None:
            failed[row] = reason
        else:
            canon[row] = value
    conformers, failures = get_conformers(list(canon.values()), cache_dir, num_workers, force)
    for row in [r for r, s in canon.items() if s in failures]:
        failed[row] = failures[canon.pop(row)]
    return canon, conformers, failed

"""DrugOOD loading, ID/OOD roles, data reports, Uni-Mol conformers and molecule tables.

Everything here is chemistry and bookkeeping; nothing imports torch or unimol_tools, so conformer
worker processes stay light. The Uni-Mol dictionary is only read for its set of element symbols.
"""
import csv
import functools
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing
import re
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import AllChem, rdDistGeom

import distributed
import good
from settings import ConformerSettings, DataSpec, GoodSpec
from store import cached_entries
from utils import InputError, atomic_write_json, file_sha256, progress, read_json

RDLogger.DisableLog("rdApp.*")
log = logging.getLogger("energy_dpo.data")

SPLITS = ("train", "iid_val", "iid_test", "ood_val", "ood_test")
ROLES = ("id_train", "id_val", "id_test", "ood_train", "ood_val", "ood_test")
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


# ----------------------------------------------------------------------------- molecules

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


def _crop_rng(smiles):
    # unimol_tools crops with the global unseeded RNG; seed per molecule so every run crops alike.
    return np.random.default_rng(int.from_bytes(hashlib.sha256(smiles.encode()).digest()[:8], "little"))


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


def make_conformer(smiles, max_heavy_atoms=ConformerSettings.max_heavy_atoms, timeout_s=ConformerSettings.timeout_s):
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


def _generate_conformers(smiles_list, settings):
    """(smiles, result, reason) in input order."""
    job = functools.partial(_conformer_job, max_heavy_atoms=settings.max_heavy_atoms, timeout_s=settings.timeout_s)
    return in_workers(job, smiles_list, settings.num_workers, f"conformers ({settings.num_workers} workers)")


def forget_parsed():
    """Empty the parsed-molecule cache: a caller streaming millions of molecules calls it per chunk,
    so that memory does not grow with the input."""
    canonicalize.cache_clear()


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


def get_conformers(smiles_list, settings=ConformerSettings()):
    """Conformers for SMILES as written: {smiles: (atoms, coords, is_2d)} and {smiles: failure reason}.
    Failures are not cached (a larger limit may let them through later)."""
    meta = {"kind": "unimol-no-h-conformers", "preprocess_version": PREPROCESS_VERSION,
            "conformer_seed": CONFORMER_SEED, "max_atoms": MAX_ATOMS}
    entries, failures = cached_entries(smiles_list, conformer_store_dir(settings.cache_dir), meta,
                                       lambda missing: _compute_conformers(missing, settings), distributed.current(),
                                       settings.force)
    return {s: (e["atoms"], e["coords"], bool(e["is_2d"][0])) for s, e in entries.items()}, failures


# ----------------------------------------------------------------------------- DrugOOD
# A molecule is kept as the SMILES string the file wrote (whitespace stripped): its conformer, and
# so its features, come from that string exactly as unimol_tools makes them (atom order seeds
# ETKDG). Its canonical SMILES is its identity: duplicates and ID/OOD leaks are found on it.

def missing_data_file(path):
    return (f"{path}: file not found; pass --data_file with a DrugOOD JSON "
            f"(e.g. data/raw/lbap_general_ec50_scaffold.json, see docs/method.md, 'Data')")


def load_drugood(path, splits=SPLITS):
    """Raw items per split, with schema checks that name the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(missing_data_file(path))
    try:
        with open(path, encoding="utf-8-sig") as f:
            doc = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON ({str(exc)[:120]}); is it a DrugOOD file?") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("split"), dict):
        raise InputError(f"{path}: no top-level 'split' object; a DrugOOD file has "
                         f"{{cfg, split: {{{', '.join(SPLITS)}}}, statistics}}")
    missing = [s for s in splits if s not in doc["split"]]
    if missing:
        raise InputError(f"{path}: 'split' lacks {', '.join(missing)} (has {', '.join(doc['split']) or 'nothing'})")
    for name in splits:
        if not isinstance(doc["split"][name], list):
            raise InputError(f"{path}: split '{name}' is a {type(doc['split'][name]).__name__}, not a list of items")
    return {name: doc["split"][name] for name in splits}


def canonical(smiles):
    """The identity of a molecule kept in a role (it was checked to parse when it was read)."""
    return canonicalize(smiles)[0]


def _skip(report, split, index, value, reason):
    report["skipped"].append({"split": split, "index": index, "value": repr(value)[:200], "reason": reason})


_NO_SMILES = object()  # an item without a 'smiles' field


def _first_writings(smiles_values, split, report):
    """{canonical: SMILES as written} in file order: the first writing of each molecule; every skip
    and duplicate recorded."""
    out = {}
    for index, value in enumerate(progress(smiles_values, desc=f"checking {split}", leave=False, mininterval=2)):
        if value is _NO_SMILES:
            _skip(report, split, index, None, "item has no 'smiles' field")
            continue
        if not isinstance(value, str):
            _skip(report, split, index, value, "smiles is not a string")
            continue
        written = value.strip()
        key, reason = canonicalize(written)
        if key is None:
            _skip(report, split, index, value, reason)
        elif key in out:
            report["duplicates_removed"][split] += 1
        else:
            out[key] = written
    return out


def _smiles_of(items):
    return [item["smiles"] if isinstance(item, dict) and "smiles" in item else _NO_SMILES for item in items]


def _sample(pool, n, rng):
    if n >= len(pool):
        return list(pool)
    return [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]


def _role_rng(data_seed, role):
    return np.random.default_rng([data_seed, ROLES.index(role)])


def _new_report(path, items_per_split):
    return {"data_file": str(path), "data_file_sha256": file_sha256(path), "items_per_split": items_per_split,
            "skipped": [], "duplicates_removed": Counter(), "cross_split_duplicates_removed": Counter()}


def _exclusive_pools(firsts, id_splits, ood_splits, report):
    """Canonical pools per split: a molecule keeps its first split only, and one on both the ID and
    the OOD side is removed from both (counted)."""
    seen, pools = set(), {}
    for split in firsts:
        pools[split] = [c for c in firsts[split] if c not in seen]
        report["cross_split_duplicates_removed"][split] = len(firsts[split]) - len(pools[split])
        seen.update(pools[split])
    id_mols = set().union(*(firsts[s] for s in id_splits))
    ood_mols = set().union(*(firsts[s] for s in ood_splits))
    overlap = id_mols & ood_mols
    if overlap:
        log.warning("%d molecules appear in both ID and OOD splits: removed from both", len(overlap))
    report["id_ood_overlap_removed"] = len(overlap)
    report["id_ood_overlap_examples"] = sorted(overlap)[:20]
    return {s: [m for m in p if m not in overlap] for s, p in pools.items()}


def _split_ood_val_by_domain(path, pool, domain_of, train_n, val_n, data_seed):
    """OOD train / OOD val from whole ood_val domains, so that no OOD-val domain is seen in training.
    Domains in a seeded random order go to OOD val until it holds val_n molecules (at least one
    domain stays for training); each side is then drawn from its domains' molecules."""
    if any(domain_of[m] is None for m in pool):
        raise InputError(f"{path}: ood_val items without a domain_id; --ood_val_split domain needs one per item "
                         f"(or use --ood_val_split random)")
    domains = list(dict.fromkeys(domain_of[m] for m in pool))
    if len(domains) < 2:
        raise InputError(f"{path}: ood_val holds {len(domains)} domain; --ood_val_split domain needs at least two, "
                         f"so that OOD val can hold domains OOD training never saw (use --ood_val_split random)")
    size = Counter(domain_of[m] for m in pool)
    val_domains, held = set(), 0
    for i in _role_rng(data_seed, "ood_val").permutation(len(domains)):
        if held >= val_n or len(val_domains) == len(domains) - 1:
            break
        val_domains.add(domains[i])
        held += size[domains[i]]
    val_pool = [m for m in pool if domain_of[m] in val_domains]
    train_pool = [m for m in pool if domain_of[m] not in val_domains]
    return (_sample(train_pool, train_n, _role_rng(data_seed, "ood_train")),
            _sample(val_pool, val_n, _role_rng(data_seed, "ood_val")))


def _split_ood_val_at(pool, fraction, train_n, val_n, data_seed):
    """OOD train / OOD val as the reference OOD-DPO divides GOOD's OOD val: the pool shuffled, its
    first `fraction` OOD train's pool and the rest OOD val's, each then drawn like any other role.
    Returns {role: its pool, in file order} and the draws."""
    order = np.random.default_rng([data_seed, len(ROLES)]).permutation(len(pool))  # a stream of its own
    cut = int(len(pool) * fraction)
    pools = {"ood_train": [pool[i] for i in sorted(order[:cut])], "ood_val": [pool[i] for i in sorted(order[cut:])]}
    return pools, (_sample(pools["ood_train"], train_n, _role_rng(data_seed, "ood_train")),
                   _sample(pools["ood_val"], val_n, _role_rng(data_seed, "ood_val")))


def build_roles(path, sizes, data_seed, report, ood_val_split=DataSpec.ood_val_split, ood_train_fraction=None):
    """ID/OOD roles from a DrugOOD file: train→ID train, iid_val→ID val, iid_test→ID test,
    ood_val→disjoint OOD train + OOD val, ood_test→OOD test. `sizes` = (train, val, test) per side.
    ood_val_split: 'random' (disjoint molecules of the same domains, the reference protocol) or
    'domain' (disjoint domains). With 'random', ood_train_fraction (GOOD: 0.7) first cuts the shuffled
    ood_val into OOD train's and OOD val's pools at that fraction; None draws OOD train's molecules
    first, as the reference does on DrugOOD. Roles hold SMILES as written in the file."""
    splits = load_drugood(path)
    report.update(_new_report(path, {s: len(v) for s, v in splits.items()}))
    firsts = {s: _first_writings(_smiles_of(splits[s]), s, report) for s in SPLITS}
    pools = _exclusive_pools(firsts, ("train", "iid_val", "iid_test"), ("ood_val", "ood_test"), report)

    train_n, val_n, test_n = sizes
    ood_pools = {}  # the pools OOD train and OOD val draw from, when they are not all of ood_val
    roles = {"id_train": _sample(pools["train"], train_n, _role_rng(data_seed, "id_train")),
             "id_val": _sample(pools["iid_val"], val_n, _role_rng(data_seed, "id_val")),
             "id_test": _sample(pools["iid_test"], test_n, _role_rng(data_seed, "id_test")),
             "ood_test": _sample(pools["ood_test"], test_n, _role_rng(data_seed, "ood_test"))}
    if ood_val_split == "domain":
        domain_of = _first_item_field(splits["ood_val"], "domain_id")
        roles["ood_train"], roles["ood_val"] = _split_ood_val_by_domain(
            path, pools["ood_val"], {c: domain_of.get(firsts["ood_val"][c]) for c in pools["ood_val"]},
            train_n, val_n, data_seed)
        report["ood_val_domains"] = {r: sorted({str(domain_of.get(firsts["ood_val"][c])) for c in roles[r]})
                                     for r in ("ood_train", "ood_val")}
    elif ood_train_fraction is not None:
        ood_pools, (roles["ood_train"], roles["ood_val"]) = _split_ood_val_at(
            pools["ood_val"], ood_train_fraction, train_n, val_n, data_seed)
        report["ood_train_fraction"] = ood_train_fraction
    else:
        ood_pool = [pools["ood_val"][i] for i in _role_rng(data_seed, "ood_train").permutation(len(pools["ood_val"]))]
        n_ood_train = train_n
        if train_n + val_n > len(ood_pool):
            n_ood_train = round(len(ood_pool) * train_n / (train_n + val_n))
            log.warning("ood_val has %d usable molecules, fewer than --train_size + --val_size = %d: splitting it "
                        "%d / %d", len(ood_pool), train_n + val_n, n_ood_train, len(ood_pool) - n_ood_train)
        position = {m: i for i, m in enumerate(pools["ood_val"])}
        roles["ood_train"] = sorted(ood_pool[:n_ood_train], key=position.get)
        roles["ood_val"] = sorted(ood_pool[n_ood_train:n_ood_train + val_n], key=position.get)
    report["ood_val_split"] = ood_val_split
    role_split = dict(zip(ROLES, ("train", "iid_val", "iid_test", "ood_val", "ood_val", "ood_test")))
    roles = {r: [firsts[role_split[r]][c] for c in roles[r]] for r in ROLES}
    requested = dict(zip(ROLES, (train_n, val_n, test_n, train_n, val_n, test_n)))
    report["roles"] = {r: {"requested": requested[r], "available": len(ood_pools.get(r, pools[role_split[r]])),
                           "used": len(roles[r])} for r in ROLES}
    for role in ROLES:
        if len(roles[role]) < requested[role]:
            log.warning("%s: %d molecules requested, %d available", role, requested[role], len(roles[role]))
    check_roles(roles, path)
    return roles


def _first_item_field(items, field):
    """{SMILES as written: `field` of its first item} (None where that item has none)."""
    first = {}
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("smiles"), str):
            first.setdefault(item["smiles"].strip(), item.get(field))
    return first


def item_field(path, split, smiles, field):
    """The `field` of each SMILES' first item (as written) in `split` of a DrugOOD file; None where
    the item has none."""
    first = _first_item_field(load_drugood(path, (split,))[split], field)
    return [first.get(s) for s in smiles]


def check_roles(roles, source):
    for role, mols in roles.items():
        if not mols:
            raise InputError(f"{source}: role {role} has no usable molecules; check the file's "
                             f"'{role}' split and its SMILES")
    names = list(roles)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            leaked = {canonical(m) for m in roles[a]} & {canonical(m) for m in roles[b]}
            if leaked:
                raise InputError(f"{source}: {len(leaked)} molecules leaked between {a} and {b}, "
                                 f"e.g. {sorted(leaked)[0]}")


def attach_conformers(roles, report, settings, source, prepare=None):
    """Conformers for every role molecule (or, with `prepare`, another encoder's inputs: a function
    SMILES → ({SMILES: entry}, {SMILES: failure reason})); failures leave the roles and are recorded."""
    everything = [s for mols in roles.values() for s in mols]
    conformers, failures = prepare(everything) if prepare else get_conformers(everything, settings)
    if failures:
        reasons = Counter(reason_kind(r) for r in failures.values())
        log.warning("%d molecules without %s, skipped: %s", len(failures), "model inputs" if prepare else "a conformer",
                    ", ".join(f"{n} {why}" for why, n in reasons.most_common()))
    for smiles, reason in failures.items():
        role = next(r for r in roles if smiles in roles[r])
        report["skipped"].append({"split": role, "index": None, "value": smiles, "reason": reason})
    roles = {r: [s for s in mols if s in conformers] for r, mols in roles.items()}
    for r in roles:
        report["roles"][r]["used"] = len(roles[r])
    if not prepare:
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
    if two_d:
        log.warning("%d molecules got 2D coordinates (3D embedding failed), as unimol_tools would give them",
                    len(two_d))
    if unknown:
        log.warning("%d molecules hold elements outside the Uni-Mol dictionary, read as [UNK]: %s", unknown_mols,
                    ", ".join(f"{e} ×{n}" for e, n in unknown.most_common()))
    report["cropped_to_256_atoms"] = sum(1 for s in smiles_list if s in conformers and len(conformers[s][0]) == MAX_ATOMS)


def reason_kind(reason):
    """A skip reason without its particulars, for counting: '351 heavy atoms, above
    --max_heavy_atoms 350' → 'heavy atoms, above --max_heavy_atoms'."""
    return re.sub(r"\s*\(.*\)|\s*\b[\d.]+\b\s*(s\b)?", " ", reason).strip().replace("  ", " ")


def finalize_report(report):
    report["skipped_counts"] = dict(Counter(reason_kind(item["reason"]) for item in report["skipped"]))
    for key in ("duplicates_removed", "cross_split_duplicates_removed"):
        report[key] = dict(report.get(key, {}))
    return report


def load_benchmark(data_file, sizes, data_seed, settings=ConformerSettings(), ood_val_split=DataSpec.ood_val_split,
                   prepare=None, good_spec=None):
    """Roles, their conformers (or `prepare`'s inputs, see attach_conformers) and the data report for
    one DrugOOD file, or with `good_spec` (a GoodSpec) for GOOD's split of the raw file data_file
    (built once into the cache folder; OOD train / OOD val cut 70/30 as the reference does)."""
    report, fraction = {}, None
    if good_spec is not None:
        data_file, report["good"] = good_benchmark(data_file, good_spec, settings)
        fraction = good.OOD_TRAIN_FRACTION
    roles = build_roles(data_file, sizes, data_seed, report, ood_val_split, fraction)
    roles, conformers = attach_conformers(roles, report, settings, data_file, prepare)
    return roles, conformers, finalize_report(report)


# ----------------------------------------------------------------------------- GOOD benchmarks (good.py)

def good_spec(flags):
    """The GoodSpec that resolved flags ({flag: value}: main's, or a run's config.json) name; None for
    any other benchmark. main resolves --good_domain / --good_shift only for a GOOD --dataset given on
    the command line, so a DrugOOD file that happens to be called good_hiv.json stays a DrugOOD file."""
    if flags.get("dataset") not in good.CLI_DATASETS or flags.get("good_domain") is None:
        return None
    return GoodSpec(flags["dataset"], flags["good_domain"], flags["good_shift"])


def benchmark_name(flags):
    """How outputs name a run's benchmark: --dataset, for GOOD with its domain and shift."""
    spec = good_spec(flags)
    return spec.name if spec else flags["dataset"]


def build_good_split(raw_file, spec, raw_sha256=None):
    """GOOD's split `spec` of raw_file as a DrugOOD-format dict (good.build_good); a file that is not
    the raw file GOOD expects, or too small for the split, is a one-line error naming it."""
    try:
        return good.build_good(raw_file, good.CLI_DATASETS[spec.dataset], spec.domain, spec.shift, raw_sha256)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def good_report(doc, raw_file):
    """What config.json and data_report.json say about a GOOD build: the choice, the raw file, RDKit,
    GOOD's split sizes (DrugOOD's names), its domains, and the rows that did not parse."""
    cfg, stats = doc["cfg"], doc["statistics"]
    return {"dataset": f"good_{cfg['dataset']}", "domain": cfg["domain"], "shift": cfg["shift"],
            "raw_file": str(raw_file), "raw_sha256": cfg["raw_sha256"], "rdkit_version": cfg["rdkit_version"],
            "good_built_with_rdkit": good.GOOD_RDKIT, "code_version": cfg["code_version"],
            "split_sizes": {split: stats[split]["n_items"] for split in SPLITS},
            "n_domains": stats["all"]["n_domains"], "n_rows": stats["all"]["n_rows"],
            "n_molecules": stats["all"]["n_molecules"], "skipped_rows": stats["all"]["skipped_rows"],
            "unparsable_rows_in_splits": stats["all"]["unparsable_rows_in_splits"]}


def log_good_report(summary):
    """The build in two console lines."""
    log.info("GOOD-%s %s/%s from %s (SHA-256 %s…; RDKit %s, GOOD used %s): %d rows, %d molecules in %d domains, "
             "%d unparsable rows left out, %d kept in the splits (skipped later)",
             summary["dataset"].removeprefix("good_").upper(), summary["domain"], summary["shift"],
             summary["raw_file"], summary["raw_sha256"][:12], summary["rdkit_version"],
             summary["good_built_with_rdkit"], summary["n_rows"], summary["n_molecules"], summary["n_domains"],
             len(summary["skipped_rows"]), len(summary["unparsable_rows_in_splits"]))
    log.info("GOOD splits: %s", ", ".join(f"{split} {n}" for split, n in summary["split_sizes"].items()))


def good_benchmark(raw_file, spec, settings):
    """GOOD's split `spec` of raw_file as a DrugOOD file: built once into
    <cache_dir>/good/<good.cache_key>.json (the raw file's SHA-256, the choice, GOOD code and RDKit
    versions) and reused, rebuilt with settings.force. Returns (its path, good_report)."""
    name = good.CLI_DATASETS[spec.dataset]
    if not Path(raw_file).is_file():  # e.g. a run's raw file moved since it trained
        raise InputError(good.missing_raw_file(name, raw_file))
    raw_sha256 = file_sha256(raw_file)
    key = good.cache_key(raw_sha256, name, spec.domain, spec.shift)
    path, doc = Path(settings.cache_dir) / "good" / f"{key}.json", None
    team = distributed.current()
    if team.leader and (settings.force or not path.is_file()):  # one process builds; the team waits below
        log.info("building GOOD's %s split from %s into %s", spec.name, raw_file, path)
        doc = build_good_split(raw_file, spec, raw_sha256)
        atomic_write_json(path, doc, indent=None)
    team.barrier()
    doc = doc or read_json(path, "delete it, or pass --force_recompute_cache, to rebuild it")
    summary = good_report(doc, raw_file) | {"built_file": str(path)}
    log_good_report(summary)
    return path, summary


# ----------------------------------------------------------------------------- other benchmarks, user files

def read_table(path, smiles_column=None):
    """A molecule file as (columns, rows, SMILES per row), in file order (see iter_table)."""
    columns, rows = iter_table(path, smiles_column)
    rows = list(rows)
    return columns, [fields for fields, _ in rows], [smiles for _, smiles in rows]


def iter_table(path, smiles_column=None):
    """A molecule file as (columns, rows), rows a generator of (fields, SMILES) in file order that
    reads the file as it goes: memory does not grow with the file.

    .csv: every column kept; SMILES from `smiles_column` (default: a column named smiles, any case).
    .smi: the first whitespace-separated field is the SMILES and the rest of the line its name; an
    optional `smiles` header line and # comments are skipped. Either may be gzipped (.csv.gz, .smi.gz)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    gzipped = path.suffix.lower() == ".gz"
    kind = Path(path.stem).suffix.lower() if gzipped else path.suffix.lower()
    lines = _text_lines(path, gzipped)
    if kind == ".csv":
        table = (r for r in csv.reader(lines) if r)
        columns = next(table, None)
        if columns is None:
            raise InputError(f"{path}: empty CSV")
        wanted = smiles_column or "smiles"
        matches = [i for i, c in enumerate(columns) if c.strip().lower() == wanted.strip().lower()]
        if not matches:
            raise InputError(f"{path}: no '{wanted}' column (columns: {', '.join(columns)}); "
                             f"name the SMILES column with --smiles_column")
        padded = (r + [""] * (len(columns) - len(r)) for r in table)
        return columns, ((r, r[matches[0]]) for r in padded)
    if smiles_column:
        raise InputError(f"{path}: --smiles_column applies to .csv files; a .smi file has the SMILES first")

    def smi_rows():
        first = True
        for line in lines:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.strip().split(maxsplit=1)
            if first and fields[0].lower() == "smiles":  # a header line
                first = False
                continue
            first = False
            fields += [""] * (2 - len(fields))
            yield fields, fields[0]
    return ["smiles", "name"], smi_rows()


def _text_lines(path, gzipped):
    """Lines of a UTF-8 (optionally gzipped) text file, read as they are needed; bad bytes are a
    one-line error naming the line."""
    number = 0
    try:
        # -sig: a CSV saved by Excel starts with a BOM; newline="": the csv module sees quoted newlines
        with (gzip.open(path, "rt", encoding="utf-8-sig", newline="") if gzipped
              else open(path, encoding="utf-8-sig", newline="")) as f:
            for number, line in enumerate(f, 1):
                if "\x00" in line:
                    raise InputError(f"{path}: binary data (NUL bytes) on line {number}; "
                                     f"expected a .csv or .smi text file")
                yield line
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not a UTF-8 text file ({exc.reason} after line {number}); "
                         f"save it as UTF-8 CSV or SMILES") from None
    except (OSError, EOFError) as exc:
        what = "a readable gzip file" if gzipped else "readable"
        raise InputError(f"{path}: not {what} ({exc})") from None


def prepare_inputs(smiles, settings=ConformerSettings(), prepare=None):
    """User-given SMILES → ({row: SMILES as written}, conformers keyed by it, {row: failure reason});
    `prepare`: another encoder's inputs instead of conformers (see attach_conformers)."""
    written, failed = {}, {}
    for row, raw in enumerate(smiles):
        value, reason = canonicalize(raw.strip())
        if value is None:
            failed[row] = reason
        else:
            written[row] = raw.strip()
    unique = list(dict.fromkeys(written.values()))
    conformers, failures = prepare(unique) if prepare else get_conformers(unique, settings)
    for row in [r for r, s in written.items() if s in failures]:
        failed[row] = failures[written.pop(row)]
    return written, conformers, failed


def fragment_warning(smiles):
    """A warning for salts and mixtures, which Uni-Mol encodes as one molecule; '' otherwise."""
    n = len(Chem.GetMolFrags(Chem.MolFromSmiles(smiles)))
    return f"{n} fragments (salt or mixture) scored as one molecule; strip counter-ions first" if n > 1 else ""


def load_test_roles(path, test_size, data_seed, seen, good_spec=None, settings=ConformerSettings()):
    """ID test / OOD test roles of another benchmark, for scoring a trained detector on it.

    A DrugOOD JSON gives iid_test → ID and ood_test → OOD; a CSV gives its `smiles` rows by an
    `is_ood` column of 0 / 1; with `good_spec`, path is GOOD's raw file, read through its build
    (good_benchmark, cached under settings.cache_dir) as a DrugOOD file. Molecules in `seen`
    (canonical SMILES of the run's training and validation roles) are removed and counted; at most
    `test_size` per side are drawn with `data_seed`, by the same streams as a run's own test roles."""
    report = {}
    if good_spec is not None:
        path, report["good"] = good_benchmark(path, good_spec, settings)
    path = Path(path)
    if path.suffix.lower() == ".csv":
        columns, rows, smiles = read_table(path)
        label_col = [i for i, c in enumerate(columns) if c.strip().lower() == "is_ood"]
        if not label_col:
            raise InputError(f"{path}: no 'is_ood' column (0 = in-distribution, 1 = OOD); columns: {', '.join(columns)}")
        values = {"id_test": [], "ood_test": []}
        for n, row in enumerate(rows, start=2):
            label = row[label_col[0]].strip()
            if label not in ("0", "1"):
                raise InputError(f"{path}: line {n}: is_ood is {label!r}; it must be 0 (ID) or 1 (OOD)")
            values["ood_test" if label == "1" else "id_test"].append(smiles[n - 2])
        report.update(_new_report(path, {k: len(v) for k, v in values.items()}))
        firsts = {role: _first_writings(v, role, report) for role, v in values.items()}
    else:
        splits = load_drugood(path, ("iid_test", "ood_test"))
        report.update(_new_report(path, {s: len(v) for s, v in splits.items()}))
        firsts = {role: _first_writings(_smiles_of(splits[split]), split, report)
                  for role, split in (("id_test", "iid_test"), ("ood_test", "ood_test"))}
    pools = _exclusive_pools(firsts, ("id_test",), ("ood_test",), report)
    report["removed_seen_in_run"] = {r: sum(m in seen for m in p) for r, p in pools.items()}
    pools = {r: [m for m in p if m not in seen] for r, p in pools.items()}
    roles = {r: [firsts[r][c] for c in _sample(p, test_size, _role_rng(data_seed, r))] for r, p in pools.items()}
    report["roles"] = {r: {"requested": test_size, "available": len(pools[r]), "used": len(roles[r])} for r in roles}
    check_roles(roles, path)
    return roles, report

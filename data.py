"""Benchmarks: DrugOOD files, their ID/OOD roles and data reports, GOOD's splits built into the cache,
and another benchmark's test roles for scoring a trained detector on it.

Bookkeeping only: molecules stay SMILES strings as written (molecules.py gives their identity), and
what an encoder makes of them is attached later (features.attach_inputs). No torch."""
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np

import distributed
import good
from molecules import canonical, canonicalize, reason_kind
from settings import DataSpec, GoodSpec, MoleculeSettings
from tables import read_table
from utils import InputError, atomic_write_json, file_sha256, progress

log = logging.getLogger("energy_dpo.data")

SPLITS = ("train", "iid_val", "iid_test", "ood_val", "ood_test")
ROLES = ("id_train", "id_val", "id_test", "ood_train", "ood_val", "ood_test")
# ID molecules that no other role uses, drawn for predict's p-values: model selection never sees them, so
# they are exchangeable with new ID molecules (split-conformal calibration); a run has this role only when
# its file has such molecules
CALIBRATION = "id_cal"
CALIBRATION_STREAM = len(ROLES) + 1  # its seed stream: the roles' are 0-5, GOOD's OOD cut len(ROLES)


# ----------------------------------------------------------------------------- DrugOOD
# A molecule is kept as the SMILES string the file wrote (whitespace stripped): its encoder input,
# and so its features, come from that string (its atom order seeds Uni-Mol's conformer and MiniMol's
# Laplacian basis). Its canonical SMILES is its identity: duplicates and ID/OOD leaks are found on it.

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


def build_roles(path, sizes, data_seed, report, ood_val_split=DataSpec.ood_val_split, ood_train_fraction=None,
                calibration_size=0):
    """ID/OOD roles from a DrugOOD file: train→ID train, iid_val→ID val, iid_test→ID test,
    ood_val→disjoint OOD train + OOD val, ood_test→OOD test, and up to `calibration_size` ID molecules
    of the three ID splits that no other role drew → CALIBRATION (left out when there are none).
    `sizes` = (train, val, test) per side.
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
    drawn = {c for mols in roles.values() for c in mols}
    spare = [(split, c) for split in ("train", "iid_val", "iid_test") for c in pools[split] if c not in drawn]
    calibration = _sample(spare, calibration_size, np.random.default_rng([data_seed, CALIBRATION_STREAM]))
    roles = {r: [firsts[role_split[r]][c] for c in roles[r]] for r in ROLES}
    requested = dict(zip(ROLES, (train_n, val_n, test_n, train_n, val_n, test_n)))
    report["roles"] = {r: {"requested": requested[r], "available": len(ood_pools.get(r, pools[role_split[r]])),
                           "used": len(roles[r])} for r in ROLES}
    for role in ROLES:
        if len(roles[role]) < requested[role]:
            log.warning("%s: %d molecules requested, %d available", role, requested[role], len(roles[role]))
    if calibration_size:
        report["roles"][CALIBRATION] = {"requested": calibration_size, "available": len(spare),
                                        "used": len(calibration)}
        if len(calibration) < calibration_size:
            log.warning("%s (calibration): %d molecules requested, %d ID molecules unused by the other roles%s",
                        CALIBRATION, calibration_size, len(spare), "" if calibration else
                        ": predict's p-values will be calibrated on id_val, which model selection also used")
    if calibration:
        roles[CALIBRATION] = [firsts[split][c] for split, c in calibration]
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


def finalize_report(report):
    report["skipped_counts"] = dict(Counter(reason_kind(item["reason"]) for item in report["skipped"]))
    for key in ("duplicates_removed", "cross_split_duplicates_removed"):
        report[key] = dict(report.get(key, {}))
    return report


def load_benchmark(data_file, sizes, data_seed, settings=MoleculeSettings(), ood_val_split=DataSpec.ood_val_split,
                   good_spec=None, calibration_size=0):
    """Roles and the data report for one DrugOOD file, or with `good_spec` (a GoodSpec) for GOOD's split
    of the raw file data_file (built once into settings.cache_dir; OOD train / OOD val cut 70/30 as the
    reference does), with up to `calibration_size` calibration molecules (build_roles). An encoder's
    inputs are attached to the roles next (features.attach_inputs)."""
    report, fraction = {}, None
    if good_spec is not None:
        data_file, report["good"] = good_benchmark(data_file, good_spec, settings)
        fraction = good.OOD_TRAIN_FRACTION
    roles = build_roles(data_file, sizes, data_seed, report, ood_val_split, fraction, calibration_size)
    return roles, report


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
    # one process builds (again, when the cached build is damaged); the team waits below
    if team.leader and (settings.force or not path.is_file() or _build_summary(path, raw_file) is None):
        log.info("building GOOD's %s split from %s into %s", spec.name, raw_file, path)
        doc = build_good_split(raw_file, spec, raw_sha256)
        atomic_write_json(path, doc, indent=None)
    team.barrier()
    summary = good_report(doc, raw_file) if doc else _build_summary(path, raw_file)
    if summary is None:
        raise InputError(f"{path}: not a complete GOOD build; delete it, or pass --force_recompute_cache, to "
                         f"rebuild it")
    summary |= {"built_file": str(path)}
    log_good_report(summary)
    return path, summary


def _build_summary(path, raw_file):
    """good_report of a cached GOOD build, or None (with a warning) when the file is not a complete build:
    valid JSON of another shape ({}), splits that are not lists, a cut file."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        summary = good_report(doc, raw_file)
        if not all(isinstance(doc["split"][split], list) for split in SPLITS):
            raise TypeError("a split is not a list of items")
        return summary
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s: not a complete GOOD build (%s: %s)", path, type(exc).__name__, str(exc)[:80])
        return None


# ----------------------------------------------------------------------------- other benchmarks

def load_test_roles(path, test_size, data_seed, seen, good_spec=None, settings=MoleculeSettings()):
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

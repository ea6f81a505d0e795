"""GOOD's molecular OOD splits (GOOD-HIV, GOOD-PCBA, GOOD-ZINC; Gui et al. 2022, github divelab/GOOD,
branch GOODv1) rebuilt from the raw files GOOD starts from, as DrugOOD-format dicts.

GOOD publishes its splits only as pickled PyG graphs; here they are rebuilt from MoleculeNet's
HIV.csv / pcba.csv.gz and chemical_vae's 250k_rndm_zinc_drugs_clean_3.csv by the steps of GOOD's
process() (no_shift, domains, covariate, concept), drawing from Python's `random` seeded with 123
in GOOD's order, so that a split equals GOOD's for the same file and RDKit (GOOD used RDKit
2020.09.5; another RDKit may write other scaffolds).

The dict: {"cfg", "split", "statistics"}, like a DrugOOD file. GOOD's roles map to its splits as
train -> "train", id_val -> "iid_val", id_test -> "iid_test", OOD val -> "ood_val", OOD test ->
"ood_test". Energy-DPO's caller then, as the reference OOD-DPO does, shuffles "ood_val" with seed 42
and splits it 70/30 into auxiliary OOD train / OOD val; "ood_test" is OOD test. Each item is
{"smiles" (as in the file; ZINC's trailing newline stripped), "domain_id" (GOOD's), "label" (HIV 0/1,
PCBA a list of 128 with null for missing, ZINC logP - SAS - rings of 6+ atoms), "index" (the row:
0-based among the non-blank rows after the header)}.

SMILES that RDKit cannot parse: for HIV and PCBA GOOD reads through PyG 2.0.4's MoleculeNet, which
drops them before GOOD sees the data, so they take no part here either (not counted, no draws).
GOOD's own ZINC reader keeps them as empty graphs (no rings); the size domain then counts
len(SMILES as read, trailing newline included), so they take part and stay in the splits. GOOD's
scaffold domain fails on them (RDKit raises); here they are left out of a ZINC scaffold build
instead. Their rows are listed in statistics["all"]: "skipped_rows" (left out) and
"unparsable_rows_in_splits" (ZINC size; the caller skips them when it parses the splits).
"""
import csv
import gzip
import itertools
import random

import numpy as np
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

from utils import file_sha256

GOOD_DATASETS = ("hiv", "pcba", "zinc")
GOOD_DOMAINS = ("scaffold", "size")
GOOD_SHIFTS = ("covariate", "concept")  # no_shift has no OOD molecules
GOOD_SEED = 123  # GOOD's default config seed, set before each domain's generation
GOOD_CODE_VERSION = 1  # bump whenever a change here can change a split: cached builds are then stale
ROLES = ("train", "iid_val", "iid_test", "ood_val", "ood_test")

CLI_DATASETS = {f"good_{name}": name for name in GOOD_DATASETS}  # --dataset good_hiv -> hiv
# Where each raw file comes from: the addresses GOOD downloads from (HIV and PCBA through PyG
# 2.0.4's MoleculeNet, ZINC from chemical_vae's repository).
SOURCES = {"hiv": "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/HIV.csv",
           "pcba": "https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/pcba.csv.gz",
           "zinc": "https://raw.githubusercontent.com/aspuru-guzik-group/chemical_vae/master/models/"
                   "zinc_properties/250k_rndm_zinc_drugs_clean_3.csv"}
GOOD_RDKIT = "2020.09.5"  # the RDKit GOOD built its splits with
# The reference OOD-DPO's use of GOOD's OOD val: shuffled, the first 70% auxiliary OOD train, the rest OOD val.
OOD_TRAIN_FRACTION = 0.7

EXPECTED = {"hiv": "MoleculeNet's HIV.csv: smiles, activity, HIV_active",
            "pcba": "MoleculeNet's pcba.csv.gz: 128 PCBA-* assay columns, mol_id, smiles",
            "zinc": "chemical_vae's 250k_rndm_zinc_drugs_clean_3.csv: smiles, logP, qed, SAS"}
REQUIRED = {"hiv": ("smiles", "HIV_active"), "pcba": ("smiles",), "zinc": ("smiles", "logP", "SAS")}
PCBA_ASSAYS = 128

# The concept shift's sub-splits in GOOD's order: (label bias, is a train sub-split, picking ratio).
# ZINC's has its first test sub-split third instead of second.
CONCEPT_SUBSPLITS = {
    "hiv": ((0.95, True, 0.3), (0.95, False, 0.5), (0.9, True, 0.6), (0.85, True, 1), (0.5, False, 1)),
    "pcba": ((0.95, True, 0.3), (0.95, False, 0.5), (0.9, True, 0.6), (0.85, True, 1), (0.5, False, 1)),
    "zinc": ((0.95, True, 0.3), (0.9, True, 0.5), (0.95, False, 0.6), (0.85, True, 1), (0.5, False, 1)),
}


def check_choices(dataset, domain, shift):
    if dataset not in GOOD_DATASETS:
        raise ValueError(f"unknown GOOD dataset '{dataset}' (choose from {', '.join(GOOD_DATASETS)})")
    if domain not in GOOD_DOMAINS:
        raise ValueError(f"unknown GOOD domain '{domain}' (choose from {', '.join(GOOD_DOMAINS)})")
    if shift == "no_shift":
        raise ValueError("GOOD's no_shift split has no OOD molecules, so it cannot test OOD detection "
                         f"(choose from {', '.join(GOOD_SHIFTS)})")
    if shift not in GOOD_SHIFTS:
        raise ValueError(f"unknown GOOD shift '{shift}' (choose from {', '.join(GOOD_SHIFTS)})")


def missing_raw_file(dataset, path):
    """What to do when GOOD-`dataset`'s raw file is not at `path` (None: not given)."""
    where = f"{path}: file not found; " if path else ""
    return (f"{where}GOOD-{dataset.upper()} is built from {EXPECTED[dataset].split(':')[0]}: download it from "
            f"{SOURCES[dataset]} and pass it as --data_file")


def cache_key(raw_sha256, dataset, domain, shift):
    """A name for one build: a new raw file, choice, code version or RDKit (scaffolds) gives a new one."""
    check_choices(dataset, domain, shift)
    return f"good-{dataset}-{domain}-{shift}-v{GOOD_CODE_VERSION}-rdkit{rdBase.rdkitVersion}-{raw_sha256[:16]}"


def _bad_file(path, dataset, what):
    return ValueError(f"{path}: {what} (GOOD-{dataset.upper()} expects {EXPECTED[dataset]}, from {SOURCES[dataset]})")


def _number(text, path, index, column):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}: row {index} has {column} {text!r}, not a number") from None


def _binary(text, path, index, column):
    value = _number(text, path, index, column)
    if value not in (0, 1):
        raise ValueError(f"{path}: row {index} has {column} {text!r}, not 0 or 1")
    return int(value)


def _label_reader(header, path, dataset):
    """row -> label as the file gives it (ZINC: logP - SAS; the rings come with the molecule)."""
    missing = [name for name in REQUIRED[dataset] if name not in header]
    if missing:
        raise _bad_file(path, dataset, f"no column {', '.join(missing)}")
    col = {name: i for i, name in enumerate(header)}
    if dataset == "hiv":
        return lambda row, i: _binary(row[col["HIV_active"]], path, i, "HIV_active")
    if dataset == "zinc":
        return lambda row, i: (_number(row[col["logP"]], path, i, "logP")
                               - _number(row[col["SAS"]], path, i, "SAS"))
    assays = [name for name in header if name.startswith("PCBA-")]
    if len(assays) != PCBA_ASSAYS:
        raise _bad_file(path, dataset, f"{len(assays)} PCBA-* assay columns, not {PCBA_ASSAYS}")
    return lambda row, i: [None if row[col[a]] == "" else _binary(row[col[a]], path, i, a) for a in assays]


def read_raw(path, dataset):
    """[(row index, SMILES as the file holds it, label)] for every non-blank data row, in file order;
    a .gz file is read as gzip."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
            rows = (row for row in csv.reader(f) if row)
            header = next(rows, None)
            if header is None:
                raise _bad_file(path, dataset, "empty file")
            label_of, smiles_col = _label_reader(header, path, dataset), header.index("smiles")
            out = []
            for index, row in enumerate(rows):
                if len(row) != len(header):
                    raise _bad_file(path, dataset, f"row {index} has {len(row)} fields, the header {len(header)}")
                out.append((index, row[smiles_col], label_of(row, index)))
    # not text, not gzip, truncated, NUL bytes: the file is not what was downloaded
    except (UnicodeDecodeError, OSError, EOFError, csv.Error) as exc:
        raise _bad_file(path, dataset, f"cannot be read as a {'gzipped ' if opener is gzip.open else ''}CSV "
                        f"({str(exc)[:100]})") from None
    return out


def _float32(x):
    """GOOD keeps labels and their means in float32 torch tensors; comparisons see these values."""
    return float(np.float32(x))


def _pyx(label):
    """GOOD's per-molecule P(y|x): the mean of the known labels, 0 when none is known."""
    if isinstance(label, list):
        known = [y for y in label if y is not None]
        return _float32(sum(known) / len(known)) if known else 0.0
    return _float32(label)


def _molecule(index, text, label, dataset, domain):
    """A molecule for the construction, or None where GOOD has none (see the module docstring)."""
    mol = Chem.MolFromSmiles(text)
    parsed = mol is not None
    if not parsed and (dataset != "zinc" or domain == "scaffold"):
        return None
    if dataset == "zinc":  # y = logP - SAS - number of rings with at least 6 atoms; GOOD's empty graph has none
        rings = mol.GetRingInfo().AtomRings() if parsed else ()
        label -= float(sum(len(ring) >= 6 for ring in rings))
    if domain == "scaffold":
        value = MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)
    else:
        value = mol.GetNumAtoms() if parsed else len(text)  # GOOD's fallback, on the SMILES as read
    return {"index": index, "smiles": text.strip(), "label": label, "pyx": _pyx(label),
            "value": value, "parsed": parsed}


def domain_sorted(molecules):
    """GOOD's stable sort by domain value; each molecule's domain_id is its value's rank."""
    ordered = sorted(molecules, key=lambda m: m["value"])
    for rank, (_, group) in enumerate(itertools.groupby(ordered, key=lambda m: m["value"])):
        for m in group:
            m["domain_id"] = rank
    return ordered


def _consume_no_shift(rng, n):
    """GOOD builds no_shift first from the same generator: one shuffle, one env id per train molecule."""
    rng.shuffle(list(range(n)))
    for _ in range(int(n * 0.6)):
        rng.randint(0, 9)


def _id_split(pool, n_id):
    """GOOD's slices of the shuffled pool (n_id = 0 leaves train empty, as GOOD's do)."""
    return {"train": pool[:-2 * n_id], "iid_val": pool[-2 * n_id:-n_id], "iid_test": pool[-n_id:]}


def covariate_split(ordered, dataset, domain, rng):
    """Whole domains to train pool / OOD val / OOD test at int(0.8 N) and int(0.9 N), each cut moved
    on to the next domain change; size runs largest first (ZINC: both domains reversed)."""
    if dataset == "zinc" or domain == "size":
        ordered = ordered[::-1]
    n = len(ordered)
    starts = (0, int(n * 0.8), int(n * 0.9))
    parts, part, previous = ([], [], []), -1, None
    for i, m in enumerate(ordered):
        if part < 2 and i >= starts[part + 1] and m["domain_id"] != previous:
            part += 1  # at most one step per molecule: a late first cut delays the second
        previous = m["domain_id"]
        parts[part].append(m)
    pool, ood_val, ood_test = parts
    rng.shuffle(pool)
    return {**_id_split(pool, int(n * 0.1)), "ood_val": ood_val, "ood_test": ood_test}


def concept_threshold(ordered, dataset):
    """The P(y|x) that splits a domain's molecules into two sides: the mean (ZINC: the median)."""
    pyx = [m["pyx"] for m in ordered]
    if dataset == "zinc":
        return np.float32(np.sort(pyx)[len(pyx) // 2])
    return np.float32(np.mean(pyx))  # torch compares a float32 tensor with it in float32


def _pick(domain, sign, subsplit, take_all, strict, rng):
    """One domain's molecules for one sub-split. `sign` * side > 0: the side the sub-split favours,
    taken with probability bias; the other side with 1 - bias; both only when picked (ratio)."""
    bias, _, ratio = subsplit
    chosen, seen, taken, last_left = [], [False, False], [False, False], [None, None]
    for m in domain:
        picking, data = rng.random(), rng.random()  # GOOD draws both for every molecule, always
        if take_all:
            chosen.append(m)
            continue
        agreement = sign * m["side"]
        if agreement > 0:
            branch, wanted = 0, data < bias
        elif agreement < 0 or not strict:
            branch, wanted = 1, data > bias
        else:
            continue  # ZINC: a molecule at the median is on neither side
        seen[branch] = True
        if wanted and picking < ratio:
            taken[branch] = True
            chosen.append(m)
        else:
            last_left[branch] = m
    if all(seen) and any(taken) and not all(taken):
        chosen.append(last_left[taken.index(False)])  # keep both labels in the sub-split
    return chosen


def concept_split(ordered, dataset, rng):
    """GOOD's concept shift: five biased sub-splits drawn domain by domain in ascending order; a
    domain in the first half of the molecules favours the upper side in train, the lower in OOD.
    Marks each molecule's side of the threshold (+1, 0, -1)."""
    threshold = concept_threshold(ordered, dataset)
    for m in ordered:
        m["side"] = int(np.float32(m["pyx"]) > threshold) - int(np.float32(m["pyx"]) < threshold)
    domains = [list(group) for _, group in itertools.groupby(ordered, key=lambda m: m["domain_id"])]
    signs, before = [], 0
    for molecules in domains:
        signs.append(1 if before < len(ordered) / 2 else -1)
        before += len(molecules)
    subsplits = CONCEPT_SUBSPLITS[dataset]
    picked = []
    for k, subsplit in enumerate(subsplits):
        chosen_here = []
        for d, molecules in enumerate(domains):
            sign = signs[d] if subsplit[1] else -signs[d]
            chosen = _pick(molecules, sign, subsplit, k == len(subsplits) - 1, dataset == "zinc", rng)
            chosen_ids = {id(m) for m in chosen}
            domains[d] = [m for m in molecules if id(m) not in chosen_ids]
            chosen_here += chosen
        picked.append(chosen_here)
    train = [m for chosen, s in zip(picked, subsplits) if s[1] for m in chosen]
    first_test = next(k for k, s in enumerate(subsplits) if not s[1])
    rng.shuffle(train)
    return {**_id_split(train, int(len(train) * 0.15)), "ood_val": picked[-1], "ood_test": picked[first_test]}


def _item(m):
    return {"smiles": m["smiles"], "domain_id": m["domain_id"], "label": m["label"], "index": m["index"]}


def _statistics(roles, rows, ordered, dataset, shift):
    in_build = {m["index"] for m in ordered}
    stats = {role: {"n_items": len(roles[role]), "n_domains": len({m["domain_id"] for m in roles[role]})}
             for role in ROLES}
    stats["all"] = {"n_rows": len(rows), "n_molecules": len(ordered),
                    "n_domains": len({m["domain_id"] for m in ordered}),
                    "n_rows_skipped_unparsable": len(rows) - len(ordered),
                    "skipped_rows": [index for index, _, _ in rows if index not in in_build],
                    "unparsable_rows_in_splits": [m["index"] for m in ordered if not m["parsed"]]}
    if shift == "concept":
        stats["all"]["concept_threshold"] = float(concept_threshold(ordered, dataset))
    return stats


def build_good(raw_path, dataset, domain, shift, raw_sha256=None):
    """GOOD's `shift` split of `dataset` by `domain` from its raw file, as a DrugOOD-format dict.
    raw_sha256: the file's SHA-256 if the caller has it already (it goes into cfg)."""
    check_choices(dataset, domain, shift)
    rows = read_raw(raw_path, dataset)
    with rdBase.BlockLogs():  # unparseable molecules are expected and counted, not logged one by one
        molecules = [m for m in (_molecule(*row, dataset, domain) for row in rows) if m is not None]
    too_few = f"{raw_path}: too few molecules for GOOD-{dataset.upper()} {domain} {shift}"
    if not molecules:
        raise ValueError(f"{too_few}: none of its {len(rows)} rows parses")
    ordered = domain_sorted(molecules)
    rng = random.Random(GOOD_SEED)
    _consume_no_shift(rng, len(ordered))
    roles = covariate_split(ordered, dataset, domain, rng)  # concept draws after covariate's shuffle
    if shift == "concept":
        roles = concept_split(ordered, dataset, rng)
    sizes = ", ".join(f"{role} {len(roles[role])}" for role in ROLES)
    empty = [role for role in ROLES if not roles[role]]
    if empty:
        raise ValueError(f"{too_few}: {empty[0]} is empty ({sizes}; {len(ordered)} molecules)")
    cfg = {"source": "GOOD (github divelab/GOOD, GOODv1), rebuilt from the raw file", "dataset": dataset,
           "domain": domain, "shift": shift, "raw_file": str(raw_path),
           "raw_sha256": raw_sha256 or file_sha256(raw_path), "rdkit_version": rdBase.rdkitVersion,
           "seed": GOOD_SEED, "code_version": GOOD_CODE_VERSION}
    return {"cfg": cfg, "split": {role: [_item(m) for m in roles[role]] for role in ROLES},
            "statistics": _statistics(roles, rows, ordered, dataset, shift)}

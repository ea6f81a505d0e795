"""Rebuild the shipped demo benchmark (data/demo/*.json) from MoleculeACE 3.0.0.

The seven ChEMBL EC50 sets bundled in the MoleculeACE 3.0.0 wheel
(MoleculeACE/Data/benchmark_data/CHEMBL*_EC50.csv) are pooled into one list of
(molecule, target) measurements and split three times with DrugOOD's curation
rules -- by Bemis-Murcko scaffold, by assay (= target) and by molecule size --
giving three files in DrugOOD's JSON layout:

    {"cfg": {...}, "split": {"train", "iid_val", "iid_test", "ood_val",
     "ood_test"}, "statistics": {...}}

The CSVs are read straight out of the wheel zip; MoleculeACE is never
installed (its metadata pins the obsolete rdkit-pypi). Output is
deterministic: the same wheel gives byte-identical JSON.

Usage:
    python data/build_demo.py [--wheel MoleculeACE-3.0.0-py3-none-any.whl]
                              [--out_dir data/demo]
"""

import argparse
import glob
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pandas as pd
from rdkit import Chem, RDLogger
from rdkit.Chem.Scaffolds import MurckoScaffold

SOURCE = "MoleculeACE==3.0.0"
CSV_PATTERN = re.compile(r"^MoleculeACE/Data/benchmark_data/(CHEMBL\d+)_EC50\.csv$")
SPLITS = ("train", "iid_val", "iid_test", "ood_val", "ood_test")
DOMAINS = ("scaffold", "assay", "size")
OOD_TRAIN_FRAC = 0.6      # cumulative share of items in the train domains
OOD_VAL_FRAC = 0.2        # next share -> ood_val, the rest -> ood_test
IID_FRACS = (0.6, 0.2)    # train / iid_val inside train domains; rest iid_test
SEED = 42
THRESHOLD_BOUNDS = (4.0, 6.0)
THRESHOLD_FALLBACK = 5.0


def fetch_wheel(dest):
    """Download the MoleculeACE 3.0.0 wheel (no dependencies) into dest."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                    "--only-binary", ":all:", SOURCE, "-d", dest], check=True)
    wheels = glob.glob(os.path.join(dest, "MoleculeACE-3.0.0-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"expected one MoleculeACE 3.0.0 wheel in {dest}, found {wheels}")
    return wheels[0]


def read_csvs(wheel):
    """Return {chembl_id: DataFrame} for the *_EC50.csv files in the wheel."""
    tables = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            match = CSV_PATTERN.match(name)
            if match:
                tables[match.group(1)] = pd.read_csv(io.BytesIO(zf.read(name)))
    if not tables:
        sys.exit(f"no *_EC50.csv files found in {wheel}")
    return dict(sorted(tables.items()))  # assay_id = rank in sorted CHEMBL id order


def build_records(tables):
    """One record per parseable (molecule, target) row; returns (records, n_skipped)."""
    records, skipped = [], 0
    for assay_id, (target, df) in enumerate(tables.items()):
        p_ec50 = 9.0 - np.log10(df["exp_mean [nM]"].to_numpy(dtype=float))
        # MoleculeACE's y column is -log10(EC50 / nM) = pEC50 - 9.
        if not np.allclose(p_ec50 - 9.0, df["y"].to_numpy(dtype=float), atol=1e-6):
            sys.exit(f"{target}: pEC50 from exp_mean disagrees with column y")
        for row, (smiles, value) in enumerate(zip(df["smiles"], p_ec50)):
            mol = Chem.MolFromSmiles(smiles)
            if mol is None or not math.isfinite(value):
                skipped += 1
                continue
            scaffold = MurckoScaffold.MurckoScaffoldSmiles(mol=mol)
            scaffold_mol = Chem.MolFromSmiles(scaffold) if scaffold else None
            records.append({
                "smiles": smiles,
                "canonical": Chem.MolToSmiles(mol),
                "reg_label": round(float(value), 4),
                "assay_id": assay_id,
                "target": target,
                "row": row,
                "scaffold": scaffold,
                "scaffold_atoms": scaffold_mol.GetNumHeavyAtoms() if scaffold_mol else 0,
                "size": mol.GetNumHeavyAtoms(),
            })
    return records, skipped


def domain_order(records, domain):
    """Return (key function, sorted list of domain keys) for a domain type."""
    if domain == "scaffold":
        atoms = {r["scaffold"]: r["scaffold_atoms"] for r in records}
        keys = sorted(atoms, key=lambda s: (-atoms[s], s))
        return (lambda r: r["scaffold"]), keys
    if domain == "assay":
        counts = {}
        for r in records:
            counts[r["target"]] = counts.get(r["target"], 0) + 1
        keys = sorted(counts, key=lambda t: (-counts[t], t))
        return (lambda r: r["target"]), keys
    if domain == "size":
        keys = sorted({r["size"] for r in records}, reverse=True)
        return (lambda r: r["size"]), keys
    raise ValueError(domain)


def cut_points(counts):
    """Domain indices (i, j): train = [:i], ood_val = [i:j], ood_test = [j:].

    DrugOOD rule: take domains until the cumulative share reaches 60 %
    (train domains), then until it reaches 80 % (ood_val); the rest is
    ood_test. If that leaves a role empty (few domains), use the pair of
    domain boundaries closest to the 60 % / 80 % targets that keeps every
    role non-empty.
    """
    total = sum(counts)
    cum = np.concatenate([[0], np.cumsum(counts)])
    goal_i, goal_j = OOD_TRAIN_FRAC * total, (OOD_TRAIN_FRAC + OOD_VAL_FRAC) * total
    i = int(np.argmax(cum >= goal_i))
    j = int(np.argmax(cum >= goal_j))
    k = len(counts)
    if 1 <= i < j < k:
        return i, j, False
    if k < 3:
        sys.exit("need at least three domains for train / ood_val / ood_test")
    pairs = [(a, b) for a in range(1, k - 1) for b in range(a + 1, k)]
    best = min(pairs, key=lambda p: (abs(cum[p[0]] - goal_i) + abs(cum[p[1]] - goal_j), p))
    return best[0], best[1], True


def make_split(records, domain):
    """Assign every record to one of the five splits; return (split, info)."""
    key_of, keys = domain_order(records, domain)
    rank = {k: n for n, k in enumerate(keys)}
    ordered = sorted(records, key=lambda r: (rank[key_of(r)], r["assay_id"], r["row"]))
    counts = [0] * len(keys)
    for r in ordered:
        counts[rank[key_of(r)]] += 1
    i, j, adjusted = cut_points(counts)

    split = {name: [] for name in SPLITS}
    in_domain = []
    for r in ordered:
        d = rank[key_of(r)]
        item = (d, r)
        if d < i:
            in_domain.append(item)
        elif d < j:
            split["ood_val"].append(item)
        else:
            split["ood_test"].append(item)

    perm = np.random.default_rng(SEED).permutation(len(in_domain))
    n_train = int(IID_FRACS[0] * len(in_domain))
    n_val = int(IID_FRACS[1] * len(in_domain))
    for pos, idx in enumerate(perm):
        name = "train" if pos < n_train else "iid_val" if pos < n_train + n_val else "iid_test"
        split[name].append(in_domain[idx])
    for name in ("train", "iid_val", "iid_test"):
        split[name].sort(key=lambda item: (item[0], item[1]["assay_id"], item[1]["row"]))

    info = {"n_domains": len(keys), "n_train_domains": i, "n_ood_val_domains": j - i,
            "n_ood_test_domains": len(keys) - j, "cut_points_adjusted": adjusted}
    return split, info


def to_item(domain_id, r, threshold):
    return {"smiles": r["smiles"], "reg_label": r["reg_label"], "assay_id": r["assay_id"],
            "cls_label": int(r["reg_label"] >= threshold), "domain_id": domain_id}


def statistics(split, records, skipped, threshold):
    stats = {}
    for name, items in split.items():
        stats[name] = {"n_items": len(items),
                       "n_domains": len({d for d, _ in items}),
                       "n_unique_molecules": len({r["canonical"] for _, r in items}),
                       "n_positive": sum(r["reg_label"] >= threshold for _, r in items)}
    id_mols = {r["canonical"] for n in SPLITS[:3] for _, r in split[n]}
    ood_mols = {r["canonical"] for n in SPLITS[3:] for _, r in split[n]}
    stats["all"] = {"n_items": len(records),
                    "n_unique_molecules": len({r["canonical"] for r in records}),
                    "n_rows_skipped_unparsable": skipped,
                    "n_molecules_in_both_id_and_ood": len(id_mols & ood_mols)}
    return stats


def build_cfg(domain, tables, threshold, median, info):
    return {
        "note": ("Demo benchmark derived from MoleculeACE 3.0.0 (ChEMBL EC50 data) with "
                 "DrugOOD-style curation; NOT an official DrugOOD file. Data: ChEMBL, "
                 "CC BY-SA 3.0."),
        "source": SOURCE,
        "source_files": [f"MoleculeACE/Data/benchmark_data/{t}_EC50.csv" for t in tables],
        "assay_targets": list(tables),
        "task": "ec50",
        "domain": domain,
        "domain_sort": {"scaffold": "scaffold heavy atoms, descending (ties: scaffold SMILES)",
                        "assay": "items per target, descending (ties: CHEMBL id)",
                        "size": "molecule heavy atoms, descending"}[domain],
        "reg_label": "pEC50 = 9 - log10(exp_mean [nM]), rounded to 4 decimals",
        "classification_threshold": {"value": threshold, "median": round(median, 4),
                                     "lower_bound": THRESHOLD_BOUNDS[0],
                                     "upper_bound": THRESHOLD_BOUNDS[1],
                                     "fix_value": THRESHOLD_FALLBACK},
        "fractions": {"train_fraction_ood": OOD_TRAIN_FRAC, "val_fraction_ood": OOD_VAL_FRAC,
                      "iid_train_sample_fractions": IID_FRACS[0],
                      "iid_val_sample_fractions": IID_FRACS[1]},
        "cut_points": ("whole domains; cumulative share >= 0.6 -> train domains, >= 0.8 -> "
                       "ood_val, rest ood_test; if a role would be empty, the nearest domain "
                       "boundaries keeping all roles non-empty"),
        "seed": SEED,
        **info,
    }


def write_variant(path, domain, records, skipped, tables):
    labels = [r["reg_label"] for r in records]
    median = float(np.median(labels))
    lo, hi = THRESHOLD_BOUNDS
    threshold = median if lo <= median <= hi else THRESHOLD_FALLBACK
    split, info = make_split(records, domain)
    for name, items in split.items():
        if not items:
            sys.exit(f"{domain}: split {name} is empty")
    doc = {"cfg": build_cfg(domain, tables, threshold, median, info),
           "split": {n: [to_item(d, r, threshold) for d, r in split[n]] for n in SPLITS},
           "statistics": statistics(split, records, skipped, threshold)}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, separators=(",", ":"), ensure_ascii=True)
        fh.write("\n")
    return doc


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheel", help="path to MoleculeACE-3.0.0-py3-none-any.whl "
                        "(downloaded with pip if omitted)")
    parser.add_argument("--out_dir", default="data/demo")
    args = parser.parse_args()

    RDLogger.DisableLog("rdApp.*")
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(tmp)
        tables = read_csvs(wheel)
    records, skipped = build_records(tables)
    os.makedirs(args.out_dir, exist_ok=True)
    for domain in DOMAINS:
        path = os.path.join(args.out_dir, f"demo_ec50_{domain}.json")
        doc = write_variant(path, domain, records, skipped, tables)
        sizes = ", ".join(f"{n}={len(doc['split'][n])}" for n in SPLITS)
        print(f"{path}: {sizes}")


if __name__ == "__main__":
    main()

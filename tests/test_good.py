"""GOOD's molecular splits rebuilt from raw files: a covariate split worked out by hand, the rules of
reference_facts §10 checked on every domain and shift, a re-derivation of both shifts from the prose,
the ZINC and PCBA layouts, and the one-line errors; then the command line: --mode prepare, training
on a GOOD dataset (built once into the cache, OOD val cut 70/30), eval on one, and the flag errors."""
import csv
import gzip
import hashlib
import itertools
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem, rdBase
from rdkit.Chem.Scaffolds import MurckoScaffold

import data
import good
from conftest import DEMO
from main import main

UNPARSEABLE = "C1CC(N"


def _hash(text, salt=""):
    return int(hashlib.sha256((salt + text).encode()).hexdigest(), 16)


def demo_smiles(n):
    """The first n distinct SMILES of the shipped demo benchmark, in file order."""
    doc = json.loads(DEMO.read_text())
    seen = dict.fromkeys(item["smiles"] for split in doc["split"].values() for item in split)
    return list(seen)[:n]


def write_hiv(path, smiles, labels=None):
    """A file in MoleculeNet's HIV.csv layout; labels default to a 0/1 hash of the SMILES."""
    labels = labels or [_hash(s) % 2 for s in smiles]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["smiles", "activity", "HIV_active"])
        writer.writerows([s, "CM" if y else "CI", y] for s, y in zip(smiles, labels))
    return path


def logp_sas(smiles):
    """write_zinc's logP and SAS: numbers drawn from the SMILES."""
    return _hash(smiles, "logP") % 500 / 100, _hash(smiles, "SAS") % 400 / 100


def write_zinc(path, smiles):
    """chemical_vae's ZINC layout: SMILES quoted with a trailing newline, then logP, qed, SAS."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["smiles", "logP", "qed", "SAS"])
        writer.writerows([s + "\n", logp_sas(s)[0], 0.5, logp_sas(s)[1]] for s in smiles)
    return path


def pcba_cell(smiles, assay):
    return ["", "", "0", "1"][_hash(smiles, str(assay)) % 4]


def write_pcba(path, smiles):
    """MoleculeNet's pcba.csv.gz layout: 128 assays (empty = missing), mol_id, smiles; the first row has no label."""
    with gzip.open(path, "wt", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([f"PCBA-{a}" for a in range(good.PCBA_ASSAYS)] + ["mol_id", "smiles"])
        for i, s in enumerate(smiles):
            cells = [pcba_cell(s, a) if i else "" for a in range(good.PCBA_ASSAYS)]
            writer.writerow(cells + [f"CID{i}", s])
    return path


@pytest.fixture(scope="module")
def hiv_file(tmp_path_factory):
    """300 demo molecules and one unparseable row in HIV.csv's layout."""
    smiles = demo_smiles(300)
    return write_hiv(tmp_path_factory.mktemp("good") / "HIV.csv", smiles[:150] + [UNPARSEABLE] + smiles[150:])


def members(doc, split):
    return [item["index"] for item in doc["split"][split]]


# The hand-worked case: 12 parseable molecules (row 12 does not parse and is dropped, as PyG 2.0.4
# drops it before GOOD sees it), heavy atoms per row:
HAND = ["CCO", "CCCCCCCC", "C", "CCCCC", "CCC", "c1ccccc1", "CC", "CCCCCCC", "CCCC", "CCN", "CCCCO", "CCCCCC",
        UNPARSEABLE]
#        3      8           1    5        3      6           2     7          4       3      5        6


def test_covariate_split_worked_by_hand(tmp_path):
    # Stable sort by size: 1 [2] 2 [6] 3 [0 4 9] 4 [8] 5 [3 10] 6 [5 11] 7 [7] 8 [1]; domain ids 0..7.
    # Size runs largest first: rows 1 7 11 5 10 3 8 9 4 0 6 2 (sizes 8 7 6 6 5 5 4 3 3 3 2 1).
    # N = 12: cuts int(9.6) = 9 and int(10.8) = 10. Position 9 (row 0) shares size 3 with position 8,
    # so OOD val starts at the next change, position 10 (row 6); the second cut (10) is that same
    # position, and one step per molecule moves OOD test on to position 11 (row 2).
    doc = good.build_good(write_hiv(tmp_path / "HIV.csv", HAND), "hiv", "size", "covariate")
    pool = [1, 7, 11, 5, 10, 3, 8, 9, 4, 0]
    assert members(doc, "ood_val") == [6] and members(doc, "ood_test") == [2]
    # random.Random(123): no_shift's shuffle of 12 and int(7.2) = 7 randint(0, 9), then the pool's
    # shuffle; n = int(1.2) = 1: id_val = pool[-2:-1], id_test = pool[-1:].
    rng = random.Random(123)
    rng.shuffle(list(range(12)))
    _ = [rng.randint(0, 9) for _ in range(7)]
    rng.shuffle(pool)
    assert pool == [3, 11, 9, 4, 0, 5, 10, 7, 8, 1]
    assert members(doc, "train") == [3, 11, 9, 4, 0, 5, 10, 7]
    assert members(doc, "iid_val") == [8] and members(doc, "iid_test") == [1]
    assert [item["domain_id"] for item in doc["split"]["ood_val"] + doc["split"]["ood_test"]] == [1, 0]
    assert doc["split"]["ood_val"][0] == {"smiles": "CC", "domain_id": 1, "label": _hash("CC") % 2, "index": 6}
    stats = doc["statistics"]["all"]
    assert stats["n_molecules"] == 12 and stats["n_rows_skipped_unparsable"] == 1 and stats["skipped_rows"] == [12]
    assert stats["unparsable_rows_in_splits"] == []


def domain_blocks(doc):
    """domain_id -> number of molecules, over every split."""
    counts = {}
    for split in good.ROLES:
        for item in doc["split"][split]:
            counts[item["domain_id"]] = counts.get(item["domain_id"], 0) + 1
    return counts


def first_change_at_or_after(block_sizes, position):
    """The first position >= `position` where a new domain starts, walking blocks in order."""
    start = 0
    for size in block_sizes:
        if start >= position:
            return start
        start += size
    return start


@pytest.mark.parametrize("domain", good.GOOD_DOMAINS)
@pytest.mark.parametrize("shift", good.GOOD_SHIFTS)
def test_every_domain_and_shift_follows_the_rules(hiv_file, domain, shift):
    doc = good.build_good(hiv_file, "hiv", domain, shift)
    n = 300
    assert doc["statistics"]["all"]["skipped_rows"] == [150]
    indices = [i for split in good.ROLES for i in members(doc, split)]
    assert sorted(indices) == [i for i in range(301) if i != 150]  # each molecule in exactly one split
    pool = doc["split"]["train"] + doc["split"]["iid_val"] + doc["split"]["iid_test"]
    if shift == "covariate":
        assert len(doc["split"]["iid_val"]) == len(doc["split"]["iid_test"]) == int(0.1 * n)
        sides = [{item["domain_id"] for item in items}
                 for items in (pool, doc["split"]["ood_val"], doc["split"]["ood_test"])]
        assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])  # whole domains
        if domain == "size":  # largest first: the pool's domains, then OOD val's, then OOD test's
            assert min(sides[0]) > max(sides[1]) and min(sides[1]) > max(sides[2])
        else:
            assert max(sides[0]) < min(sides[1]) and max(sides[1]) < min(sides[2])
        blocks = [size for _, size in sorted(domain_blocks(doc).items(), reverse=domain == "size")]
        val_start = first_change_at_or_after(blocks, int(0.8 * n))
        assert len(pool) == val_start
        test_start = first_change_at_or_after(blocks, max(int(0.9 * n), val_start + 1))
        assert len(pool) + len(doc["split"]["ood_val"]) == test_start
    else:
        assert len(doc["split"]["iid_val"]) == len(doc["split"]["iid_test"]) == int(0.15 * len(pool))
    assert good.build_good(hiv_file, "hiv", domain, shift) == doc  # the same file builds the same split


def reference_split(rows, dataset, domain, shift):
    """Section 10's prose, written afresh from it: row indices per role. rows: (row, SMILES, label)
    of the molecules that parse, in file order."""
    n, zinc = len(rows), dataset == "zinc"

    def value(s):
        mol = Chem.MolFromSmiles(s)
        return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if domain == "scaffold" \
            else mol.GetNumAtoms()

    values = [value(s) for _, s, _ in rows]
    order = sorted(range(n), key=lambda k: values[k])
    rank = {v: r for r, v in enumerate(sorted(set(values)))}
    dom = [rank[values[k]] for k in range(n)]
    rng = random.Random(123)
    rng.shuffle(list(range(n)))
    for _ in range(int(0.6 * n)):
        rng.randint(0, 9)
    seq = order[::-1] if domain == "size" or zinc else order

    def change_at_or_after(p):
        return next((q for q in range(p, n) if dom[seq[q]] != dom[seq[q - 1]]), n)

    a = change_at_or_after(int(0.8 * n))
    b = change_at_or_after(max(int(0.9 * n), a + 1))
    pool, roles = seq[:a], {"ood_val": seq[a:b], "ood_test": seq[b:]}
    rng.shuffle(pool)
    k = int(0.1 * n)
    if shift == "concept":
        pyx = np.array([rows[j][2] for j in range(n)], dtype=np.float32)
        side = np.sign(pyx - (np.sort(pyx)[n // 2] if zinc else np.float32(np.mean(pyx.astype(float)))))
        groups = [[j for j in order if dom[j] == d] for d in range(len(rank))]
        sizes_before = np.cumsum([0] + [len(g) for g in groups])[:-1]
        sign = [1 if before < n / 2 else -1 for before in sizes_before]
        subs = ([(0.95, True, 0.3), (0.9, True, 0.5), (0.95, False, 0.6), (0.85, True, 1), (0.5, False, 1)] if zinc
                else [(0.95, True, 0.3), (0.95, False, 0.5), (0.9, True, 0.6), (0.85, True, 1), (0.5, False, 1)])
        taken = []
        for number, (bias, train, ratio) in enumerate(subs):
            out = []
            for d, group in enumerate(groups):
                draws = np.array([rng.random() for _ in range(2 * len(group))])
                picking, data = draws[0::2], draws[1::2]
                if number == len(subs) - 1:
                    got = list(group)
                else:
                    agreement = (sign[d] if train else -sign[d]) * side[group]
                    favoured = agreement > 0
                    other = agreement < 0 if zinc else ~favoured  # ZINC: one at the median is on neither side
                    take = (favoured & (data < bias) | other & (data > bias)) & (picking < ratio)
                    got = [j for j, t in zip(group, take) if t]
                    if favoured.any() and other.any() and take[favoured].any() != take[other].any():
                        missing = other if take[favoured].any() else favoured
                        got.append(int(np.array(group)[missing][-1]))
                out += got
                groups[d] = [j for j in group if j not in got]
            taken.append(out)
        pool = [j for (_, train, _), out in zip(subs, taken) if train for j in out]
        rng.shuffle(pool)
        k = int(0.15 * len(pool))
        roles = {"ood_val": taken[-1], "ood_test": taken[[train for _, train, _ in subs].index(False)]}
    roles.update(train=pool[:len(pool) - 2 * k], iid_val=pool[len(pool) - 2 * k:len(pool) - k],
                 iid_test=pool[len(pool) - k:])
    return {role: [rows[j][0] for j in roles[role]] for role in good.ROLES}


def zinc_label(smiles):
    """write_zinc's logP - SAS, less the rings of six atoms or more."""
    mol = Chem.MolFromSmiles(smiles)  # kept alive: the ring info points into it
    rings = mol.GetRingInfo().AtomRings()
    return logp_sas(smiles)[0] - logp_sas(smiles)[1] - sum(len(r) >= 6 for r in rings)


@pytest.mark.parametrize("dataset", ["hiv", "zinc"])
@pytest.mark.parametrize("domain", good.GOOD_DOMAINS)
@pytest.mark.parametrize("shift", good.GOOD_SHIFTS)
def test_matches_a_rederivation_from_the_prose(tmp_path, dataset, domain, shift):
    smiles = demo_smiles(250)
    if dataset == "hiv":
        path, labels = write_hiv(tmp_path / "HIV.csv", smiles), [_hash(s) % 2 for s in smiles]
    else:
        path, labels = write_zinc(tmp_path / "zinc.csv", smiles), [zinc_label(s) for s in smiles]
    doc = good.build_good(path, dataset, domain, shift)
    expected = reference_split(list(zip(range(250), smiles, labels)), dataset, domain, shift)
    assert {role: members(doc, role) for role in good.ROLES} == expected


def test_concept_shift_bias_shows_in_label_rates(hiv_file):
    """Domains holding the first half of the molecules favour label 1 in train and label 0 in OOD
    test; the second half the other way round."""
    doc = good.build_good(hiv_file, "hiv", "scaffold", "concept")
    blocks, before, first_half = sorted(domain_blocks(doc).items()), 0, set()
    for domain_id, size in blocks:
        if before < 300 / 2:
            first_half.add(domain_id)
        before += size

    def rate(split, half):
        labels = [item["label"] for item in doc["split"][split] if (item["domain_id"] in first_half) == half]
        return sum(labels) / len(labels)

    # measured on this file: 0.75 vs 0.18 and 0.18 vs 0.85 (the labels alone: half are 1)
    assert rate("train", True) - rate("ood_test", True) > 0.4
    assert rate("ood_test", False) - rate("train", False) > 0.4
    assert doc["statistics"]["all"]["concept_threshold"] == pytest.approx(
        np.mean([_hash(s) % 2 for s in demo_smiles(300)]))


def test_zinc_label_layout_and_reversal(tmp_path):
    smiles = ["c1ccc2ccccc2c1", "C1CCCC1", "C1CCCCCCC1", "CCCCCCC", UNPARSEABLE] + demo_smiles(200)
    path = write_zinc(tmp_path / "250k_rndm_zinc_drugs_clean_3.csv", smiles)
    by_size = good.build_good(path, "zinc", "size", "covariate")
    items = {item["index"]: item for split in good.ROLES for item in by_size["split"][split]}
    expected = {0: 2, 1: 0, 2: 1, 3: 0}  # rings of six atoms or more: naphthalene 2, cyclopentane 0, cyclooctane 1
    for row, rings in expected.items():
        assert items[row]["smiles"] == smiles[row]  # the file's trailing newline stripped
        logp, sas = logp_sas(smiles[row])
        assert items[row]["label"] == pytest.approx(logp - sas - rings)
    # the unparseable row stays, as in GOOD's ZINC reader: no rings, size = len("C1CC(N\n") = 7
    assert items[4]["label"] == pytest.approx(logp_sas(UNPARSEABLE)[0] - logp_sas(UNPARSEABLE)[1])
    assert by_size["statistics"]["all"]["unparsable_rows_in_splits"] == [4]
    assert items[3]["domain_id"] == items[4]["domain_id"]  # with heptane's 7 heavy atoms
    for domain in good.GOOD_DOMAINS:  # ZINC runs both domains in reverse: the pool holds the last domains
        doc = by_size if domain == "size" else good.build_good(path, "zinc", domain, "covariate")
        pool = {item["domain_id"] for split in ("train", "iid_val", "iid_test") for item in doc["split"][split]}
        assert min(pool) > max(item["domain_id"] for item in doc["split"]["ood_val"])
    scaffold = good.build_good(path, "zinc", "scaffold", "concept")
    assert scaffold["statistics"]["all"]["skipped_rows"] == [4]  # GOOD's scaffold step fails on it: left out
    pyx = np.sort([np.float32(item["label"]) for split in good.ROLES for item in scaffold["split"][split]])
    median = pyx[len(pyx) // 2]
    assert scaffold["statistics"]["all"]["concept_threshold"] == pytest.approx(float(median))


def test_pcba_layout(tmp_path):
    smiles = demo_smiles(160)
    doc = good.build_good(write_pcba(tmp_path / "pcba.csv.gz", smiles), "pcba", "size", "concept")
    items = {item["index"]: item for split in good.ROLES for item in doc["split"][split]}
    assert items[5]["label"] == [None if pcba_cell(smiles[5], a) == "" else int(pcba_cell(smiles[5], a))
                                 for a in range(good.PCBA_ASSAYS)]
    assert items[0]["label"] == [None] * good.PCBA_ASSAYS  # no known label: P(y|x) counts as 0
    known = [[y for y in item["label"] if y is not None] for item in items.values()]
    assert doc["statistics"]["all"]["concept_threshold"] == pytest.approx(
        np.mean([sum(k) / len(k) if k else 0 for k in known]), rel=1e-6)
    assert sum(doc["statistics"][role]["n_items"] for role in good.ROLES) == 160


def one_line_error(call, *words):
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


def test_one_line_errors(tmp_path, hiv_file):
    one_line_error(lambda: good.build_good(hiv_file, "hiv", "size", "no_shift"), "no_shift", "no OOD")
    one_line_error(lambda: good.build_good(hiv_file, "hiv", "assay", "covariate"), "assay", "scaffold, size")
    one_line_error(lambda: good.build_good(hiv_file, "tox21", "size", "covariate"), "tox21", "hiv, pcba, zinc")
    one_line_error(lambda: good.build_good(hiv_file, "hiv", "size", "drift"), "drift", "covariate, concept")
    one_line_error(lambda: good.cache_key("0" * 64, "hiv", "size", "no_shift"), "no_shift")
    wrong = tmp_path / "HIV.csv"
    wrong.write_text("smiles,activity\nCCO,CI\n")
    one_line_error(lambda: good.build_good(wrong, "hiv", "size", "covariate"),
                   str(wrong), "no column HIV_active", "smiles, activity, HIV_active")
    one_line_error(lambda: good.build_good(hiv_file, "zinc", "size", "covariate"), "no column logP, SAS")
    one_line_error(lambda: good.build_good(hiv_file, "pcba", "size", "covariate"), "0 PCBA-* assay columns")
    small = write_hiv(tmp_path / "small.csv", demo_smiles(8))
    one_line_error(lambda: good.build_good(small, "hiv", "scaffold", "covariate"),
                   str(small), "is empty", "train", "ood_test")
    nothing = write_hiv(tmp_path / "nothing.csv", [UNPARSEABLE])
    one_line_error(lambda: good.build_good(nothing, "hiv", "size", "concept"), "none of its 1 rows parses")
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text("smiles,activity,HIV_active\nCCO,CI,yes\n")
    one_line_error(lambda: good.build_good(bad_label, "hiv", "size", "covariate"), "row 0", "'yes'")


def test_cfg_and_cache_key(hiv_file):
    doc = good.build_good(hiv_file, "hiv", "scaffold", "covariate")
    sha = hashlib.sha256(hiv_file.read_bytes()).hexdigest()
    assert doc["cfg"]["raw_sha256"] == sha and doc["cfg"]["seed"] == 123
    assert doc["cfg"]["code_version"] == good.GOOD_CODE_VERSION
    keys = {good.cache_key(sha, "hiv", d, s) for d in good.GOOD_DOMAINS for s in good.GOOD_SHIFTS}
    assert len(keys) == 4 and good.cache_key("f" * 64, "hiv", "size", "concept") not in keys


# ----------------------------------------------------------------------------- the command line

# Few and small molecules: Uni-Mol features of each cost about 0.4 s on one core.
SMALL = ["--train_size", "6", "--val_size", "3", "--test_size", "3", "--epochs", "2", "--patience", "0",
         "--num_workers", "1"]


@pytest.fixture(scope="module")
def good_raw(tmp_path_factory):
    """120 small demo molecules (at most 24 heavy atoms) and one unparseable row, in HIV.csv's layout;
    its scaffold/concept split: train 43, iid_val 8, iid_test 8, ood_val 31, ood_test 30."""
    smiles = list(itertools.islice((s for s in demo_smiles(10000) if Chem.MolFromSmiles(s).GetNumAtoms() <= 24), 120))
    return write_hiv(tmp_path_factory.mktemp("good_cli") / "HIV.csv", smiles[:60] + [UNPARSEABLE] + smiles[60:])


def good_flags(raw, shift="concept"):
    return ["--dataset", "good_hiv", "--good_domain", "scaffold", "--good_shift", shift, "--data_file", str(raw)]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, good_raw, random_ckpt, cache_dir):
    """A frozen run trained directly on GOOD-HIV scaffold/concept (built into cache_dir/good/)."""
    run = tmp_path_factory.mktemp("good_runs") / "run"
    assert main(["--mode", "train", *good_flags(good_raw), "--unimol_weights", str(random_ckpt),
                 "--cache_dir", str(cache_dir), *SMALL, "--output_dir", str(run)]) == 0
    return run


def read_json(path):
    return json.loads(path.read_text())


def test_prepare_writes_the_build_and_it_trains_as_a_drugood_file(good_raw, good_run, random_ckpt, cache_dir,
                                                                    tmp_path, capsys):
    out = tmp_path / "good_hiv.json"
    assert main(["--mode", "prepare", *good_flags(good_raw), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = read_json(out)
    assert doc == good.build_good(good_raw, "hiv", "scaffold", "concept")
    assert f"wrote {out}: train {len(doc['split']['train'])}, iid_val" in printed
    assert out.stat().st_mode & 0o777 == 0o644 and not list(tmp_path.glob(".*tmp*"))  # umask 022: a normal file
    assert main(["--mode", "prepare", *good_flags(good_raw), "--output", str(out)]) == 2  # never replaced unasked
    assert "pass --overwrite" in capsys.readouterr().err
    # the prepared file is a plain DrugOOD file (its name, good_hiv, makes no GOOD run): every mode takes it
    run = tmp_path / "run"
    assert main(["--mode", "train", "--data_file", str(out), "--unimol_weights", str(random_ckpt),
                 "--cache_dir", str(cache_dir), *SMALL, "--output_dir", str(run)]) == 0
    metrics, report = read_json(run / "test_metrics.json"), read_json(run / "data_report.json")
    assert metrics["dataset"] == "good_hiv" and "good" not in report and "ood_train_fraction" not in report
    own = read_json(good_run / "data_report.json")
    assert report["roles"]["id_train"] == own["roles"]["id_train"]  # the same pools, drawn alike
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 0  # re-scores from the prepared file
    assert read_json(run / "test_metrics.json")["auroc"] == pytest.approx(metrics["auroc"])
    smiles = [item["smiles"] for item in doc["split"]["ood_test"][:2]]
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", *smiles, "--output",
                 str(tmp_path / "scores.csv")]) == 0
    with open(tmp_path / "scores.csv", newline="") as f:
        assert [np.isfinite(float(r["energy"])) for r in csv.DictReader(f)] == [True, True]


def test_training_on_good_builds_once_and_records_it(good_raw, good_run, cache_dir, tmp_path, monkeypatch):
    sha = hashlib.sha256(good_raw.read_bytes()).hexdigest()
    built = cache_dir / "good" / f"{good.cache_key(sha, 'hiv', 'scaffold', 'concept')}.json"
    assert read_json(built) == good.build_good(good_raw, "hiv", "scaffold", "concept")
    config, report = read_json(good_run / "config.json"), read_json(good_run / "data_report.json")
    for record in (config["good"], report["good"]):
        assert (record["dataset"], record["domain"], record["shift"], record["raw_sha256"]) == \
            ("good_hiv", "scaffold", "concept", sha)
        assert record["rdkit_version"] == rdBase.rdkitVersion and record["skipped_rows"] == [60]
        assert record["split_sizes"] == {s: len(v) for s, v in read_json(built)["split"].items()}
        assert record["n_domains"] == read_json(built)["statistics"]["all"]["n_domains"]
    assert config["data_file_sha256"] == sha and report["data_file"] == str(built)
    log = (good_run / "training.log").read_text()
    assert "GOOD-HIV scaffold/concept" in log and f"SHA-256 {sha[:12]}" in log and "1 unparsable rows left out" in log
    assert read_json(good_run / "test_metrics.json")["dataset"] == "good_hiv_scaffold_concept"
    # OOD val cut 70/30 before the draws (reference OOD-DPO), not filled OOD train first as on DrugOOD
    pool = report["roles"]["ood_train"]["available"] + report["roles"]["ood_val"]["available"]
    assert report["ood_train_fraction"] == 0.7 and report["roles"]["ood_train"]["available"] == int(0.7 * pool)
    assert report["roles"]["ood_train"]["available"] == 21 and report["roles"]["ood_val"]["available"] == 10
    assert (report["roles"]["ood_train"]["used"], report["roles"]["ood_val"]["used"]) == (6, 3)
    # a second use reads the cached build: re-scoring the run's own split builds nothing
    run = shutil.copytree(good_run, tmp_path / "run")
    monkeypatch.setattr(good, "build_good", lambda *a, **k: pytest.fail("rebuilt a cached GOOD split"))
    stamp = built.stat().st_mtime_ns
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 0
    assert read_json(run / "test_metrics.json")["auroc"] == read_json(good_run / "test_metrics.json")["auroc"]
    assert built.stat().st_mtime_ns == stamp


def test_the_70_30_split_of_ood_val(good_raw, tmp_path):
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good.build_good(good_raw, "hiv", "scaffold", "concept")))
    roles = data.build_roles(path, (1000, 1000, 1000), 42, {}, "random", good.OOD_TRAIN_FRACTION)
    ood_val = {data.canonical(item["smiles"]) for item in read_json(path)["split"]["ood_val"]}
    train, val = ({data.canonical(s) for s in roles[r]} for r in ("ood_train", "ood_val"))
    assert not train & val and train | val == ood_val and len(train) == int(0.7 * len(ood_val))
    report = {}
    small = data.build_roles(path, (5, 2, 3), 42, report, "random", good.OOD_TRAIN_FRACTION)
    assert set(small["ood_train"]) <= set(roles["ood_train"]) and set(small["ood_val"]) <= set(roles["ood_val"])
    assert report["roles"]["ood_val"]["available"] == len(val) and len(small["ood_val"]) == 2
    other_seed = data.build_roles(path, (1000, 1000, 1000), 7, {}, "random", good.OOD_TRAIN_FRACTION)
    assert set(other_seed["ood_train"]) != set(roles["ood_train"])  # shuffled with --data_seed


def test_eval_on_a_good_benchmark(good_raw, good_run, tmp_path, monkeypatch):
    run = shutil.copytree(good_run, tmp_path / "run")
    monkeypatch.setattr(good, "build_good", lambda *a, **k: pytest.fail("rebuilt a cached GOOD split"))
    assert main(["--mode", "eval", "--output_dir", str(run), *good_flags(good_raw)]) == 0  # the run's --test_size
    out = run / "eval" / "good_hiv_scaffold_concept"
    metrics, report = read_json(out / "test_metrics.json"), read_json(out / "data_report.json")
    assert (metrics["n_id"], metrics["n_ood"], metrics["trained_on"]) == (3, 3, "good_hiv_scaffold_concept")
    assert report["good"]["shift"] == "concept"
    split = read_json(Path(report["good"]["built_file"]))["split"]
    with open(out / "test_scores.csv") as f:
        for row in csv.DictReader(f):  # ID test from GOOD's id_test, OOD test from its OOD test
            drawn_from = split["ood_test" if row["is_ood"] == "1" else "iid_test"]
            assert row["smiles"] in {item["smiles"] for item in drawn_from}


@pytest.mark.parametrize("argv, message", [
    (["--mode", "prepare", "--dataset", "lbap", "--data_file", "RAW", "--output", "o.json"],
     "--mode prepare builds a GOOD benchmark only: pass --dataset good_hiv, good_pcba, good_zinc"),
    (["--good_domain", "size", "--data_file", "RAW"],
     "--good_domain applies to a GOOD benchmark only: pass --dataset good_hiv"),
    (["--mode", "prepare", "--dataset", "good_hiv", "--good_shift", "no_shift", "--data_file", "RAW", "--output",
      "o.json"], "no_shift split has no OOD molecules"),
    (["--mode", "prepare", "--dataset", "good_hiv", "--good_domain", "assay", "--data_file", "RAW", "--output",
      "o.json"], "unknown GOOD domain 'assay' (choose from scaffold, size)"),
    (["--dataset", "good_hiv"], "download it from https://deepchemdata.s3-us-west-1.amazonaws.com/datasets/HIV.csv"),
    (["--mode", "prepare", "--dataset", "good_pcba", "--data_file", "nope.csv.gz", "--output", "o.json"],
     "nope.csv.gz: file not found; GOOD-PCBA is built from MoleculeNet's pcba.csv.gz"),
    (["--mode", "eval", "--output_dir", "run", "--good_shift", "concept"], "only to another benchmark"),
    (["--mode", "prepare", "--dataset", "good_hiv", "--data_file", "RAW"], "--mode prepare needs --output"),
])
def test_good_flag_errors(argv, message, good_raw, capsys):
    assert main([str(good_raw) if a == "RAW" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_bad_raw_files_are_one_line_errors(tmp_path, capsys):
    columns = tmp_path / "HIV.csv"
    columns.write_text("smiles,activity\nCCO,CI\n")
    not_gzip = tmp_path / "pcba.csv.gz"
    not_gzip.write_text("smiles\nCCO\n")
    small = write_hiv(tmp_path / "small.csv", demo_smiles(8))
    for dataset, raw, message in (("good_hiv", columns, "no column HIV_active"),
                                  ("good_pcba", not_gzip, "cannot be read as a gzipped CSV"),
                                  ("good_hiv", small, "too few molecules for GOOD-HIV scaffold covariate")):
        out = tmp_path / "out.json"
        assert main(["--mode", "prepare", "--dataset", dataset, "--data_file", str(raw), "--output", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {raw}: ") and message in err and len(err.splitlines()) == 1, err
        assert not out.exists() and not list(tmp_path.glob(".*tmp*"))

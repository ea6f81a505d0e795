import json
import logging
import os
import stat

import numpy as np
import pytest
from unimol_tools.data.conformer import coords2unimol, inner_smi2coords
from unimol_tools.data.dictionary import Dictionary

import data
import tables
import utils
from conftest import DEMO, write_drugood
from data import build_roles, load_benchmark
from encoders import unimol_conformers
from encoders.unimol import UniMolEncoder
from encoders.unimol_conformers import get_conformers
from features import attach_inputs
from molecules import canonicalize
from settings import MoleculeSettings
from utils import InputError

GOOD = {"train": ["CCO", "CCN", "CCC"], "iid_val": ["CCCl", "CCBr"], "iid_test": ["CCF", "CCS"],
        "ood_val": ["c1ccccc1", "c1ccncc1", "c1ccoc1", "c1ccsc1"], "ood_test": ["C1CCCCC1", "C1CCNCC1"]}


def roles_of(path, sizes=(10, 10, 10), seed=42):
    report = {}
    return build_roles(path, sizes, seed, report), report


def test_demo_benchmark_roles_are_disjoint_and_sized():
    roles, report = roles_of(DEMO, sizes=(200, 50, 80))
    assert [len(roles[r]) for r in data.ROLES] == [200, 50, 80, 200, 50, 80]
    all_mols = [m for r in data.ROLES for m in roles[r]]
    assert len(all_mols) == len(set(all_mols))
    assert report["items_per_split"]["train"] == len(json.loads(DEMO.read_text())["split"]["train"])
    assert report["roles"]["ood_train"]["available"] == report["roles"]["ood_val"]["available"]
    # molecules are kept as the file writes them; duplicates are found on canonical SMILES
    written = {item["smiles"].strip() for item in json.loads(DEMO.read_text())["split"]["train"]}
    assert set(roles["id_train"]) <= written
    assert len({canonicalize(m)[0] for m in all_mols}) == len(all_mols)


def test_subsampling_depends_on_data_seed_only():
    a, _ = roles_of(DEMO, (100, 30, 30), seed=42)
    b, _ = roles_of(DEMO, (100, 30, 30), seed=42)
    c, _ = roles_of(DEMO, (100, 30, 30), seed=43)
    assert a == b
    assert a["id_train"] != c["id_train"] and a["ood_train"] != c["ood_train"]
    # a larger test split does not reshuffle the training molecules
    d, _ = roles_of(DEMO, (100, 30, 60), seed=42)
    assert d["id_train"] == a["id_train"] and d["ood_train"] == a["ood_train"]


def test_bad_items_are_counted_with_reasons_never_replaced(tmp_path):
    splits = {k: list(v) for k, v in GOOD.items()}
    splits["train"] += ["not_a_smiles((", "[H][H]", {"smiles": 42}, {"reg_label": 1.0}, "", "OCC"]
    roles, report = roles_of(write_drugood(tmp_path / "d.json", splits))
    reasons = sorted(item["reason"] for item in report["skipped"])
    assert reasons == sorted(["RDKit cannot parse SMILES", "no atoms after hydrogen removal", "smiles is not a string",
                              "item has no 'smiles' field", "empty SMILES"])
    assert report["duplicates_removed"]["train"] == 1  # OCC is CCO again
    assert sorted(roles["id_train"]) == sorted(canonicalize(s)[0] for s in GOOD["train"])
    assert all(item["split"] == "train" for item in report["skipped"])


def test_molecule_in_id_and_ood_is_removed_from_both(tmp_path):
    splits = {k: list(v) for k, v in GOOD.items()}
    splits["ood_test"].append("OCC")  # = CCO from train
    splits["iid_test"].append("c1ccccc1")  # in ood_val
    roles, report = roles_of(write_drugood(tmp_path / "d.json", splits))
    assert report["id_ood_overlap_removed"] == 2
    everything = {m for r in roles.values() for m in r}
    assert "CCO" not in everything and "c1ccccc1" not in everything


def test_ood_val_is_split_into_disjoint_train_and_val(tmp_path):
    roles, _ = roles_of(write_drugood(tmp_path / "d.json", GOOD), sizes=(2, 2, 2))
    assert len(roles["ood_train"]) == 2 and len(roles["ood_val"]) == 2
    assert not set(roles["ood_train"]) & set(roles["ood_val"])
    assert set(roles["ood_train"]) | set(roles["ood_val"]) == set(GOOD["ood_val"])


def test_first_writing_is_kept_and_leaks_are_found_across_writings(tmp_path):
    splits = {k: list(v) for k, v in GOOD.items()}
    splits["train"] = ["  OCC ", "CCO", "C(C)N", "CCN", "CCC"]  # two writings each of ethanol and ethylamine
    splits["ood_test"].append("C1=CC=CC=C1")  # benzene, kekulé: the same molecule as ood_val's c1ccccc1
    roles, report = roles_of(write_drugood(tmp_path / "d.json", splits))
    assert roles["id_train"] == ["OCC", "C(C)N", "CCC"]  # whitespace stripped, first writing kept
    assert report["duplicates_removed"]["train"] == 2
    assert report["cross_split_duplicates_removed"]["ood_test"] == 1 and "C1=CC=CC=C1" not in roles["ood_test"]
    with pytest.raises(InputError, match="leaked between id_train and ood_test"):
        data.check_roles({"id_train": ["OCC"], "ood_test": ["C(O)C"]}, "x.json")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("split"), "no top-level 'split'"),
    (lambda d: d["split"].pop("iid_test"), "lacks iid_test"),
    (lambda d: d["split"].update(train={"a": 1}), "split 'train' is a dict"),
    (lambda d: d["split"].update(ood_test=["((("]), "role ood_test has no usable molecules"),
])
def test_schema_errors_name_file_and_problem(tmp_path, mutate, message):
    doc = json.loads(write_drugood(tmp_path / "d.json", GOOD).read_text())
    mutate(doc)
    (tmp_path / "d.json").write_text(json.dumps(doc))
    with pytest.raises(InputError, match=message) as err:
        roles_of(tmp_path / "d.json")
    assert "d.json" in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        roles_of(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        roles_of(tmp_path / "bad.json")


# canonical and non-canonical writings: atom order changed, explicit stereo, kekulé form
WRITINGS = ["CC(=O)Oc1ccccc1C(=O)O", "OC(=O)c1ccccc1OC(C)=O", "CN1CCC[C@H]1c1cccnc1", "c1ncccc1[C@@H]1CCCN1C",
            "C[Si](C)(C)OC", "O=C([O-])c1ccccc1.[Na+]", "CC(=O)OC1=CC=CC=C1C(O)=O", "F/C=C/Cl"]


@pytest.mark.parametrize("smiles", WRITINGS)
def test_conformer_matches_unimol_tools(smiles):
    atoms, coords, is_2d = unimol_conformers.make_conformer(smiles)
    ref_atoms, ref_coords, _ = inner_smi2coords(smiles, seed=42, mode="fast", remove_hs=True)
    dictionary = Dictionary.load(str(unimol_conformers.unimol_dict_path()))
    dictionary.add_symbol("[MASK]", is_special=True)
    ref = coords2unimol(ref_atoms, ref_coords, dictionary, remove_hs=True)
    assert list(atoms) == list(ref_atoms) and not is_2d
    np.testing.assert_array_equal(coords, ref["src_coord"][1:-1])
    assert np.abs(coords.mean(axis=0)).max() < 1e-4


def test_crop_is_reproducible_and_bounded():
    rng = np.random.default_rng(0)
    atoms = np.array(["C"] * 250 + ["N"] * 50)
    coords = rng.normal(size=(300, 3)).astype(np.float32)
    a1, c1 = unimol_conformers.crop_and_centre("X", atoms, coords)
    a2, c2 = unimol_conformers.crop_and_centre("X", atoms, coords)
    _, c3 = unimol_conformers.crop_and_centre("Y", atoms, coords)
    assert len(a1) == unimol_conformers.MAX_ATOMS and np.array_equal(c1, c2) and np.array_equal(a1, a2)
    assert not np.array_equal(c1, c3)  # the choice depends on the molecule
    small, small_c = unimol_conformers.crop_and_centre("X", atoms[:10], coords[:10])
    assert len(small) == 10 and np.allclose(small_c.mean(axis=0), 0, atol=1e-6)


def test_conformer_cache_reuses_and_survives_corruption(tmp_path, caplog):
    smiles = ["CCO", "c1ccccc1O", "CC(C)N"]
    first, failures = get_conformers(smiles, MoleculeSettings(tmp_path))
    assert not failures and set(first) == set(smiles)
    store = unimol_conformers.conformer_store_dir(tmp_path)
    shards = sorted(store.glob("shard-*"))
    assert len(shards) == 1 and (shards[0] / "coords.npy").is_file()
    again, _ = get_conformers(smiles, MoleculeSettings(tmp_path))
    assert sorted(store.glob("shard-*")) == shards  # nothing recomputed
    for s in smiles:
        np.testing.assert_array_equal(first[s][1], again[s][1])
    (shards[0] / "coords.npy").write_bytes((shards[0] / "coords.npy").read_bytes()[:150])  # truncated
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        rebuilt, _ = get_conformers(smiles, MoleculeSettings(tmp_path))
    assert "corrupt cache shard" in caplog.text
    for s in smiles:
        np.testing.assert_array_equal(first[s][1], rebuilt[s][1])


def test_conformer_failures_are_reported_not_replaced(tmp_path, monkeypatch):
    def broken(smiles, *limits):
        if smiles == "CCN":
            raise ValueError("conformer generation failed (test)")
        return real(smiles, *limits)
    real = unimol_conformers.make_conformer
    monkeypatch.setattr(unimol_conformers, "make_conformer", broken)
    path = write_drugood(tmp_path / "d.json", GOOD)
    settings = MoleculeSettings(tmp_path / "cache")
    roles, report = load_benchmark(path, (10, 10, 10), 42, settings)
    roles, conformers = attach_inputs(UniMolEncoder("random"), roles, report, settings, path)
    assert "CCN" not in roles["id_train"] and "CCN" not in conformers
    assert {"split": "id_train", "index": None, "value": "CCN", "reason": "conformer generation failed (test)"} \
        in report["skipped"]
    assert report["roles"]["id_train"]["used"] == 2


def test_parallel_conformers_equal_serial(tmp_path):
    smiles = ["CCO", "c1ccccc1O", "CC(C)N", "CCOC(=O)C", "c1ccncc1", "OCCO"]
    serial, _ = get_conformers(smiles, MoleculeSettings(tmp_path / "a", num_workers=1))
    parallel, _ = get_conformers(smiles, MoleculeSettings(tmp_path / "b", num_workers=2))
    for s in smiles:
        np.testing.assert_array_equal(serial[s][1], parallel[s][1])


def test_read_table_keeps_every_column(tmp_path):
    (tmp_path / "a.smi").write_text("smiles\nCCO  mol 1\n\n# a comment\nc1ccccc1\n")
    assert tables.read_table(tmp_path / "a.smi") == (["smiles", "name"], [["CCO", "mol 1"], ["c1ccccc1", ""]],
                                                   ["CCO", "c1ccccc1"])
    (tmp_path / "a.csv").write_bytes("\ufeffid,SMILES,pIC50\n1,CCO,5.2\n2,CCN\n".encode())  # Excel: BOM
    assert tables.read_table(tmp_path / "a.csv") == (["id", "SMILES", "pIC50"], [["1", "CCO", "5.2"], ["2", "CCN", ""]],
                                                   ["CCO", "CCN"])
    (tmp_path / "b.csv").write_text("id,structure\n1,CCO\n")
    with pytest.raises(InputError, match="no 'smiles' column.*--smiles_column"):
        tables.read_table(tmp_path / "b.csv")
    assert tables.read_table(tmp_path / "b.csv", "structure")[2] == ["CCO"]
    (tmp_path / "c.csv").write_bytes(b"smiles\n\xff\xfeC\x00C\n")
    with pytest.raises(InputError, match="c.csv: not a UTF-8 text file"):
        tables.read_table(tmp_path / "c.csv")


def test_other_benchmark_test_roles(tmp_path):
    seen = {canonicalize("CCF")[0]}  # a molecule the run trained on, written differently here
    roles, report = data.load_test_roles(write_drugood(tmp_path / "d.json", dict(GOOD, iid_test=["FCC", "CCS"])),
                                         10, 42, seen)
    assert roles == {"id_test": ["CCS"], "ood_test": ["C1CCCCC1", "C1CCNCC1"]}
    assert report["removed_seen_in_run"] == {"id_test": 1, "ood_test": 0}
    (tmp_path / "o.csv").write_text("name,smiles,is_ood\na,CCO,0\nb,OCC,0\nc,CCCl,0\nd,c1ccccc1,1\ne,FCC,1\n")
    roles, report = data.load_test_roles(tmp_path / "o.csv", 10, 42, seen)
    assert roles == {"id_test": ["CCO", "CCCl"], "ood_test": ["c1ccccc1"]}
    assert report["duplicates_removed"]["id_test"] == 1 and report["removed_seen_in_run"]["ood_test"] == 1
    assert len(data.load_test_roles(tmp_path / "o.csv", 1, 42, seen)[0]["id_test"]) == 1
    (tmp_path / "bad.csv").write_text("smiles,is_ood\nCCO,0\nCCN,yes\n")
    with pytest.raises(InputError, match="bad.csv: line 3: is_ood is 'yes'"):
        data.load_test_roles(tmp_path / "bad.csv", 10, 42, set())
    (tmp_path / "nolabel.csv").write_text("smiles\nCCO\n")
    with pytest.raises(InputError, match="no 'is_ood' column"):
        data.load_test_roles(tmp_path / "nolabel.csv", 10, 42, set())


def test_files_get_normal_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        utils.atomic_write_json(tmp_path / "a.json", {"x": 1})
        utils.atomic_write_csv(tmp_path / "b.csv", [(1, 2)], ["x", "y"])
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "b.csv").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv"]  # no temporary files left

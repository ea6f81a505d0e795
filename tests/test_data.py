import json
import logging

import numpy as np
import pytest
from unimol_tools.data.conformer import coords2unimol, inner_smi2coords
from unimol_tools.data.dictionary import Dictionary

import data
from conftest import DEMO, write_drugood
from data import InputError, build_roles, canonicalize, get_conformers, load_benchmark

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
    # canonical SMILES only
    assert all(canonicalize(m)[0] == m for m in roles["id_train"][:20])


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
    assert set(roles["ood_train"]) | set(roles["ood_val"]) == {canonicalize(s)[0] for s in GOOD["ood_val"]}


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


@pytest.mark.parametrize("smiles", ["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC[C@H]1c1cccnc1", "C[Si](C)(C)OC", "O=C([O-])c1ccccc1.[Na+]"])
def test_conformer_matches_unimol_tools(smiles):
    smiles = canonicalize(smiles)[0]
    atoms, coords, is_2d = data.make_conformer(smiles)
    ref_atoms, ref_coords, _ = inner_smi2coords(smiles, seed=42, mode="fast", remove_hs=True)
    dictionary = Dictionary.load(str(data.unimol_dict_path()))
    dictionary.add_symbol("[MASK]", is_special=True)
    ref = coords2unimol(ref_atoms, ref_coords, dictionary, remove_hs=True)
    assert list(atoms) == list(ref_atoms) and not is_2d
    np.testing.assert_array_equal(coords, ref["src_coord"][1:-1])
    assert np.abs(coords.mean(axis=0)).max() < 1e-4


def test_crop_is_reproducible_and_bounded():
    rng = np.random.default_rng(0)
    atoms = np.array(["C"] * 250 + ["N"] * 50)
    coords = rng.normal(size=(300, 3)).astype(np.float32)
    a1, c1 = data.crop_and_centre("X", atoms, coords)
    a2, c2 = data.crop_and_centre("X", atoms, coords)
    _, c3 = data.crop_and_centre("Y", atoms, coords)
    assert len(a1) == data.MAX_ATOMS and np.array_equal(c1, c2) and np.array_equal(a1, a2)
    assert not np.array_equal(c1, c3)  # the choice depends on the molecule
    small, small_c = data.crop_and_centre("X", atoms[:10], coords[:10])
    assert len(small) == 10 and np.allclose(small_c.mean(axis=0), 0, atol=1e-6)


def test_conformer_cache_reuses_and_survives_corruption(tmp_path, caplog):
    smiles = ["CCO", "c1ccccc1O", "CC(C)N"]
    first, failures = get_conformers(smiles, tmp_path, num_workers=1)
    assert not failures and set(first) == set(smiles)
    store = data.conformer_store_dir(tmp_path)
    shards = sorted(store.glob("shard-*"))
    assert len(shards) == 1 and (shards[0] / "coords.npy").is_file()
    again, _ = get_conformers(smiles, tmp_path, num_workers=1)
    assert sorted(store.glob("shard-*")) == shards  # nothing recomputed
    for s in smiles:
        np.testing.assert_array_equal(first[s][1], again[s][1])
    (shards[0] / "coords.npy").write_bytes((shards[0] / "coords.npy").read_bytes()[:150])  # truncated
    with caplog.at_level(logging.WARNING, logger="energy_dpo"):
        rebuilt, _ = get_conformers(smiles, tmp_path, num_workers=1)
    assert "corrupt cache shard" in caplog.text
    for s in smiles:
        np.testing.assert_array_equal(first[s][1], rebuilt[s][1])


def test_conformer_failures_are_reported_not_replaced(tmp_path, monkeypatch):
    def broken(smiles):
        if smiles == "CCN":
            raise ValueError("conformer generation failed (test)")
        return real(smiles)
    real = data.make_conformer
    monkeypatch.setattr(data, "make_conformer", broken)
    path = write_drugood(tmp_path / "d.json", GOOD)
    roles, conformers, report = load_benchmark(path, (10, 10, 10), 42, tmp_path / "cache")
    assert "CCN" not in roles["id_train"] and "CCN" not in conformers
    assert {"split": "id_train", "index": None, "value": "CCN", "reason": "conformer generation failed (test)"} \
        in report["skipped"]
    assert report["roles"]["id_train"]["used"] == 2


def test_parallel_conformers_equal_serial(tmp_path):
    smiles = [canonicalize(s)[0] for s in ["CCO", "c1ccccc1O", "CC(C)N", "CCOC(=O)C", "c1ccncc1", "OCCO"]]
    serial, _ = get_conformers(smiles, tmp_path / "a", num_workers=1)
    parallel, _ = get_conformers(smiles, tmp_path / "b", num_workers=2)
    for s in smiles:
        np.testing.assert_array_equal(serial[s][1], parallel[s][1])


def test_read_smiles_file(tmp_path):
    (tmp_path / "a.smi").write_text("smiles\nCCO mol1\n\nc1ccccc1\n")
    assert data.read_smiles_file(tmp_path / "a.smi") == ["CCO", "c1ccccc1"]
    (tmp_path / "a.csv").write_text("id,SMILES\n1,CCO\n2,CCN\n")
    assert data.read_smiles_file(tmp_path / "a.csv") == ["CCO", "CCN"]
    (tmp_path / "b.csv").write_text("id,smi\n1,CCO\n")
    with pytest.raises(InputError, match="no 'smiles' column"):
        data.read_smiles_file(tmp_path / "b.csv")

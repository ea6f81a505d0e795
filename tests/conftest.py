"""Shared fixtures: a random-init Uni-Mol saved in the official checkpoint layout, a small real
DrugOOD file cut from the shipped demo benchmark, and one conformer/feature cache for the session."""
import json
import os
from pathlib import Path

import pytest
import torch
from rdkit import Chem

from encoders.unimol import _import_unimol_model, build_unimol
from encoders.unimol_conformers import unimol_dict_path
from main import main

_import_unimol_model()  # before any test module imports unimol_tools, which would write ./logs/
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one thread each (and in the commands they start), so
    # that the workers do not fight over the cores; the tests' tensors are too small to gain from more.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "demo_ec50_scaffold.json"
SMALL_SIZES = {"train": 30, "iid_val": 16, "iid_test": 16, "ood_val": 30, "ood_test": 16}


@pytest.fixture(autouse=True)
def _run_in_tmp_dir(tmp_path, monkeypatch):
    """Relative defaults (./cache, ./outputs) land in a scratch folder, never in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def random_ckpt(tmp_path_factory):
    """{'model': backbone state dict} of a seeded random Uni-Mol, like mol_pre_no_h_220816.pt."""
    path = tmp_path_factory.mktemp("weights") / "mol_pre_no_h_random.pt"
    torch.save({"model": build_unimol(init_seed=7).state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory):
    """The first distinct drug-sized molecules (≤ 30 heavy atoms) of each demo split, in DrugOOD format;
    the test splits' SMILES rewritten in a non-canonical atom order."""
    doc = json.loads(DEMO.read_text())
    for split, n in SMALL_SIZES.items():
        small = {}
        for item in doc["split"][split]:
            mol = Chem.MolFromSmiles(item["smiles"])
            if mol.GetNumAtoms() <= 30:
                small.setdefault(Chem.MolToSmiles(mol), item)
            if len(small) == n:
                break
        doc["split"][split] = list(small.values())
        if split.endswith("_test"):  # test molecules written non-canonically, as other toolkits write them
            doc["split"][split] = [dict(item, smiles=rewritten(item["smiles"], seed=i))
                                   for i, item in enumerate(doc["split"][split])]
    path = tmp_path_factory.mktemp("data") / "small_ec50_scaffold.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """The session's conformer/feature cache, one for all xdist workers: each molecule's conformer and
    features are made once. Its stores take concurrent writers, as a sweep's --jobs relies on."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("cache")
    shared = tmp_path_factory.getbasetemp().parent / "shared-cache"  # the session's folder, above the workers'
    shared.mkdir(exist_ok=True)
    return shared


SIZES = ["--train_size", "12", "--val_size", "8", "--test_size", "8"]


@pytest.fixture(scope="session")
def base_args(small_benchmark, random_ckpt, cache_dir):
    return ["--data_file", str(small_benchmark), "--dataset", "small_ec50_scaffold", "--unimol_weights",
            str(random_ckpt), "--cache_dir", str(cache_dir), "--num_workers", "1", "--epochs", "6",
            "--patience", "0", *SIZES]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, base_args):
    run = tmp_path_factory.mktemp("runs") / "full"
    old = os.umask(0o022)
    try:
        assert main(["--mode", "train", *base_args, "--output_dir", str(run)]) == 0
    finally:
        os.umask(old)
    return run


def write_drugood(path, splits):
    """A DrugOOD-shaped file from {split: [smiles or raw item, ...]}."""
    items = {s: [v if isinstance(v, dict) else {"smiles": v, "reg_label": 5.0, "assay_id": 0, "cls_label": 1,
                                                  "domain_id": 0} for v in values] for s, values in splits.items()}
    path.write_text(json.dumps({"cfg": {}, "split": items, "statistics": {}}))
    return path


def unimol_tools_features(smiles, weights):
    """unimol_tools' own CLS features (UniMolRepr, no hydrogens) for SMILES exactly as given."""
    import numpy as np
    from unimol_tools import UniMolRepr
    repr_ = UniMolRepr(remove_hs=True, use_cuda=False, batch_size=8, pretrained_model_path=str(weights),
                       pretrained_dict_path=str(unimol_dict_path()))
    return np.asarray(repr_.get_repr(list(smiles)))


def rewritten(smiles, seed=0):
    """A non-canonical writing of a molecule: atoms renumbered by a seeded permutation."""
    import numpy as np
    mol = Chem.MolFromSmiles(smiles)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        order = [int(i) for i in rng.permutation(mol.GetNumAtoms())]
        other = Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False)
        if other not in (smiles, Chem.MolToSmiles(mol)):
            return other
    raise AssertionError(f"no other writing of {smiles}")


def interrupted(started, call, poll_s=0.002):
    """Run call() and press Ctrl-C (KeyboardInterrupt in this thread) as soon as started() is true, as
    a user stopping a long job would; fails if call() finished first. started() looks at files only."""
    import _thread
    import threading
    done = threading.Event()

    def watch():
        while not done.is_set():
            if started():
                _thread.interrupt_main()
                return
            done.wait(poll_s)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        done.set()
        watcher.join()


def csv_rows(path):
    """Data rows of a CSV the tool writes (0 while it does not exist)."""
    try:
        return max(0, len(Path(path).read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0

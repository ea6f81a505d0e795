"""ECFP, the frozen-only fingerprint encoder (encoders/ecfp.py): its features are RDKit's Morgan count
fingerprint of the SMILES as written; it trains, evaluates, predicts and is summarised like any encoder;
what it cannot take (fine-tuning, Uni-Mol's flags) is a one-line error; sweeps skip its fine-tuned arms."""
import csv
import importlib.metadata
import json

import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

import sweep_plan
from conftest import SIZES
from encoders import EncoderId
from encoders.ecfp import ECFPEncoder
from main import main
from model import load_checkpoint
from scoring import load_run
from settings import MoleculeSettings
from sweep_plan import Options, plan_sweep

MOLS = ["OC(=O)c1ccccc1O", "c1ccccc1C(=O)O", "CC(C)Cc1ccc(cc1)C(C)C(O)=O", "CCO"]


def reference(smiles):
    """RDKit's hashed Morgan count fingerprint (radius 2, 2048 bits), computed the classic way."""
    out = np.zeros((len(smiles), 2048), np.float32)
    for i, s in enumerate(smiles):
        counts = AllChem.GetHashedMorganFingerprint(Chem.MolFromSmiles(s), 2, nBits=2048).GetNonzeroElements()
        for bit, count in counts.items():
            out[i, bit] = count
    return out


def test_features_are_rdkits_morgan_counts_of_the_smiles_as_written(tmp_path):
    out = tmp_path / "f.npy"
    assert main(["--mode", "featurize", "--foundation_model", "ecfp", "--smiles", *MOLS, "((", "--output", str(out),
                 "--cache_dir", str(tmp_path / "c")]) == 0
    assert np.array_equal(np.load(out), reference(MOLS))
    with open(tmp_path / "f.failed.csv", newline="") as f:
        failed = list(csv.DictReader(f))
    assert [(r["input_row"], r["reason"]) for r in failed] == [("4", "RDKit cannot parse SMILES")]
    encoder = ECFPEncoder()
    assert np.array_equal(encoder.encode_smiles(MOLS, MoleculeSettings(tmp_path / "c2")).numpy(), reference(MOLS))
    assert (encoder.width, encoder.total_params, encoder.trains) == (2048, 0, False)
    assert EncoderId.parse(encoder.weights_id) == encoder.identity and encoder.weights_id.startswith("ecfp:sha256:")


@pytest.mark.parametrize("argv, words", [
    (["--finetune_encoder"], "error: --foundation_model ecfp is frozen only (ECFP has no layers to fine-tune)"),
    (["--unimol_weights", "random"], "error: --foundation_model ecfp takes no --unimol_weights"),
    (["--amp", "bf16"], "error: --foundation_model ecfp takes no --amp"),
    (["--conformer_timeout", "5"], "error: --foundation_model ecfp takes no --conformer_timeout"),
    (["--freeze_layers", "0-3"], "error: --foundation_model ecfp is frozen only (ECFP has no layers to fine-tune): "
                                 "drop --freeze_layers")])
def test_what_ecfp_cannot_take_is_a_one_line_error(argv, words, small_benchmark, tmp_path, capsys):
    assert main(["--foundation_model", "ecfp", "--data_file", str(small_benchmark), *argv,
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(words) and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def ecfp_sweep(tmp_path_factory, small_benchmark, cache_dir):
    """A sweep folder whose only encoder is ECFP: its frozen arm, one seed."""
    root = tmp_path_factory.mktemp("sweep") / "small_ec50_scaffold"
    assert main(["--foundation_model", "ecfp", "--data_file", str(small_benchmark), "--dataset", "small_ec50_scaffold",
                 "--cache_dir", str(cache_dir), "--epochs", "6", "--batch_size", "6", "--patience", "0", *SIZES,
                 "--output_dir", str(root / "ecfp" / "frozen" / "seed1")]) == 0
    return root


def test_an_ecfp_run_trains_evaluates_predicts_and_is_summarised(ecfp_sweep, tmp_path):
    run = ecfp_sweep / "ecfp" / "frozen" / "seed1"
    config = json.loads((run / "config.json").read_text())
    assert config["encoder_weights"] == ECFPEncoder().weights_id and config["encoder_total_params"] == 0
    assert config["packages"]["rdkit"] == importlib.metadata.version("rdkit")
    assert config["args"]["freeze_layers"] is None
    assert load_checkpoint(run / "best_model.pt")["model_spec"]["in_dim"] == 2048
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert main(["--mode", "eval", "--output_dir", str(run)]) == 0
    again = json.loads((run / "test_metrics.json").read_text())
    assert again["auroc"] == metrics["auroc"] and again["encoder_weights"] == config["encoder_weights"]
    assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", *MOLS,
                 "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        predicted = [row["energy"] for row in csv.DictReader(f)]
    assert [f"{row.energy:.6f}" for row in load_run(run).score_smiles(MOLS)] == predicted
    # a frozen-only encoder's sweep folder compares its frozen arm with the baselines
    assert main(["--mode", "compare", "--output_dir", str(ecfp_sweep)]) == 0
    summary = json.loads((ecfp_sweep / "comparison_summary.json").read_text())
    part = summary["encoders"][0]
    assert part["encoder"] == "ECFP4 counts (RDKit Morgan, no pretraining)" and list(part["arms"]) == ["frozen"]
    assert not any(key.startswith("Improvement") for key in part["table"]) and "baseline: logreg_oe" in part["table"]


def test_sweeps_skip_its_fine_tuned_arms_and_the_demo_runs_it(small_benchmark, monkeypatch):
    for name in ("UNIMOL_WEIGHT_DIR", "UNIMOL_WEIGHTS", "FOUNDATION_MODELS", "ARMS", "DATASETS", "DATA_FILE"):
        monkeypatch.delenv(name, raising=False)
    env = {"FOUNDATION_MODELS": "ecfp minimol", "DATA_FILE": str(small_benchmark), "SEEDS": "1",
           "ARMS": "frozen finetuned lora"}
    plan = plan_sweep(env, Options(print_runs=True))
    assert [run.arm for run in plan.runs] == ["ecfp/frozen", "minimol/frozen", "minimol/finetuned", "minimol/lora"]
    assert plan.notes == ("== ecfp: frozen only (ECFP has no layers to fine-tune); its fine-tuned arms are skipped: "
                          "finetuned lora",)
    demo = plan_sweep({}, Options(demo=True, print_runs=True))
    ecfp = [run for run in demo.runs if run.arm.startswith("ecfp/")]
    assert [run.arm for run in ecfp] == ["ecfp/frozen"] * 3 and "--foundation_model" in ecfp[0].args
    assert sweep_plan.demo_encoders() == ["minimol", "ecfp", "unimol"]

"""The Python API the design names: the encoders built with no other argument and encoding SMILES
(frozen: the features featurize writes; fine-tunable: gradients on exactly the trainable parameters),
the model built from flags, a finished run scoring SMILES as predict does, and every example of
docs/api.md and the README's "Python use" section, run as written."""
import csv
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import DEMO, ROOT
from batching import FeatureInputs
from encoders.base import prepare_rows
from features import model_inputs
from cli import build_parser
from main import main
from model import EnergyDPOModel, FinetunableMiniMolEncoder, FinetunableUniMolEncoder, MiniMolEncoder, UniMolEncoder
from scoring import load_run
from encoders import UNIMOL_WEIGHTS
from settings import ModelSpec, MoleculeSettings, TrainConfig
from train import EnergyDPOTrainer
from utils import InputError

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1"]


@pytest.fixture
def weight_dir(tmp_path, random_ckpt, monkeypatch):
    """UNIMOL_WEIGHT_DIR holding the session's random checkpoint under the official file name."""
    folder = tmp_path / "unimol"
    folder.mkdir()
    (folder / UNIMOL_WEIGHTS.file).symlink_to(random_ckpt)
    monkeypatch.setenv("UNIMOL_WEIGHT_DIR", str(folder))
    return folder


def featurized(tmp_path, *argv):
    out = tmp_path / "f.npy"
    assert main(["--mode", "featurize", "--smiles", *SMILES, "--output", str(out), "--cache_dir", str(tmp_path / "c"),
                 *argv]) == 0
    return np.load(out)


def test_the_design_snippet_encodes_with_gradients_on_exactly_the_trainable_parameters(weight_dir):
    encoder = FinetunableUniMolEncoder(freeze_layers='0-12')
    features = encoder.encode_smiles(['CCO', 'CCCO'])   # supports gradients
    assert features.shape == (2, 512) and features.dtype == torch.float32 and features.requires_grad
    features.square().sum().backward()  # (a plain sum of layer-normed features has no gradient below the norm)
    trained = {n for n, p in encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trained == trainable and trainable
    assert {n.split(".")[3] for n in trainable if ".layers." in n} == {"13", "14"}
    assert encoder.weights_id.startswith("sha256:")  # the checkpoint in UNIMOL_WEIGHT_DIR, as the CLI finds it
    # a spec string, 'none' or a list of layer indices, as --freeze_layers takes them
    assert FinetunableUniMolEncoder("random", [0, 1, 2]).frozen_prefix == 3
    assert FinetunableUniMolEncoder("random", "none").frozen_prefix == 0
    with pytest.raises(InputError, match="leaves no Uni-Mol layer to fine-tune"):
        FinetunableUniMolEncoder("random", "all")


def test_without_a_checkpoint_the_encoder_says_what_the_command_line_says(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("UNIMOL_WEIGHT_DIR", raising=False)
    with pytest.raises(InputError) as error:
        UniMolEncoder()
    assert str(error.value) == UNIMOL_WEIGHTS.missing(f"./weights/{UNIMOL_WEIGHTS.file}")
    assert main(["--mode", "featurize", "--smiles", "CCO", "--output", str(tmp_path / "f.npy")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {error.value}"


def test_frozen_encoders_encode_as_featurize_does(tmp_path):
    ours = UniMolEncoder("random").encode_smiles(SMILES, MoleculeSettings(tmp_path / "u"))
    assert not ours.requires_grad and np.array_equal(ours.numpy(), featurized(tmp_path, "--unimol_weights", "random"))
    minimol = MiniMolEncoder().encode_smiles(SMILES, MoleculeSettings(tmp_path / "m"))
    assert np.array_equal(minimol.numpy(), featurized(tmp_path, "--foundation_model", "minimol", "--overwrite"))


def test_minimol_fine_tunes_from_python_and_names_what_it_cannot_take(tmp_path):
    settings = MoleculeSettings(tmp_path)
    encoder = FinetunableMiniMolEncoder(freeze_layers="0-13")
    features = encoder.encode_smiles(SMILES, settings)
    features.square().sum().backward()
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in encoder.named_parameters() if p.grad is not None}
    assert {n.split(".")[3] for n in trainable} == {"14", "15"}
    # its fine-tunable form is the frozen one's subclass, with the same fingerprints before training
    assert isinstance(encoder, MiniMolEncoder)
    assert torch.allclose(features.detach(), MiniMolEncoder().encode_smiles(SMILES, settings), atol=1e-5)
    with pytest.raises(InputError, match=r"SMILES 1 \('not a molecule'\) has no MiniMol graphs: RDKit cannot parse"):
        MiniMolEncoder().encode_smiles(["CCO", "not a molecule"], settings)
    with pytest.raises(InputError, match=r"SMILES 1 \(None\) has no MiniMol graphs: not a SMILES string but NoneType"):
        MiniMolEncoder().encode_smiles(["CCO", None], settings)  # a row, and what it got, named
    written, _, failed = prepare_rows(MiniMolEncoder(), ["CCO", "not a molecule"], settings)
    assert list(written) == [0] and list(failed) == [1]


def test_the_model_builds_from_flags_as_the_design_shows(weight_dir):
    parser = build_parser()
    frozen = EnergyDPOModel.from_settings(parser.parse_args([]))  # the default flags: the frozen encoder
    assert type(frozen.encoder) is UniMolEncoder and not frozen.finetune_encoder and frozen.freeze_layers is None
    assert (frozen.foundation_model, frozen.spec.in_dim) == ("unimol", 512)
    tuned = EnergyDPOModel.from_settings(parser.parse_args(["--finetune_encoder", "--unimol_weights", "random"]))
    assert type(tuned.encoder) is FinetunableUniMolEncoder and tuned.encoder.is_random_init
    assert (tuned.finetune_encoder, tuned.foundation_model, tuned.freeze_layers) == (True, "unimol", "0-12")
    assert tuned.score_smiles(["CCO", "CCN"]).shape == (2,)
    groups = EnergyDPOTrainer(tuned, TrainConfig(lr=1e-3, encoder_lr=2e-6), None).optimizer.param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("encoder", 2e-6)]
    minimol = EnergyDPOModel.from_settings({"foundation_model": "minimol", "finetune_encoder": True,
                                           "freeze_layers": "0-13", "finetune_strategy": "lora"})
    assert type(minimol.encoder) is FinetunableMiniMolEncoder and minimol.encoder.strategy == "lora"
    with pytest.raises(InputError, match="minimol takes no --unimol_weights"):
        EnergyDPOModel.from_settings({"foundation_model": "minimol", "unimol_weights": "random"})


def test_a_finished_run_scores_smiles_as_predict_does(finished_run, tmp_path):
    mols = ["C1=CC=C(C=C1)C(=O)O", "OC(=O)c1ccccc1.[Na+]", "not a molecule", "CCO"]
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *mols,
                 "--output", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv", newline="") as f:
        predicted = list(csv.DictReader(f))
    run = load_run(finished_run)
    rows = run.score_smiles(mols)
    assert [r.smiles for r in rows] == mols and rows[2].energy is None and "cannot parse" in rows[2].error
    for row, line in zip(rows, predicted):
        assert (row.canonical_smiles, row.warning, row.error) == (line["canonical_smiles"], line["warning"],
                                                                  line["error"])
        if row.energy is not None:
            assert f"{row.energy:.6f}" == line["energy"] and int(row.is_ood) == int(line["is_ood"])
            assert row.is_ood == (row.energy > run.threshold)


def python_blocks(path, section=None):
    """The ```python blocks of a Markdown file (of one `## section` only, when given)."""
    text = path.read_text()
    if section:
        start = text.index(f"## {section}")
        text = text[start:text.find("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow  # the example trains a small run
def test_every_example_in_the_docs_runs(tmp_path, random_ckpt, cache_dir, monkeypatch, capsys):
    """docs/api.md's examples in order, then the README's, in one namespace, in a folder laid out as
    the repository is (data/, weights/ with a random-init checkpoint under the official name)."""
    monkeypatch.delenv("UNIMOL_WEIGHT_DIR", raising=False)
    (tmp_path / "data").symlink_to(ROOT / "data", target_is_directory=True)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / UNIMOL_WEIGHTS.file).symlink_to(random_ckpt)
    (tmp_path / "cache").symlink_to(cache_dir, target_is_directory=True)
    blocks = python_blocks(ROOT / "docs" / "api.md")
    readme = python_blocks(ROOT / "README.md", "Python use")
    assert len(blocks) >= 5 and readme and DEMO.is_file()
    namespace = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the docs' own examples
    # the README scores a run of `make demo`: the run docs/api.md trained stands in for it
    demo_run = tmp_path / "outputs" / "finetune_comparison_demo" / "demo_ec50_scaffold" / "minimol" / "frozen" / "seed42"
    shutil.copytree(tmp_path / "outputs" / "api_demo", demo_run)
    capsys.readouterr()
    readme_namespace = {}
    for block in readme:
        exec(compile(block, "README.md", "exec"), readme_namespace)  # noqa: S102
    # what it printed: the demo run's scores of its two SMILES, as load_run gives them (and predict writes them)
    scored = load_run(demo_run).score_smiles(["CCO", "c1ccccc1O"])
    assert capsys.readouterr().out.strip() == str(scored) and all(row.energy is not None for row in scored)
    assert readme_namespace["features"].shape == (2, 512) and readme_namespace["features"].requires_grad


def test_a_fine_tunable_encoder_frozen_for_inference_never_fills_the_frozen_cache(tmp_path):
    """Whether an encoder is fine-tuned is what it is, not its requires_grad: switched off to run it for
    inference, it still runs inside the model and its features never go to the frozen feature cache."""
    settings = MoleculeSettings(tmp_path)
    encoder = FinetunableMiniMolEncoder(freeze_layers="0-13").requires_grad_(False)
    prepared, _ = encoder.prepare(SMILES, settings)
    inputs = model_inputs(encoder, {"test": SMILES}, prepared, tmp_path, cache_prefix=False)["test"]
    assert encoder.trains and not isinstance(inputs, FeatureInputs)
    assert not list(tmp_path.glob("minimol-features-*"))


def test_the_model_from_flags_takes_their_seed(weight_dir):
    parser = build_parser()
    seven = EnergyDPOModel.from_settings(parser.parse_args(["--seed", "7", "--unimol_weights", "random"]))
    again = EnergyDPOModel.from_settings(parser.parse_args(["--unimol_weights", "random"]), seed=7)
    default = EnergyDPOModel.from_settings(parser.parse_args(["--unimol_weights", "random"]))
    heads = [m.head.state_dict()["net.0.weight"] for m in (seven, again, default)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    assert torch.equal(heads[2], EnergyDPOModel.from_settings(ModelSpec(), "random").head.state_dict()["net.0.weight"])

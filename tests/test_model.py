import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model
import settings
from conftest import ROOT
from encoders import UNIMOL_WEIGHTS, unimol, unimol_conformers
from encoders.unimol_conformers import make_conformer
from model import EnergyHead, UniMolEncoder, energy_loss
from molecules import canonicalize
from utils import InputError

MOLECULES = ["CCO", "CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C[Si](C)(C)Cl",
             "O=C([O-])c1ccccc1.[Na+]", "Clc1ccc(cc1)C(c1ccccc1)N1CCNCC1", "FC(F)(F)c1ccc(Br)cc1I"]


@pytest.fixture(scope="module")
def encoder(random_ckpt):
    return UniMolEncoder(str(random_ckpt))


def test_architecture_is_the_real_15_layer_unimol(encoder):
    unimol = encoder.unimol
    assert len(unimol.encoder.layers) == 15
    assert len(encoder.dictionary) == 31 and encoder.dictionary.index("[MASK]") == 30
    assert [encoder.dictionary.index(s) for s in ("[CLS]", "[UNK]", "[PAD]", "[SEP]", "C", "N", "O")] == \
        [0, 1, 2, 3, 4, 5, 6]
    per_layer = sum(p.numel() for p in unimol.encoder.layers[0].parameters())
    assert per_layer == 3_152_384
    assert sum(p.numel() for p in unimol.parameters()) == 47_331_139 - 513  # without the unused classifier
    assert not any(p.requires_grad for p in encoder.parameters())


def test_features_equal_unimol_tools_repr(encoder, random_ckpt):
    """Our featurisation path against unimol_tools' own UniMolRepr on the same checkpoint, for
    SMILES as written (canonical and not)."""
    from unimol_tools import UniMolRepr
    smiles = MOLECULES
    ours = encoder.encode([make_conformer(s)[:2] for s in smiles], batch_size=3)
    repr_ = UniMolRepr(remove_hs=True, use_cuda=False, batch_size=4, pretrained_model_path=str(random_ckpt),
                       pretrained_dict_path=str(unimol_conformers.unimol_dict_path()))
    theirs = np.asarray(repr_.get_repr(smiles))
    assert theirs.shape == ours.shape == (len(smiles), 512)
    assert np.abs(ours - theirs).max() < 1e-4


def test_batching_does_not_change_features(encoder):
    confs = [make_conformer(canonicalize(s)[0])[:2] for s in MOLECULES]
    one_by_one = encoder.encode(confs, batch_size=1)
    batched = encoder.encode(confs, batch_size=7)
    assert np.abs(one_by_one - batched).max() < 1e-4


def test_checkpoint_weights_are_loaded(encoder, random_ckpt):
    state = torch.load(random_ckpt, weights_only=True)["model"]
    loaded = encoder.unimol.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert encoder.weights_id.startswith("sha256:") and not encoder.is_random_init
    random_enc = UniMolEncoder("random")
    assert random_enc.is_random_init and random_enc.weights_id == "random-init(seed=0)"
    assert not torch.equal(random_enc.unimol.embed_tokens.weight, loaded["embed_tokens.weight"])
    again = UniMolEncoder("random")  # seeded: the same random encoder every time
    assert torch.equal(again.unimol.embed_tokens.weight, random_enc.unimol.embed_tokens.weight)


def test_pretraining_heads_are_ignored_but_other_keys_are_not(tmp_path, random_ckpt):
    state = torch.load(random_ckpt, weights_only=True)["model"]
    with_heads = dict(state, **{"lm_head.dense.weight": torch.zeros(2), "dist_head.out_proj.bias": torch.zeros(1)})
    torch.save({"model": with_heads, "args": {"arch": "unimol"}}, tmp_path / "heads.pt")
    loaded = UniMolEncoder(str(tmp_path / "heads.pt")).unimol.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)

    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "prefixed.pt")
    with pytest.raises(InputError, match="module.*prefix.*193 missing keys"):
        UniMolEncoder(str(tmp_path / "prefixed.pt"))

    missing = {k: v for k, v in state.items() if not k.startswith("encoder.layers.14.")}
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(InputError, match=r"missing keys \['encoder.layers.14"):
        UniMolEncoder(str(tmp_path / "missing.pt"))

    wrong = dict(state, **{"embed_tokens.weight": torch.zeros(30, 512)})
    torch.save({"model": wrong}, tmp_path / "wrong.pt")
    with pytest.raises(InputError, match="shape mismatch.*embed_tokens"):
        UniMolEncoder(str(tmp_path / "wrong.pt"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_never_execute_code(tmp_path):
    torch.save({"model": {"x": _Payload()}}, tmp_path / "evil.pt")
    with pytest.raises(InputError, match="not a plain weights file"):
        UniMolEncoder(str(tmp_path / "evil.pt"))


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(InputError) as err:
        UniMolEncoder(str(tmp_path / "mol_pre_no_h_220816.pt"))
    msg = str(err.value)
    assert str(tmp_path) in msg and "dptech" in msg and "--unimol_weights random" in msg


def test_weights_path_honours_unimol_weight_dir(monkeypatch):
    monkeypatch.delenv("UNIMOL_WEIGHT_DIR", raising=False)
    assert UNIMOL_WEIGHTS.default_path() == "./weights/mol_pre_no_h_220816.pt"
    monkeypatch.setenv("UNIMOL_WEIGHT_DIR", "/opt/unimol")
    assert UNIMOL_WEIGHTS.default_path() == "/opt/unimol/mol_pre_no_h_220816.pt"


def test_energy_head_shape_and_size():
    head = EnergyHead(512, 256)
    assert sum(p.numel() for p in head.parameters()) == 164_353
    assert head(torch.zeros(5, 512)).shape == (5,)


def test_losses_on_hand_computed_cases():
    e_id, e_ood = torch.tensor([0.0, 1.0]), torch.tensor([2.0])
    dpo = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert energy_loss(e_id, e_ood, "dpo", beta=1.0, lambda_reg=0.0).item() == pytest.approx(dpo, abs=1e-6)
    # λ (mean E_id² + mean E_ood²) = 0.5 (0.5 + 4)
    assert energy_loss(e_id, e_ood, "dpo", beta=1.0, lambda_reg=0.5).item() == pytest.approx(dpo + 2.25, abs=1e-6)
    # β scales the margin: softplus(-0.1·Δ)
    dpo_b = (math.log1p(math.exp(-0.2)) + math.log1p(math.exp(-0.1))) / 2
    assert energy_loss(e_id, e_ood, "dpo", beta=0.1, lambda_reg=0.0).item() == pytest.approx(dpo_b, abs=1e-6)
    assert energy_loss(e_id, torch.tensor([0.5]), "hinge", lambda_reg=0.0, margin=1.0).item() == pytest.approx(1.0)
    zero = torch.zeros(1)
    assert energy_loss(zero, zero, "bce", lambda_reg=0.0).item() == pytest.approx(math.log(2), abs=1e-6)
    assert energy_loss(zero, zero, "mse", lambda_reg=0.0).item() == pytest.approx(0.5, abs=1e-6)


def test_dpo_loss_uses_all_pairs():
    e_id, e_ood = torch.tensor([0.0, 3.0]), torch.tensor([1.0, 2.0, 4.0])
    pairs = [o - i for i in (0.0, 3.0) for o in (1.0, 2.0, 4.0)]
    expected = sum(math.log1p(math.exp(-d)) for d in pairs) / 6
    assert energy_loss(e_id, e_ood, "dpo", beta=1.0, lambda_reg=0.0).item() == pytest.approx(expected, abs=1e-6)
    diag = model.pair_diagnostics(e_id, e_ood)
    assert diag["misranked"] == pytest.approx(2 / 6) and diag["margin"] == pytest.approx(sum(pairs) / 6)


def test_length_chunks_cover_everything_within_budget():
    lengths = [30, 300, 12, 45, 45, 260, 8, 64, 31]
    chunks = unimol.length_chunks(lengths, max_count=3, budget=4 * 64 * 64)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)
    for c in chunks:
        assert len(c) <= 3 and (len(c) == 1 or len(c) * max(lengths[i] for i in c) ** 2 <= 4 * 64 * 64)
    assert [len(c) for c in chunks if max(lengths[i] for i in c) >= 260] == [1, 1]  # peptides alone


def test_importing_the_encoder_leaves_the_process_alone(tmp_path):
    """No chdir (os.chdir is removed), no ./logs, no change to the root logger level."""
    code = ("import logging, os, sys; sys.path.insert(0, sys.argv[1]); os.chdir = None; level = logging.root.level; "
            "from encoders.unimol import build_unimol; build_unimol(); import unimol_tools; "
            "assert logging.root.level == level and os.listdir('.') == [], os.listdir('.'); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_checkpoint_describes_itself(tmp_path, random_ckpt):
    spec = settings.ModelSpec(encoder_weights=UniMolEncoder("random").weights_id, hidden_dim=32, loss_type="hinge")
    net = model.EnergyDPOModel(spec, seed=3)
    model.save_checkpoint(tmp_path / "m.pt", {"model_spec": dataclasses.asdict(spec), "model": net.checkpoint_state()})
    rebuilt, encoder, _ = model.load_model(tmp_path / "m.pt", {"unimol_weights": "random"})
    assert rebuilt.spec == spec and rebuilt.encoder is encoder and encoder.is_random_init and not encoder.trains
    x = torch.randn(4, 512)
    assert torch.equal(rebuilt.eval()(x), net.eval()(x))
    with pytest.raises(InputError, match="was trained on encoder random-init.*loaded now is sha256:"):
        model.load_model(tmp_path / "m.pt", {"unimol_weights": str(random_ckpt)})
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(InputError, match="tensor.pt: not a checkpoint of this tool"):
        model.load_model(tmp_path / "tensor.pt", {"unimol_weights": "random"})
    (tmp_path / "cut.pt").write_bytes((tmp_path / "m.pt").read_bytes()[:500])
    with pytest.raises(InputError, match="cut.pt: not a checkpoint of this tool"):
        model.load_model(tmp_path / "cut.pt", {"unimol_weights": "random"})

"""Partial fine-tuning of Uni-Mol: flags, which parameters train, the prefix cache, fine-tuned runs."""
import csv
import json
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import settings
import train
from batching import FeatureInputs, energies
from conftest import DEMO, interrupted
from encoders import build_encoder, parse_freeze_spec, unimol_conformers
from encoders.unimol import ConformerInputs, PrefixInputs, build_unimol, collate
from features import model_inputs
from cli import build_parser, given_flags, validate
from main import main
from model import EnergyDPOModel, FinetunableUniMolEncoder, UniMolEncoder, load_checkpoint
from scoring import load_run
from settings import ModelSpec, ScoringSettings, TrainConfig
from train import EnergyDPOTrainer

SMILES = ["CCO", "c1ccccc1O", "CC(C)Nc1ncccc1", "CCOC(=O)C", "c1ccncc1C#N", "OCCOc1ccccc1", "CC(=O)Nc1ccc(O)cc1",
          "CN1CCNCC1"]


def parsed(*argv):
    parser, argv = build_parser(), ["--data_file", str(DEMO), *argv]
    args = parser.parse_args(argv)
    return args, validate(args, given_flags(parser, argv), parser)


def tuned_encoder(freeze="0-12", strategy="layers"):
    spec = ModelSpec(finetune_encoder=True, freeze_layers=freeze, finetune_strategy=strategy)
    return build_encoder(spec, unimol_weights="random")


@pytest.fixture(scope="module")
def conformers():
    return [unimol_conformers.make_conformer(s)[:2] for s in SMILES]


def finetuned_model(freeze="0-12", seed=0):
    encoder = tuned_encoder(freeze)
    return EnergyDPOModel(ModelSpec(encoder.weights_id, finetune_encoder=True, freeze_layers=freeze), encoder, seed)


def test_defaults_are_the_frozen_pipeline():
    args, error = parsed("--unimol_weights", "random")
    assert error is None and args.finetune_encoder is False
    assert (args.encoder_lr, args.freeze_layers, args.grad_accum_steps, args.amp) == (5e-6, "0-12", 1, "off")
    assert (args.batch_size, args.eval_batch_size) == (4096, 2048)
    assert args.dataset == "demo_ec50_scaffold"  # the --data_file stem, not the official file's name
    encoder = build_encoder(ModelSpec(), unimol_weights="random")
    assert type(encoder) is UniMolEncoder and not any(p.requires_grad for p in encoder.parameters())
    frozen = EnergyDPOModel(ModelSpec(encoder.weights_id), encoder)  # holds its frozen encoder, takes features too
    assert not frozen.finetune_encoder and frozen(torch.zeros(2, 512)).shape == (2,)
    with pytest.raises(ValueError, match="needs its fine-tunable encoder"):
        EnergyDPOModel(ModelSpec(encoder.weights_id, finetune_encoder=True), encoder)


def test_finetune_batch_sizes_default_small_but_user_values_stand():
    args, _ = parsed("--unimol_weights", "random", "--finetune_encoder")
    assert (args.batch_size, args.eval_batch_size) == (256, 512)
    args, _ = parsed("--unimol_weights", "random", "--finetune_encoder", "--batch_size", "5000")
    assert args.batch_size == 5000


@pytest.mark.parametrize("spec, frozen", [
    ("0-12", list(range(13))), ("0-5,7,9-12", [0, 1, 2, 3, 4, 5, 7, 9, 10, 11, 12]), ("none", []),
    ("all", list(range(15))), (" 3 , 1-2 ", [1, 2, 3]), ("14", [14])])
def test_freeze_spec_parsing(spec, frozen):
    assert parse_freeze_spec(spec, 15) == frozen


@pytest.mark.parametrize("spec", ["0-15", "5-3", "abc", "", "1,,2", "-1"])
def test_bad_freeze_specs(spec):
    with pytest.raises(ValueError, match="--freeze_layers"):
        parse_freeze_spec(spec, 15)


@pytest.mark.parametrize("argv, message", [
    (["--finetune_encoder", "--freeze_layers", "all"], "leaves no Uni-Mol layer"),
    (["--finetune_encoder", "--freeze_layers", "0-14"], "leaves no Uni-Mol layer"),
    (["--freeze_layers", "0-20"], "outside layers 0-14"),
    (["--finetune_encoder", "--freeze_layers", ""], "--freeze_layers '': cannot read ''"),  # never the default
    (["--finetune_encoder", "--encoder_lr", "0"], "must be positive"),
    (["--grad_accum_steps", "0"], "--grad_accum_steps must be at least 1"),
])
def test_inconsistent_finetune_flags(argv, message, capsys):
    assert main(["--unimol_weights", "random", *argv]) == 2
    assert message in capsys.readouterr().err


def trainable_names(encoder):
    return {n for n, p in encoder.unimol.named_parameters() if p.requires_grad}


def test_exactly_the_documented_parameters_train():
    enc = FinetunableUniMolEncoder("random", "0-12")
    names = trainable_names(enc)
    assert names and all(n.startswith(("encoder.layers.13.", "encoder.layers.14.", "encoder.final_layer_norm."))
                         for n in names)
    assert {n.split(".")[2] for n in names if n.startswith("encoder.layers.")} == {"13", "14"}
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == 6_305_792
    assert sum(p.numel() for p in enc.parameters()) == 47_330_626

    inner = FinetunableUniMolEncoder("random", "1-14")  # layer 0 trains: embeddings too
    names = trainable_names(inner)
    assert {"embed_tokens.weight", "gbf.means.weight", "gbf_proj.linear1.weight", "encoder.emb_layer_norm.weight"} <= names
    assert not any(n.startswith(("encoder.final_layer_norm", "encoder.layers.1.")) for n in names)

    middle = FinetunableUniMolEncoder("random", "0-5,7,9-14")
    assert {n.split(".")[2] for n in trainable_names(middle)} == {"6", "8"}
    assert middle.frozen_prefix == 6


def test_frozen_prefix_is_deterministic_and_trainable_part_is_not(conformers):
    enc = FinetunableUniMolEncoder("random", "0-12").train()
    batch = collate(conformers[:4], enc.dictionary, "cpu")
    x1, b1 = enc.prefix(*batch)
    x2, b2 = enc.prefix(*batch)
    assert torch.equal(x1, x2) and torch.equal(b1, b2) and not x1.requires_grad
    assert not enc.unimol.encoder.layers[12].training and enc.unimol.encoder.layers[13].training
    out1, out2 = enc.suffix(x1, b1), enc.suffix(x1, b1)
    assert out1.requires_grad and not torch.equal(out1, out2)  # dropout in the trainable layers
    enc.eval()
    with torch.no_grad():
        frozen = UniMolEncoder("random")
        assert torch.allclose(enc(*batch), frozen(*batch), atol=1e-5)  # same weights before training


def test_training_step_changes_only_trainable_parameters(conformers):
    net = finetuned_model()
    encoder = net.encoder
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer = EnergyDPOTrainer(net, TrainConfig(batch_size=4, lr=1e-3, encoder_lr=1e-3), None)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["head"]["lr"] == 1e-3 and groups["encoder"]["lr"] == 1e-3
    assert sum(p.numel() for p in groups["encoder"]["params"]) == 6_305_792
    inputs = ConformerInputs(conformers, encoder.dictionary)
    trainer.train_epoch(1, inputs, ConformerInputs(conformers[::-1], encoder.dictionary))
    for name, param in net.named_parameters():
        trains = name.startswith(("head.", "encoder.unimol.encoder.layers.13.", "encoder.unimol.encoder.layers.14.",
                                  "encoder.unimol.encoder.final_layer_norm."))
        assert torch.equal(param, before[name]) != trains, name


def test_optimizer_groups_use_their_learning_rates():
    trainer = EnergyDPOTrainer(finetuned_model(), TrainConfig(), None)
    assert {g["name"]: g["lr"] for g in trainer.optimizer.param_groups} == {"head": 1e-4, "encoder": 5e-6}


def test_grad_accumulation_steps_and_checkpointing_gradients(conformers):
    net = finetuned_model()
    trainer = EnergyDPOTrainer(net, TrainConfig(batch_size=2, grad_accum_steps=3), None)
    trainer.train_epoch(1, ConformerInputs(conformers, net.encoder.dictionary),
                        ConformerInputs(conformers, net.encoder.dictionary))
    steps = {int(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2}  # 4 micro-batches, an update after 3 and one for the remainder

    grads = []
    for checkpointing in (False, True):
        enc = FinetunableUniMolEncoder("random", "0-12", grad_checkpointing=checkpointing).eval()
        enc.forward_chunks(ConformerInputs(conformers, enc.dictionary).batch(torch.arange(8), "cpu")).sum().backward()
        grads.append(enc.unimol.encoder.layers[13].fc1.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory, small_benchmark, random_ckpt, cache_dir):
    run = tmp_path_factory.mktemp("ft") / "run"
    assert main(["--mode", "train", "--finetune_encoder", "--encoder_lr", "1e-3", "--data_file", str(small_benchmark),
                 "--unimol_weights", str(random_ckpt), "--cache_dir", str(cache_dir), "--num_workers", "1",
                 "--train_size", "12", "--val_size", "8", "--test_size", "8", "--epochs", "2", "--batch_size", "6",
                 "--output_dir", str(run)]) == 0
    return run


def test_finetuned_run_scores_with_its_own_encoder(finetuned_run, random_ckpt, cache_dir):
    config = json.loads((finetuned_run / "config.json").read_text())
    assert config["encoder_trainable_params"] == 6_305_792 and config["args"]["finetune_encoder"] is True
    state = load_checkpoint(finetuned_run / "best_model.pt")
    assert set(state["model"]) == {"head", "encoder_trainable"}
    assert all(k.startswith(("encoder.layers.13.", "encoder.layers.14.", "encoder.final_layer_norm."))
               for k in state["model"]["encoder_trainable"])
    with open(finetuned_run / "test_scores.csv") as f:
        rows = list(csv.DictReader(f))
    recorded = np.array([float(r["energy"]) for r in rows])
    # the same head on features of the frozen base encoder gives other scores
    base = UniMolEncoder(str(random_ckpt))
    head_only = EnergyDPOModel(ModelSpec(base.weights_id))
    head_only.head.load_state_dict(state["model"]["head"])
    confs, _ = unimol_conformers.get_conformers([r["smiles"] for r in rows], settings.MoleculeSettings(cache_dir))
    feats = base.encode([confs[r["smiles"]][:2] for r in rows])
    frozen_scores = energies(head_only, FeatureInputs(feats), 64, "cpu").numpy()
    assert np.abs(frozen_scores - recorded).max() > 1e-3
    # eval and predict reproduce the fine-tuned scores, scoring with the run's own batch size (512)
    before = json.loads((finetuned_run / "test_metrics.json").read_text())
    molecules = {"cache_dir": str(cache_dir)}
    assert load_run(finetuned_run, molecules=molecules).scoring == ScoringSettings(eval_batch_size=512,
                                                                                   encode_batch_size=64)
    assert load_run(finetuned_run, molecules=molecules,
                    scoring=ScoringSettings(eval_batch_size=7)).scoring.eval_batch_size == 7
    assert main(["--mode", "eval", "--output_dir", str(finetuned_run), "--cache_dir", str(cache_dir)]) == 0
    after = json.loads((finetuned_run / "test_metrics.json").read_text())
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-9)
    assert after["energy_id_mean"] == pytest.approx(before["energy_id_mean"], abs=1e-5)
    out = finetuned_run.parent / "pred.csv"
    assert main(["--mode", "predict", "--output_dir", str(finetuned_run), "--smiles", rows[0]["smiles"],
                 "--output", str(out), "--cache_dir", str(cache_dir)]) == 0
    with open(out) as f:
        assert float(next(csv.DictReader(f))["energy"]) == pytest.approx(recorded[0], abs=1e-4)


def test_finetuned_checkpoint_refuses_other_base_weights(finetuned_run, capsys, cache_dir):
    assert main(["--mode", "eval", "--output_dir", str(finetuned_run), "--unimol_weights", "random",
                 "--cache_dir", str(cache_dir)]) == 1
    assert "was trained on encoder sha256:" in capsys.readouterr().err


def test_prefix_cache_gives_the_full_forward_within_fp16(tmp_path, conformers):
    enc = tuned_encoder().eval()
    confs = dict(zip(SMILES, [(a, c, False) for a, c in conformers]))
    inputs = model_inputs(enc, {"id_train": SMILES[:5], "ood_train": SMILES[5:]}, confs, tmp_path, batch_size=3)
    assert type(inputs["id_train"].inputs) is PrefixInputs and len(inputs["ood_train"]) == 3  # a role of the states
    store = enc.store_dir(tmp_path, "prefix")
    assert sorted(tmp_path.iterdir()) == [store] and store.name.endswith("-k13")  # the 13 frozen layers
    with torch.no_grad():
        for role, part in (("id_train", slice(0, 5)), ("ood_train", slice(5, 8))):
            idx = torch.arange(len(inputs[role]))
            cached = enc.forward_chunks(inputs[role].batch(idx, "cpu"))
            direct = enc(*collate(conformers[part], enc.dictionary, "cpu"))
            assert torch.nn.functional.cosine_similarity(cached, direct).min() > 0.9999
            assert (cached - direct).abs().max() < 2e-2
    # a second call reads the cache instead of recomputing
    shards = sorted(store.glob("shard-*"))
    model_inputs(enc, {"id_train": SMILES}, confs, tmp_path, batch_size=3)
    assert sorted(store.glob("shard-*")) == shards


def test_training_on_the_prefix_cache_follows_the_full_forward(tmp_path, conformers):
    confs = dict(zip(SMILES, [(a, c, False) for a, c in conformers]))
    roles = {"id_train": SMILES[:4], "ood_train": SMILES[4:]}
    losses = []
    for cached in (True, False):
        net = finetuned_model(seed=42)
        if cached:
            inputs = model_inputs(net.encoder, roles, confs, tmp_path, batch_size=3)
        else:
            inputs = {r: ConformerInputs([confs[s][:2] for s in m], net.encoder.dictionary) for r, m in roles.items()}
        trainer = EnergyDPOTrainer(net, TrainConfig(batch_size=4, lr=1e-3, encoder_lr=1e-4), None)
        losses.append([trainer.train_epoch(e, inputs["id_train"], inputs["ood_train"])["train_loss"]
                       for e in range(1, 4)])
    assert np.allclose(losses[0], losses[1], atol=2e-3), losses


def test_layer0_trainable_means_no_prefix_cache(tmp_path, conformers):
    enc = tuned_encoder("1-12")
    confs = dict(zip(SMILES[:3], [(a, c, False) for a, c in conformers[:3]]))
    assert type(model_inputs(enc, {"id_train": SMILES[:3]}, confs, tmp_path)["id_train"]) is ConformerInputs
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- strategies

def expected_trainable(strategy, layers=(13, 14)):
    """Trainable encoder parameters per strategy, from the module shapes."""
    enc = build_unimol().encoder
    linear = lambda m: m.in_features * m.out_features + m.out_features  # noqa: E731
    norm = lambda m: 2 * m.normalized_shape[0]  # noqa: E731
    per_layer = {
        "attention": lambda l: linear(l.self_attn.in_proj) + linear(l.self_attn.out_proj) + norm(l.self_attn_layer_norm),
        "ffn": lambda l: linear(l.fc1) + linear(l.fc2) + norm(l.final_layer_norm),
        "layers": lambda l: sum(p.numel() for p in l.parameters()),
        "lora": lambda l: 8 * sum(m.in_features + m.out_features for m in (l.self_attn.in_proj, l.self_attn.out_proj,
                                                                           l.fc1, l.fc2)),
    }[strategy]
    final_norm = 0 if strategy == "lora" else norm(enc.final_layer_norm)
    return sum(per_layer(enc.layers[i]) for i in layers) + final_norm


@pytest.mark.parametrize("strategy, count", [("layers", 6_305_792), ("attention", 2_104_320), ("ffn", 4_202_496),
                                             ("lora", 131_072)])
def test_each_strategy_trains_exactly_its_parameters(strategy, count):
    enc = tuned_encoder("0-12", strategy)
    names = [n for n, p in enc.unimol.named_parameters() if p.requires_grad]
    assert sum(p.numel() for p in enc.parameters() if p.requires_grad) == expected_trainable(strategy) == count
    assert {n.split(".")[2] for n in names if n.startswith("encoder.layers.")} == {"13", "14"}
    parts = {"attention": ("self_attn.", "self_attn_layer_norm."), "ffn": ("fc1.", "fc2.", "final_layer_norm."),
             "lora": ("self_attn.in_proj.lora_", "self_attn.out_proj.lora_", "fc1.lora_", "fc2.lora_"),
             "layers": ("",)}[strategy]
    for name in names:
        if name.startswith("encoder.layers."):
            assert name.split(".", 3)[3].startswith(parts), name
        else:
            assert name.startswith("encoder.final_layer_norm.") and strategy != "lora", name
    assert enc.frozen_prefix == 13  # the prefix cache serves every strategy


def test_lora_starts_as_the_frozen_encoder(conformers):
    enc = tuned_encoder(strategy="lora").eval()
    frozen = UniMolEncoder("random")
    batch = collate(conformers, frozen.dictionary, "cpu")
    with torch.no_grad():
        assert torch.equal(enc(*batch), frozen(*batch))


@pytest.fixture(scope="module", params=["attention", "ffn", "lora"])
def strategy_runs(request, tmp_path_factory, small_benchmark, random_ckpt, cache_dir):
    """Per strategy a finished 3-epoch run; for lora also the same run interrupted after its first epoch, then
    resumed. (Resuming restores the tensors that train by name, whichever they are: attention and ffn go the
    same way as layers, which test_minimol resumes; lora's are parameters peft added to the network.)"""
    args = ["--mode", "train", "--finetune_encoder", "--finetune_strategy", request.param, "--encoder_lr", "1e-3",
            "--data_file", str(small_benchmark), "--unimol_weights", str(random_ckpt), "--cache_dir", str(cache_dir),
            "--num_workers", "1", "--train_size", "12", "--val_size", "8", "--test_size", "8", "--epochs", "3",
            "--batch_size", "6", "--warmup_epochs", "2", "--lr_schedule", "cosine", "--patience", "0"]
    root = tmp_path_factory.mktemp(request.param)
    assert main([*args, "--output_dir", str(root / "full")]) == 0
    if request.param == "lora":
        resumed = root / "resumed"
        interrupted(lambda: (resumed / "last.pt").exists(), lambda: main([*args, "--output_dir", str(resumed)]))
        assert not (resumed / "test_metrics.json").exists()
        assert main([*args, "--output_dir", str(root / "resumed"), "--resume"]) == 0
    return request.param, root


@pytest.mark.slow
def test_strategy_runs_resume_and_rescore_exactly(strategy_runs, cache_dir):
    strategy, root = strategy_runs
    full, resumed = root / "full", root / "resumed"
    if strategy == "lora":
        with open(full / "history.csv") as f, open(resumed / "history.csv") as g:
            without_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
            assert without_time(csv.DictReader(f)) == without_time(csv.DictReader(g))
    state = load_checkpoint(full / "best_model.pt")
    assert state["model_spec"]["finetune_strategy"] == strategy
    trained = set(state["model"]["encoder_trainable"])
    assert trained and all(("lora_" in k) == (strategy == "lora") for k in trained)
    with open(full / "history.csv") as f:
        encoder_lrs = [float(r["encoder_lr"]) for r in csv.DictReader(f)]
    assert encoder_lrs == pytest.approx([5e-4, 1e-3, 1e-3])  # linear warm-up over 2 epochs, then cosine
    with open(full / "test_scores.csv") as f:
        rows = list(csv.DictReader(f))
    before = json.loads((full / "test_metrics.json").read_text())
    assert main(["--mode", "eval", "--output_dir", str(full)]) == 0
    after = json.loads((full / "test_metrics.json").read_text())
    assert after["auroc"] == pytest.approx(before["auroc"]) and \
        after["energy_id_mean"] == pytest.approx(before["energy_id_mean"], abs=1e-5)
    out = root / "pred.csv"
    assert main(["--mode", "predict", "--output_dir", str(full), "--smiles", rows[0]["smiles"], "--output",
                 str(out), "--overwrite"]) == 0
    with open(out) as f:
        assert float(next(csv.DictReader(f))["energy"]) == pytest.approx(float(rows[0]["energy"]), abs=1e-4)


def test_strategy_flags_without_fine_tuning_are_errors(capsys):
    assert main(["--unimol_weights", "random", "--data_file", str(DEMO), "--finetune_strategy", "lora"]) == 2
    assert "apply to fine-tuning only: add --finetune_encoder" in capsys.readouterr().err
    assert main(["--unimol_weights", "random", "--data_file", str(DEMO), "--finetune_encoder", "--lora_rank", "4"]) == 2
    assert "apply to --finetune_strategy lora only" in capsys.readouterr().err


def test_encoder_learning_rate_schedule():
    factors = lambda **kw: [train.encoder_lr_factor(e, TrainConfig(**kw)) for e in range(1, 7)]  # noqa: E731
    assert factors(epochs=6) == [1.0] * 6  # the default: constant, as before
    assert factors(epochs=6, warmup_epochs=2) == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    cosine = factors(epochs=6, warmup_epochs=2, lr_schedule="cosine")
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[3] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine[5] == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4))) and cosine[3] > cosine[4] > cosine[5]


@pytest.mark.parametrize("argv, message", [
    (["--finetune_strategy", "lora", "--lora_rank", "0"], "--lora_rank must be at least 1"),
    (["--finetune_strategy", "lora", "--lora_dropout", "1"], "--lora_dropout in [0, 1)"),
    (["--warmup_epochs", "-1"], "--warmup_epochs ≥ 0"),
    (["--finetune_strategy", "everything"], "invalid choice"),
])
def test_bad_strategy_values_are_one_line_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if message == "invalid choice" else nullcontext():
        code = main(["--unimol_weights", "random", "--data_file", str(DEMO), "--finetune_encoder",
                     "--output_dir", str(tmp_path / "run"), *argv])
        assert code == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()

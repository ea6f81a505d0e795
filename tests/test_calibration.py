"""predict's conformal p-values and its Benjamini-Hochberg decisions (--fdr): valid by test, not by
assumption. Runs calibrate on ID molecules that no other role used; ID molecules the run never saw (in no
role, in no OOD split) have p <= alpha at rate alpha, and BH at 0.1 keeps the false-discovery proportion at
0.1 on average while it finds OOD molecules; predict's columns follow the run's calibration, shards say
their rule, and a decision the calibration's size held back is said."""
import csv
import json

import numpy as np
import pytest
from rdkit import Chem

from conftest import DEMO
from evaluate import id_threshold
from stats import conformal_p_values, fdr_discoveries
from main import main
from model import load_checkpoint
from scoring import load_run


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_p_values_on_hand_computed_calibration():
    calibration = [0.1, 0.2, 0.3, 0.4]  # p = (1 + how many score at least E) / 5
    assert conformal_p_values([0.5, 0.4, 0.25, 0.0], calibration).tolist() == [0.2, 0.4, 0.6, 1.0]
    assert fdr_discoveries([0.01, 0.04, 0.2, 0.03], 0.1).tolist() == [True, True, False, True]
    assert fdr_discoveries([], 0.1).tolist() == []


SIZE = DEMO.parent / "demo_ec50_size.json"  # where frozen MiniMol separates well: BH has OOD molecules to find


def held_out_id(run, count, seed):
    """`count` ID molecules of the demo size file (as written) in no role of `run` (its calibration set
    included) and in none of the file's OOD splits: new molecules exchangeable with its calibration set."""
    splits = json.loads(SIZE.read_text())["split"]
    canonical = lambda s: Chem.MolToSmiles(Chem.MolFromSmiles(s))  # noqa: E731
    ood = {canonical(item["smiles"]) for split in ("ood_val", "ood_test") for item in splits[split]}
    used = {row["canonical_smiles"] for row in read_csv(run / "roles.csv")}
    pool = list({canonical(item["smiles"]): item["smiles"] for split in ("train", "iid_val", "iid_test")
                 for item in splits[split]}.items())
    pool = [written for key, written in pool if key not in ood and key not in used]
    return [pool[i] for i in np.random.default_rng(seed).choice(len(pool), count, replace=False)]


@pytest.mark.slow  # three real runs and their predictions
def test_p_values_are_valid_on_molecules_the_run_never_saw(tmp_path, cache_dir):
    """Three frozen MiniMol runs, each on its own draw of the molecules (so its own calibration set of 300),
    score 400 ID molecules that are in no role and in no OOD split, with the run's 100 OOD test molecules.
    The held-out ID molecules get p <= alpha at rate alpha; Benjamini-Hochberg at 0.1 (predict's --fdr,
    then on 200 random draws of 200 held-out ID molecules with the 100 OOD) keeps the false-discovery
    proportion at or below 0.1 on average while it flags OOD molecules."""
    rates, fdp, power, rng = {0.05: [], 0.1: []}, [], [], np.random.default_rng(0)
    for data_seed in (1, 2, 3):
        run = tmp_path / f"run{data_seed}"
        assert main(["--foundation_model", "minimol", "--data_file", str(SIZE), "--cache_dir", str(cache_dir),
                     "--train_size", "100", "--val_size", "50", "--test_size", "100", "--calibration_size", "300",
                     "--data_seed", str(data_seed), "--epochs", "20", "--batch_size", "32",
                     "--output_dir", str(run)]) == 0
        state = load_checkpoint(run / "best_model.pt")
        assert state["calibration_role"] == "id_cal" and len(state["calibration_energies"]) == 300
        new_id = held_out_id(run, 400, data_seed)
        ood = [row["smiles"] for row in read_csv(run / "roles.csv") if row["role"] == "ood_test"]
        (tmp_path / "mix.csv").write_text("smiles,truth\n" + "".join(f"{s},0\n" for s in new_id) +
                                          "".join(f"{s},1\n" for s in ood))
        assert main(["--mode", "predict", "--output_dir", str(run), "--input", str(tmp_path / "mix.csv"),
                     "--fdr", "0.1", "--output", str(tmp_path / f"p{data_seed}.csv")]) == 0
        predicted = read_csv(tmp_path / f"p{data_seed}.csv")
        assert all(r["error"] == "" for r in predicted) and len(predicted) == 500
        p_values = np.array([float(r["p_value"]) for r in predicted])
        # predict's p-values are the conformal ones of the calibration energies the run keeps, and its
        # decisions Benjamini-Hochberg's over them
        energies = [float(r["energy"]) for r in predicted]
        assert np.allclose(p_values, conformal_p_values(energies, state["calibration_energies"]), rtol=1e-5)
        assert [int(r["is_ood"]) for r in predicted] == fdr_discoveries(p_values, 0.1).astype(int).tolist()
        assert {r["decided_by"] for r in predicted} == {"fdr 0.1"}
        held, found = p_values[:400], p_values[400:]
        for alpha in rates:
            rates[alpha].append(np.mean(held <= alpha))
        for _ in range(200):
            flagged = fdr_discoveries(np.r_[rng.choice(held, 200, replace=False), found], 0.1)
            fdp.append(flagged[:200].sum() / max(1, flagged.sum()))
            power.append(flagged[200:].mean())
    for alpha, values in rates.items():  # expected floor(alpha * 301) / 301; 3 draws x 400 molecules: sd ~0.012
        assert abs(np.mean(values) - np.floor(alpha * 301) / 301) < 0.04, (alpha, values)
    assert np.mean(fdp) <= 0.1 and np.mean(power) > 0.1, (np.mean(fdp), np.mean(power))  # not by flagging nothing


def test_predict_writes_p_values_and_says_which_rule_decided(finished_run, tmp_path, caplog):
    rows = read_csv(finished_run / "test_scores.csv")
    smiles = [r["smiles"] for r in rows]
    calibration = load_checkpoint(finished_run / "best_model.pt")["calibration_energies"]
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles, "not a molecule",
                 "--output", str(tmp_path / "t.csv")]) == 0
    by_threshold = read_csv(tmp_path / "t.csv")
    assert [r["decided_by"] for r in by_threshold] == ["threshold"] * len(smiles) + [""]
    assert by_threshold[-1]["p_value"] == "" and by_threshold[-1]["error"]
    energies = [float(r["energy"]) for r in by_threshold[:-1]]
    assert np.allclose([float(r["p_value"]) for r in by_threshold[:-1]], conformal_p_values(energies, calibration),
                       rtol=1e-5)
    # a shard decides by Benjamini-Hochberg over its own molecules, and says so
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles, "--shard", "1/2",
                 "--fdr", "0.5", "--output", str(tmp_path / "s.csv")]) == 0
    shard = read_csv(tmp_path / "s.csv")
    assert {r["decided_by"] for r in shard} == {"fdr 0.5 within shard 1/2"} and len(shard) == len(smiles) // 2
    assert [int(r["is_ood"]) for r in shard] == fdr_discoveries([float(r["p_value"]) for r in shard], 0.5).tolist()
    assert "controlled within each shard" in caplog.text


def test_predict_says_when_the_calibration_set_is_too_small_for_the_rate(finished_run, tmp_path, caplog):
    """With n calibration molecules no p-value is below 1/(n + 1): Benjamini-Hochberg at rate q over N molecules
    flags nothing unless N / (q (n + 1)) of them score above every calibration energy. A decision held back by
    that is one warning line with the smallest p and the size that would do; one that was not, none."""
    smiles = [r["smiles"] for r in read_csv(finished_run / "test_scores.csv")]
    n = len(load_checkpoint(finished_run / "best_model.pt")["calibration_energies"])
    assert 0 < n < 100  # the small benchmark's spare ID molecules
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles, "--fdr", "0.01",
                 "--output", str(tmp_path / "q.csv")]) == 0
    assert not any(int(r["is_ood"]) for r in read_csv(tmp_path / "q.csv"))
    needed, size = -(-len(smiles) // (0.01 * (n + 1))), round(len(smiles) / 0.01) - 1
    assert (f"--fdr 0.01 flagged nothing among {len(smiles)} molecules: the run's {n} calibration molecules give "
            f"p-values of 1/{n + 1} = {1 / (n + 1):.2g} at the smallest") in caplog.text
    assert f"at least {needed:.0f} score above every calibration energy; with {size} calibration molecules" in caplog.text
    caplog.clear()
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", *smiles[:5], "--fdr", "0.5",
                 "--output", str(tmp_path / "r.csv")]) == 0  # 5 / (0.5 (n + 1)) <= 1: not the calibration's doing
    assert "flagged nothing" not in caplog.text


@pytest.mark.parametrize("value", ["0", "1", "1.5", "nan", "-0.1"])
def test_an_fdr_outside_0_1_is_a_one_line_error(value, finished_run, tmp_path, capsys):
    assert main(["--mode", "predict", "--output_dir", str(finished_run), "--smiles", "CCO", "--fdr", value,
                 "--output", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --fdr {float(value)}: a false-discovery rate is between 0 and 1, e.g. 0.1"
    assert not (tmp_path / "p.csv").exists()


def test_runs_from_before_calibration_sets_calibrate_on_validation_and_say_so(finished_run, tmp_path, caplog):
    """A run that kept its validation ID energies (before calibration sets) uses them; one that kept none
    scores its validation ID molecules again (roles.csv): the same p-values, and a warning that model
    selection used those molecules too. Without roles.csv it cannot be calibrated: a one-line error."""
    import shutil
    import torch
    kept = tmp_path / "kept"
    for name in ("kept", "none"):
        run = shutil.copytree(finished_run, tmp_path / name)
        state = torch.load(run / "best_model.pt", weights_only=True)
        assert state.pop("calibration_role") == "id_cal" and state.pop("calibration_energies")
        torch.save(state, run / "best_model.pt")
    again = tmp_path / "none"
    validation = load_run(again).calibration
    # scored again, the validation ID molecules give the threshold the run computed from them when it finished
    assert id_threshold(validation) == pytest.approx(state["threshold_95_id_val"], rel=1e-5)
    state = torch.load(kept / "best_model.pt", weights_only=True)
    torch.save(state | {"calibration_id_val_energies": sorted(validation.tolist())}, kept / "best_model.pt")
    for run, out in ((kept, "a.csv"), (again, "b.csv")):
        caplog.clear()
        assert main(["--mode", "predict", "--output_dir", str(run), "--smiles", "CCO", "c1ccccc1O",
                     "--output", str(tmp_path / out)]) == 0
        assert f"calibrated on its {len(validation)} validation ID molecules, on which model selection" in caplog.text
    assert [r["p_value"] for r in read_csv(tmp_path / "a.csv")] == [r["p_value"] for r in read_csv(tmp_path / "b.csv")]
    (again / "roles.csv").unlink()
    assert main(["--mode", "predict", "--output_dir", str(again), "--smiles", "CCO", "--output",
                 str(tmp_path / "c.csv")]) == 1
    assert json.loads((again / "test_metrics.json").read_text())  # the run itself untouched

"""What a sweep's summary says about how sure it is: DeLong's test of two AUROCs on the same molecules
against its definition, the paired Improvement's interval over data draws (or seeds), the spread over
draws and over seeds apart; and a sweep over two draws of the molecules summarised end to end."""
import csv
import dataclasses
import json

import numpy as np
import pytest
from scipy.stats import norm, t

import sweep_plan
from evaluate import ARM_VALIDATION_GAP, ood_metrics
from main import main
from stats import delong_test, improvement_interval, spreads
from sweep import compare_arms
from sweep_report import SUMMARY_COLUMNS, csv_rows, text_of


def delong_by_definition(id_a, ood_a, id_b, ood_b):
    """DeLong et al. (1988) written out: the pair kernel, its two structural components, their covariance."""
    def components(id_scores, ood_scores):
        psi = (ood_scores[:, None] > id_scores[None, :]) + 0.5 * (ood_scores[:, None] == id_scores[None, :])
        return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)
    (a, v_a, w_a), (b, v_b, w_b) = components(id_a, ood_a), components(id_b, ood_b)
    s10, s01 = np.cov(np.vstack([v_a, v_b])), np.cov(np.vstack([w_a, w_b]))
    variance = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / len(v_a) + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / len(w_a)
    z = (a - b) / np.sqrt(variance)
    return a - b, z, 2 * norm.sf(abs(z))


def test_delong_equals_its_definition_ties_included():
    rng = np.random.default_rng(0)
    truth_id, truth_ood = rng.normal(0, 1, 80), rng.normal(1, 1, 60)
    a = np.round(truth_id + rng.normal(0, 1, 80), 1), np.round(truth_ood + rng.normal(0, 1, 60), 1)
    b = np.round(truth_id + rng.normal(0, 0.5, 80), 1), np.round(truth_ood + rng.normal(0, 0.5, 60), 1)
    ours = delong_test(*a, *b)
    assert ours == pytest.approx(delong_by_definition(*a, *b), abs=1e-12)
    assert ours[0] == pytest.approx(ood_metrics(*a)["auroc"] - ood_metrics(*b)["auroc"])
    assert delong_test(*a, *a) == (0.0, 0.0, 1.0)  # the same scores: no difference to test


def test_the_improvement_interval_is_over_draws_when_there_are_several():
    draws = [42, 42, 42, 7, 7, 7]
    differences = [0.01, 0.02, 0.03, -0.01, 0.0, 0.01]  # draw means 0.02 and 0.0
    interval = improvement_interval(differences, draws)
    half = t.ppf(0.975, 1) * np.std([0.02, 0.0], ddof=1) / np.sqrt(2)
    assert (interval["low"], interval["high"]) == pytest.approx((0.01 - half, 0.01 + half))
    assert "2 data draws" in interval["over"] and not interval["distinguishable_from_0"]
    one_draw = improvement_interval([0.01, 0.012, 0.011], [42] * 3)
    assert "3 seeds" in one_draw["over"] and "another draw" in one_draw["over"] and one_draw["distinguishable_from_0"]
    assert improvement_interval([0.01], [42]) is None
    across, within = spreads([0.80, 0.82, 0.70, 0.72], [1, 1, 2, 2])
    assert across == pytest.approx(np.std([0.81, 0.71], ddof=1))
    assert within == pytest.approx(np.std([0.80, 0.82], ddof=1))  # both draws spread alike


@pytest.mark.slow  # four small runs
def test_a_sweep_over_two_draws_says_how_sure_it_is(small_benchmark, cache_dir, tmp_path, monkeypatch, capsys):
    """ECFP, a frozen arm and a second head recipe, two data draws x one seed, run from the sweep's printed
    lines in this process: the summary keeps the draws apart, gives both spreads, the interval over draws
    and DeLong's test per paired run, in its text, JSON and CSV."""
    for name in ("SEEDS", "DATASETS", "ARMS", "FOUNDATION_MODELS", "UNIMOL_WEIGHT_DIR", "DATA_SEED"):
        monkeypatch.delenv(name, raising=False)
    env = {"DATA_FILE": str(small_benchmark), "DATASETS": "tiny", "OUTPUT_ROOT": str(tmp_path / "sweep"),
           "FOUNDATION_MODELS": "ecfp", "ARMS": "frozen fast", "ARM_fast": "--lr 0.001", "SEEDS": "1",
           "DATA_SEEDS": "42 7", "EPOCHS": "3", "TRAIN_SIZE": "12", "VAL_SIZE": "8", "TEST_SIZE": "8",
           "EXTRA_ARGS": f"--cache_dir {cache_dir} --patience 0"}
    plan = sweep_plan.plan_sweep(env, sweep_plan.Options(print_runs=True))
    assert len(plan.runs) == 4
    for run in plan.runs:
        assert main(list(run.args)) == 0
    root = tmp_path / "sweep" / "tiny"
    assert main(["--mode", "compare", "--output_dir", str(root)]) == 0
    part = json.loads((root / "comparison_summary.json").read_text())["encoders"][0]
    assert (part["seeds"], part["data_seeds"]) == ([1], [7, 42])
    interval = part["improvement_ci95"]["fast"]
    # one seed per draw: each draw's mean paired difference is its run's, and the interval is t's over the 2
    differences = part["paired_differences"]["fast"]["auroc"]
    half = t.ppf(0.975, 1) * np.std(differences, ddof=1) / np.sqrt(2)
    assert (interval["low"], interval["mean"], interval["high"]) == pytest.approx(
        (np.mean(differences) - half, np.mean(differences), np.mean(differences) + half))
    assert "2 data draws" in interval["over"]
    tests = part["paired_tests"]["fast"]
    assert sorted((test["data_seed"], test["seed"]) for test in tests) == [(7, 1), (42, 1)]
    assert all(0 <= test["p"] <= 1 for test in tests)
    across, within = part["spread"]["Energy-DPO (frozen)"]["auroc"]
    assert across > 0 and within == 0 and "Energy-DPO (fast)" in part["spread"]  # one seed per draw
    text = (root / "ecfp" / "comparison_summary.txt").read_text()
    assert "data seeds: 7 42" in text and "t-interval over the 2 data draws" in text
    per_draw = part["auroc_per_draw"]  # each draw's mean: here one seed, so its run's AUROC and paired difference
    fast = {test["data_seed"]: test["auroc_difference"] for test in tests}
    assert per_draw["Improvement (fast)"] == pytest.approx({str(draw): fast[draw] for draw in (7, 42)})
    assert [line.split(" | ")[1:3] for line in text.splitlines() if line.startswith("AUROC per data draw")] == [
        ["draw 7   ", "draw 42  "]]
    assert ("not distinguishable from 0" in text) != interval["distinguishable_from_0"]
    assert "DeLong's test per paired run (fast vs frozen" in text
    with open(root / "comparison_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fast = [r for r in rows if r["method"] == "Energy-DPO (fast)"]
    assert sorted((r["data_seed"], r["seed"]) for r in fast) == [("42", "1"), ("7", "1")]
    assert all(r["delong_p_vs_frozen"] and float(r["auroc_ci95_low"]) <= float(r["auroc"]) for r in fast)
    p_of = {(str(test["data_seed"]), str(test["seed"])): test["p"] for test in tests}
    assert all(float(r["delong_p_vs_frozen"]) == pytest.approx(p_of[r["data_seed"], r["seed"]], rel=1e-5) for r in fast)
    # a p-value far below 1e-6 keeps its digits in the CSV (it read 0.000000)
    part = compare_arms(root / "ecfp")
    tiny = dataclasses.replace(part, tests={arm: [dict(test, p=1.7e-7) for test in arm_tests]
                                            for arm, arm_tests in part.tests.items()})
    column = SUMMARY_COLUMNS.index("delong_p_vs_frozen")
    assert {row[column] for row in csv_rows(tiny) if row[3] == "Energy-DPO (fast)"} == {"1.7e-07"}


def test_the_summary_says_how_each_run_stopped_and_when_arms_got_different_head_updates(
        small_benchmark, cache_dir, tmp_path, monkeypatch):
    """ECFP, the frozen arm at main.py's batch (one step per epoch here) and an arm whose head takes three steps
    per epoch (--batch_size 4): each run's steps, best epoch and stop reason in the CSV and JSON, per arm the
    medians and the runs still improving when their budget ran out, and the warning that the arms got three
    times different head updates."""
    for name in ("SEEDS", "DATASETS", "ARMS", "FOUNDATION_MODELS", "DATA_SEEDS", "DATA_SEED", "RECIPE"):
        monkeypatch.delenv(name, raising=False)
    env = {"DATA_FILE": str(small_benchmark), "DATASETS": "tiny", "OUTPUT_ROOT": str(tmp_path / "sweep"),
           "FOUNDATION_MODELS": "ecfp", "ARMS": "frozen small", "ARM_small": "--batch_size 4", "SEEDS": "1 2",
           "EPOCHS": "5", "PATIENCE": "0", "TRAIN_SIZE": "12", "VAL_SIZE": "8", "TEST_SIZE": "8",
           "EXTRA_ARGS": f"--cache_dir {cache_dir}"}
    for run in sweep_plan.plan_sweep(env, sweep_plan.Options(print_runs=True)).runs:
        assert main(list(run.args)) == 0
    root = tmp_path / "sweep" / "tiny"
    assert main(["--mode", "compare", "--output_dir", str(root)]) == 0
    part = json.loads((root / "comparison_summary.json").read_text())["encoders"][0]
    metrics = {(arm, seed): json.loads((root / "ecfp" / arm / f"seed{seed}" / "test_metrics.json").read_text())
               for arm in ("frozen", "small") for seed in (1, 2)}
    assert {m["stopped_by"] for m in metrics.values()} == {"epoch budget"}  # patience 0: the budget ends every run
    assert {(arm, m["optimizer_steps"]) for (arm, _), m in metrics.items()} == {("frozen", 5), ("small", 15)}
    for (arm, seed), m in metrics.items():
        assert ("convergence_warning" in m) == (m["best_epoch"] == 5)  # best in the last fifth of 5 epochs
        row = next(r for r in part["per_seed"] if r["method"] == f"Energy-DPO ({arm})" and r["seed"] == seed)
        assert (row["optimizer_steps"], row["best_epoch"], row["stopped_by"]) == (m["optimizer_steps"], m["best_epoch"],
                                                                                   "epoch budget")
    for arm in ("frozen", "small"):
        info = part["arms"][arm]
        assert (info["median_optimizer_steps"], info["stopped_by_patience"], info["runs"]) == (
            {"frozen": 5, "small": 15}[arm], 0, 2)
        assert info["convergence_warnings"] == sum("convergence_warning" in metrics[arm, s] for s in (1, 2))
    text = (root / "ecfp" / "comparison_summary.txt").read_text()
    for arm in ("frozen", "small"):  # an arm whose mean validation AUROC runs ahead of its test AUROC is named
        row = part["table"][f"Energy-DPO ({arm})"]
        ahead = row["val_auroc"][0] - row["auroc"][0]
        assert (f"Energy-DPO ({arm}): validation optimistic" in text) == (ahead > ARM_VALIDATION_GAP), (arm, ahead)
        assert (f"validation ran ahead of test by {ahead:+.3f}" in text) == (ahead > ARM_VALIDATION_GAP)
    compared = compare_arms(root / "ecfp")  # the line either way, whatever these tiny runs gave
    for gap, named in ((ARM_VALIDATION_GAP + 0.01, True), (ARM_VALIDATION_GAP - 0.01, False)):
        table = dict(compared.table)
        table["Energy-DPO (small)"] = dict(table["Energy-DPO (small)"], val_auroc=(
            table["Energy-DPO (small)"]["auroc"][0] + gap, 0.0))
        shown = text_of(dataclasses.replace(compared, table=table), "today")
        assert ("Energy-DPO (small): validation optimistic" in shown) == named
    assert ("head updates differ: Energy-DPO (small) took 3.0 times the optimizer steps of Energy-DPO (frozen) "
            "(median 15 vs 5)") in text
    with open(root / "comparison_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["optimizer_steps"], r["stopped_by"]) for r in rows if r["method"].startswith("Energy")} == {
        ("Energy-DPO (frozen)", "5", "epoch budget"), ("Energy-DPO (small)", "15", "epoch budget")}

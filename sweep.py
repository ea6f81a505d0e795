"""A sweep folder (SWEEP/<dataset>/<arm>/seed<N>/, one run each; with several encoders
SWEEP/<dataset>/<encoder>/<arm>/seed<N>/) and its comparison: the summary table, CSV, JSON and plot
of every arm against the frozen one of the same encoder, seed by seed."""
import csv
import dataclasses
import math
import textwrap
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import sem, t

from encoders import FOUNDATION_MODELS, EncoderId
from evaluate import BETTER, METRIC_LABELS, delong_test, pyplot, read_test_scores, save_figure, validation_warning
from runs import FINISHED, REFERENCE_ARM, run_folder, run_key
from settings import DataSpec, ModelSpec, TrainConfig
from utils import InputError, atomic_write_csv, atomic_write_json, atomic_write_text, read_json

COMPARED = ("auroc", "aupr", "fpr95", "auroc_size_matched")  # test metrics, with a paired Improvement
COLUMNS = (*COMPARED, "val_auroc")


@dataclasses.dataclass(frozen=True)
class ArmRun:
    """One finished run of a sweep."""
    metrics: dict  # its test_metrics.json
    config: dict  # its config.json
    seconds_per_epoch: float  # NaN when its history.csv is missing


def _value(metrics, key):
    value = metrics.get(key)
    return np.nan if value is None else float(value)


def _mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def sweep_arms(root):
    """The arm folders of a sweep (those holding run folders): frozen first, then by name."""
    arms = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(run_key(c) for c in p.iterdir()))
    return sorted(arms, key=lambda arm: (arm != REFERENCE_ARM, arm))


def _epoch_seconds(run):
    """Mean seconds per epoch of a run (its history.csv); NaN when it has none."""
    try:
        with open(run / "history.csv", newline="") as f:
            seconds = [float(row["seconds"]) for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return float("nan")
    return float(np.mean(seconds)) if seconds else float("nan")


def collect_arm_runs(root):
    """{arm: {RunKey: ArmRun}} from ROOT/<arm>/seed<N>/ (or data<D>_seed<N>/); every arm has the frozen
    arm's runs."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such sweep folder (expected {root}/frozen/seed*/ and {root}/<arm>/seed*/)")
    runs = {}
    for arm in sweep_arms(root):
        runs[arm] = {}
        for run in sorted((root / arm).iterdir()):
            if not run.is_dir() or run_key(run) is None:
                raise InputError(f"{run}: not a run folder (expected seed<N> or data<D>_seed<N>); move it out of "
                                 f"the sweep")
            what = "the run did not finish (rerun the sweep)"
            metrics, config = read_json(run / FINISHED, what), read_json(run / "config.json", what)
            for path, doc, keys in ((run / FINISHED, metrics, ("auroc", "aupr", "fpr95", "best_epoch",
                                                               "val_auroc")),
                                    (run / "config.json", config, ("args", "encoder_weights"))):
                missing = [k for k in keys if not isinstance(doc, dict) or k not in doc]
                if missing:
                    raise InputError(f"{path}: incomplete (no {', '.join(missing)}); rerun that run with --overwrite")
            try:
                EncoderId.parse(config["encoder_weights"])
            except (ValueError, AttributeError):
                raise InputError(f"{run / 'config.json'}: damaged encoder_weights {config['encoder_weights']!r}; "
                                 f"rerun that run with --overwrite") from None
            runs[arm][run_key(run)] = ArmRun(metrics, config, _epoch_seconds(run))
    keys = {arm: sorted(r, key=_order) for arm, r in runs.items()}
    if REFERENCE_ARM not in runs or any(k != keys[REFERENCE_ARM] for k in keys.values()):
        found = {arm: [key.folder for key in k] for arm, k in keys.items()}
        raise InputError(f"{root}: need frozen/seed* and every other arm's runs for the same seeds and data seeds (a "
                         f"frozen-only encoder has the frozen arm alone), found {found}")
    weights = {run.config["encoder_weights"] for arm in runs.values() for run in arm.values()}
    if len(weights) != 1:
        raise InputError(f"{root}: runs used different encoder weights {sorted(weights)}; compare like with like")
    return runs


def _order(key):
    return -1 if key.data_seed is None else key.data_seed, key.seed


def sweep_baselines(root, keys):
    """{baseline: {RunKey: metrics}} from the frozen arm's baselines.json files (the feature baselines
    use frozen features in both arms, so one arm holds them all); {} when a run predates them."""
    out = {}
    for key in keys:
        path = run_folder(root, REFERENCE_ARM, key) / "baselines.json"
        if not path.is_file():
            return {}
        doc = read_json(path, "rerun that run with --overwrite")
        if not isinstance(doc, dict) or not isinstance(doc.get("baselines"), dict):
            raise InputError(f"{path}: incomplete (no baselines); rerun that run with --overwrite")
        for name, metrics in doc["baselines"].items():
            out.setdefault(name, {})[key] = metrics
    return {name: per_key for name, per_key in out.items() if len(per_key) == len(keys)}


def _arm_label(arm):
    return f"Energy-DPO ({arm})"


def _baseline_label(name):
    return f"baseline: {name}"


def encoder_folders(root):
    """SWEEP/<dataset>/<encoder>/ folders of a sweep over several encoders ([] for one encoder)."""
    return [Path(root) / name for name in FOUNDATION_MODELS if (Path(root) / name).is_dir()]


SUMMARY_COLUMNS = ["encoder", "data_seed", "seed", "method", *COLUMNS, "auroc_ci95_low", "auroc_ci95_high",
                   "delong_p_vs_frozen", "best_epoch", "encoder_weights"]


def write_comparison(root):
    """comparison_summary.txt / .json / .csv and comparison.png for a sweep of arms (frozen and
    fine-tuned variants) over seeds, with the baselines of the same roles beside them. A sweep over
    several encoders gets them per encoder folder, and at its root one section (one plot row) per
    encoder, pretrained encoders first; every CSV row names its encoder. Returns (summary, text)."""
    folders = encoder_folders(root)
    if not folders:
        one = _compare_arms(Path(root))
        summary, text, rows = one.summary, one.text, one.rows
        plot_comparison(Path(root) / "comparison.png", [one.arms])
    else:
        # pretrained encoders first; the sort is stable, so otherwise in FOUNDATION_MODELS' order
        parts = sorted((_compare_arms(folder) for folder in folders),
                       key=lambda part: EncoderId.parse(part.summary["encoder_weights"]).is_random_init)
        for part in parts:  # one encoder of several: its files beside its arms
            _write_summary(part.folder, part.summary, part.text, part.rows)
            plot_comparison(part.folder / "comparison.png", [part.arms])
        summary = {"encoders": [part.summary for part in parts]}
        text = "\n\n".join([f"Energy-DPO on {parts[0].summary['dataset']}, per encoder (pretrained first): "
                             + ", ".join(part.summary["encoder"] for part in parts)] + [part.text for part in parts])
        rows = [row for part in parts for row in part.rows]
        plot_comparison(Path(root) / "comparison.png", [part.arms for part in parts])
    _write_summary(Path(root), summary, text, rows)
    return summary, text


def _write_summary(folder, summary, text, rows):
    atomic_write_text(folder / "comparison_summary.txt", text + "\n")
    atomic_write_json(folder / "comparison_summary.json", _json_safe(summary))
    atomic_write_csv(folder / "comparison_summary.csv", rows, SUMMARY_COLUMNS)


class ComparedArms(NamedTuple):
    """One encoder's arms compared, as its plot row draws them."""
    runs: dict  # {arm: {RunKey: ArmRun}}
    keys: list  # the RunKeys every arm has
    table: dict  # {method: {metric: (mean, std)}}
    baselines: dict  # {baseline: {RunKey: metrics}}
    dataset: str
    label: str  # the encoder, as results name it


class Comparison(NamedTuple):
    """One encoder's comparison, as its folder's summary files and its plot row show it."""
    folder: Path
    summary: dict
    text: str
    rows: list  # comparison_summary.csv's
    arms: ComparedArms


def _compare_arms(root):
    """One encoder's comparison (its runs under `root`)."""
    runs = collect_arm_runs(root)
    arms = list(runs)
    keys = sorted(runs[REFERENCE_ARM], key=_order)
    ref_cfg = runs[REFERENCE_ARM][keys[0]].config
    draw_of = {key: runs[REFERENCE_ARM][key].config["args"]["data_seed"] for key in keys}
    draws, seeds = sorted(set(draw_of.values())), sorted({key.seed for key in keys})
    weights = ref_cfg["encoder_weights"]
    identity = EncoderId.parse(weights)
    random_init = identity.is_random_init
    arm_of = {_arm_label(arm): arm for arm in arms}
    methods = {label: {k: runs[arm][k].metrics for k in keys} for label, arm in arm_of.items()}
    baselines = sweep_baselines(root, keys)
    methods.update({_baseline_label(name): per_key for name, per_key in baselines.items()})
    table = {name: {m: _mean_std([_value(per_key[k], m) for k in keys]) for m in COLUMNS}
             for name, per_key in methods.items()}
    diffs = {arm: {m: [_value(runs[arm][k].metrics, m) - _value(runs[REFERENCE_ARM][k].metrics, m) for k in keys]
                   for m in COMPARED} for arm in arms[1:]}
    improvement = {arm: {m: _mean_std(d) for m, d in per_metric.items()} for arm, per_metric in diffs.items()}
    run_draws, several = [draw_of[k] for k in keys], len(draws) > 1
    intervals = {arm: improvement_interval(per_metric["auroc"], run_draws)
                 for arm, per_metric in diffs.items()}
    tests = {arm: [dict(zip(("auroc_difference", "z", "p"), _delong(root, arm, k)), data_seed=draw_of[k], seed=k.seed)
                   for k in keys] for arm in arms[1:]}
    spread = {name: {m: _spreads([_value(per_key[k], m) for k in keys], run_draws) for m in COMPARED}
              for name, per_key in methods.items()} if several else {}
    # Each draw's mean AUROC (over seeds): whether a ranking or an Improvement's sign holds on every draw
    aurocs = {name: [_value(per_key[k], "auroc") for k in keys] for name, per_key in methods.items()}
    aurocs |= {f"Improvement ({arm})": d["auroc"] for arm, d in diffs.items()}
    per_draw = {name: {str(draw): float(np.mean(v)) for draw, v in sorted(_by_draw(values, run_draws).items())}
                for name, values in aurocs.items()} if several else {}
    arm_info = {arm: {"flags": _arm_flags(runs[arm][keys[0]].config["args"]),
                      "encoder_trainable_params": runs[arm][keys[0]].config["encoder_trainable_params"],
                      "seconds_per_epoch": _mean_std([runs[arm][k].seconds_per_epoch for k in keys])[0]}
                for arm in arms}
    p_of = {(arm, test["data_seed"], test["seed"]): test["p"] for arm, arm_tests in tests.items() for test in arm_tests}
    per_run = [{"data_seed": draw_of[k], "seed": k.seed, "method": name, **{m: _value(rows[k], m) for m in COLUMNS},
                "auroc_ci95": rows[k].get("auroc_ci95"), "best_epoch": rows[k].get("best_epoch", ""),
                "delong_p_vs_frozen": p_of.get((arm_of.get(name), draw_of[k], k.seed))}
               for k in keys for name, rows in methods.items()]
    args = ref_cfg["args"]
    summary = {
        "dataset": args["dataset"], "data_file": args["data_file"], "seeds": seeds, "data_seeds": draws,
        "encoder": identity.short_label, "encoder_weights": weights, "random_init_encoder": random_init,
        "ood_val_split": args.get("ood_val_split", DataSpec.ood_val_split), "arms": arm_info,
        "sizes": {k: args[k] for k in ("train_size", "val_size", "test_size", "epochs")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "per_seed": per_run,
        "table": table | {f"Improvement ({arm})": imp for arm, imp in improvement.items()},
        "paired_differences": diffs, "improvement_ci95": intervals, "paired_tests": tests, "spread": spread,
        "auroc_per_draw": per_draw,
    }
    cell = lambda ms, sign="": "–" if np.isnan(ms[0]) else f"{ms[0]:{sign}.4f} ± {ms[1]:.4f}"  # noqa: E731
    weights_line = f"{identity.short_label}{':' if random_init else ','} {weights}"
    width, name_width = 18, max(29, *(len(f"Improvement ({arm})") + 1 for arm in arms))
    lines = [f"Energy-DPO on {args['dataset']}: " + " vs ".join(arms),
             f"encoder weights: {weights_line}",
             f"seeds: {' '.join(map(str, seeds))}   data seed{'s' if several else ''}: {' '.join(map(str, draws))}   "
             f"date: {summary['date']}",
             f"sizes per side: train {args['train_size']}, val {args['val_size']}, test {args['test_size']}; "
             f"max epochs {args['epochs']}; model selection on validation AUROC; OOD val split: "
             f"{summary['ood_val_split']}", ""]
    lines += [f"{'arm':<{name_width - 2}} {'trainable encoder params':>24} {'s/epoch':>8}  flags"]
    lines += [f"{arm:<{name_width - 2}} {info['encoder_trainable_params']:>24,} {info['seconds_per_epoch']:>8.1f}  "
              f"{info['flags'] or '(frozen encoder)'}" for arm, info in arm_info.items()]
    data = lambda r: f"{r['data_seed']:>6} " if several else ""  # noqa: E731
    lines += ["", f"{'data':>6} " * several + f"{'seed':>6}  {'arm':<{name_width - 8}} {'AUROC':>7} {'AUPR':>7} "
              f"{'FPR95':>7} {'size-m.':>7} {'val':>7} {'best epoch':>10}"]
    lines += [data(r) + f"{r['seed']:>6}  {arm_of[r['method']]:<{name_width - 8}} " + " ".join(
              f"{'–' if np.isnan(r[k]) else format(r[k], '.4f'):>7}" for k in COLUMNS) + f" {r['best_epoch']:>10}"
              for r in per_run if r["method"] in arm_of]
    lines += ["", f"{'Method':<{name_width}}" + "".join(f" | {METRIC_LABELS[k]:<{width}}" for k in COLUMNS)]
    for name in methods:
        lines.append(f"{name:<{name_width}}" + "".join(f" | {cell(table[name][k]):<{width}}" for k in COLUMNS))
    for arm, imp in improvement.items():
        lines.append(f"{f'Improvement ({arm})':<{name_width}}" + "".join(f" | {cell(imp[k], '+'):<{width}}"
                                                                         for k in COMPARED))
    lines.append(f"{'(better when)':<{name_width}}" + "".join(
        f" | {('> 0 (higher)' if BETTER[k] == 'higher' else '< 0 (lower)'):<{width}}" for k in COMPARED))
    over = f"all {len(keys)} runs ({len(draws)} data draws × {len(seeds)} seeds)" if several else "seeds"
    lines += ["", f"mean ± sample std over {over}; Improvement (arm) = arm − frozen, mean ± std of the paired "
              "per-run differences (the same data seed and seed): positive is better for AUROC, AUPR and size-matched "
              "AUROC, negative is better for FPR95. Size-matched AUROC: over ID-OOD pairs of equal heavy-atom count "
              "(0.5 for a score that only counts atoms). Baselines are on the same test molecules (frozen features)."]
    for arm in arms[1:]:
        lines += _improvement_lines(arm, intervals[arm], tests[arm])
    if several:
        lines += ["", f"{'AUROC per data draw':<{name_width}}" + "".join(f" | {'draw ' + str(d):<9}" for d in draws)
                  + f" | {'spread: draws':<13} | seeds"]
        for name, means in per_draw.items():
            sign = "+" if name.startswith("Improvement") else ""
            lines.append((f"{name:<{name_width}}" + "".join(f" | {means[str(d)]:<{sign}9.4f}" for d in draws)
                          + (f" | {spread[name]['auroc'][0]:<13.4f} | {spread[name]['auroc'][1]:.4f}"
                             if name in spread else "")).rstrip())
        lines.append("draw D: the mean AUROC (Improvement: the mean paired difference) over the seeds on data seed D; "
                     "spread: over data draws the std of the per-draw means, over seeds the mean within-draw std")
    if not baselines:
        lines.append("no baselines.json in these runs (made before baselines were computed): no baseline rows")
    for arm in arms:
        warning = validation_warning(table[_arm_label(arm)]["val_auroc"][0], table[_arm_label(arm)]["auroc"][0],
                                     summary["ood_val_split"])
        if warning:
            lines.append(f"{_arm_label(arm)}: {warning}")
    if random_init:
        lines.append(f"{identity.short_label}: these numbers do not measure pretrained Uni-Mol.")
    number = lambda value: "" if value is None or np.isnan(value) else f"{value:.6f}"  # noqa: E731
    rows = [(identity.short_label, r["data_seed"], r["seed"], r["method"], *(number(r[k]) for k in COLUMNS),
             *(number(v) for v in (r["auroc_ci95"] or (None, None))), number(r["delong_p_vs_frozen"]),
             r["best_epoch"], weights) for r in per_run]
    return Comparison(root, summary, "\n".join(lines), rows,
                      ComparedArms(runs, keys, table, baselines, args["dataset"], identity.short_label))


def improvement_interval(differences, draws, level=0.95):
    """A `level` t-interval of the mean paired AUROC difference, or None with fewer than two units. With
    several data draws the unit is the draw (its mean difference over seeds): seeds within a draw share
    its test molecules, so they are not independent replicates; with one draw, the seed."""
    by_draw = _by_draw(differences, draws)
    units = [float(np.mean(d)) for d in by_draw.values()] if len(by_draw) > 1 else list(differences)
    if len(units) < 2 or np.isnan(units).any():
        return None
    mean, half = float(np.mean(units)), float(t.ppf((1 + level) / 2, len(units) - 1) * sem(units))
    unit = (f"the {len(units)} data draws' mean differences" if len(by_draw) > 1 else
            f"the {len(units)} seeds' differences, on one draw of the molecules (another draw may differ more)")
    return {"mean": mean, "low": mean - half, "high": mean + half, "level": level, "over": unit,
            "distinguishable_from_0": bool(mean - half > 0 or mean + half < 0)}


def _improvement_lines(arm, interval, tests):
    lines = []
    if interval:
        verdict = "distinguishable from 0" if interval["distinguishable_from_0"] else "not distinguishable from 0"
        lines.append(f"Improvement ({arm}) AUROC {interval['mean']:+.4f}, 95% CI [{interval['low']:+.4f}, "
                     f"{interval['high']:+.4f}] (t-interval over {interval['over']}): {verdict}")
    significant = [test for test in tests if test["p"] < 0.05]
    p_values = ", ".join(f"{test['p']:.3g}" for test in tests)
    lines.append(f"  DeLong's test per paired run ({arm} vs frozen, the same test molecules): {len(significant)} of "
                 f"{len(tests)} differ at p < 0.05 (p: {p_values})")
    return lines


def _by_draw(values, draws):
    """{data seed: its runs' values}, in the order the draws first appear."""
    grouped = {}
    for draw, value in zip(draws, values):
        grouped.setdefault(draw, []).append(value)
    return grouped


def _spreads(values, draws):
    """(std of the per-draw means, mean of the within-draw stds) of one method's runs."""
    by_draw = _by_draw(values, draws)
    within = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in by_draw.values()]
    return float(np.std([np.mean(v) for v in by_draw.values()], ddof=1)), float(np.mean(within))


def _delong(root, arm, key):
    """DeLong's test of an arm's run against the frozen run with the same key, on their shared test molecules."""
    smiles, is_ood, energy = read_test_scores(run_folder(root, arm, key))
    frozen_smiles, _, frozen_energy = read_test_scores(run_folder(root, REFERENCE_ARM, key))
    if smiles != frozen_smiles:
        raise InputError(f"{run_folder(root, arm, key)}: other test molecules than the frozen run of the same "
                         f"{key.label}; the arms must share --data_seed and sizes")
    ood = np.asarray(is_ood) == 1
    energy, frozen_energy = np.asarray(energy), np.asarray(frozen_energy)
    return delong_test(energy[~ood], energy[ood], frozen_energy[~ood], frozen_energy[ood])


def _arm_flags(args):
    """The fine-tuning flags of an arm, as a user would type them."""
    if not args.get("finetune_encoder"):
        return ""
    flags = [f"--finetune_strategy {args.get('finetune_strategy', ModelSpec.finetune_strategy)}",
             f"--freeze_layers {args['freeze_layers']}", f"--encoder_lr {args['encoder_lr']:g}"]
    if args.get("warmup_epochs"):
        flags.append(f"--warmup_epochs {args['warmup_epochs']}")
    if args.get("lr_schedule", TrainConfig.lr_schedule) != "constant":
        flags.append(f"--lr_schedule {args['lr_schedule']}")
    return " ".join(flags)


def _json_safe(obj):
    """NaN (a metric that does not exist for a run) as null, which JSON can hold."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def plot_comparison(path, parts):
    """Per part (ComparedArms: one encoder's arms) a row of panels, one per compared metric: each seed's
    arms joined (paired), their mean, and the best baseline. Several parts: the encoder labels the row."""
    widest = max(len(p.runs) for p in parts)
    cols = len(COMPARED) if widest <= 2 or len(parts) > 1 else 2  # many arms alone: a 2 × 2 grid
    rows = math.ceil(len(COMPARED) / cols)
    panel = max(4.0, 1.0 * widest + 1.0)
    fig, axes = pyplot().subplots(rows * len(parts), cols, figsize=(panel * cols, 3.8 * rows * len(parts)),
                                  squeeze=False)
    for n, part in enumerate(parts):
        _plot_panels(axes[n * rows:(n + 1) * rows].ravel(), part.runs, part.keys, part.table, part.baselines,
                     textwrap.fill(part.label, 24) if len(parts) > 1 else "")
    dataset, label = parts[0].dataset, parts[0].label
    fig.suptitle(f"{dataset} · {label}" if len(parts) == 1 else f"{dataset} · one row per encoder", y=1.03)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_panels(axes, runs, keys, table, baselines, row_label):
    arms = list(runs)
    x = np.arange(len(arms))
    draws = sorted({k.data_seed for k in keys}, key=lambda d: -1 if d is None else d)
    for ax, key in zip(axes, COMPARED):
        for i, k in enumerate(keys):  # one colour per data draw when there are several
            colour = "grey" if len(draws) == 1 else f"C{4 + draws.index(k.data_seed) % 6}"
            first = next(j for j, other in enumerate(keys) if other.data_seed == k.data_seed) == i
            label = ("one seed (paired)" if len(draws) == 1 else f"data seed {k.data_seed}, each seed (paired)")
            ax.plot(x, [_value(runs[arm][k].metrics, key) for arm in arms], color=colour, lw=0.8, marker="o",
                    label=label if first else None)
        ax.scatter(x, [table[_arm_label(arm)][key][0] for arm in arms], s=300, marker="_", linewidths=2.5,
                   color="C3", zorder=3, label=f"mean of {len(keys)} runs")
        ranked = sorted((table[_baseline_label(name)][key][0], name) for name in baselines
                        if not np.isnan(table[_baseline_label(name)][key][0]))
        if ranked:
            value, name = ranked[0] if BETTER[key] == "lower" else ranked[-1]
            ax.axhline(value, color="C0", ls="--", lw=1, label=f"best baseline ({name})")
        ax.set_xticks(x, arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_xlim(-0.4, len(arms) - 0.6)
        ylabel = f"test {METRIC_LABELS[key]}"
        ax.set(ylabel=f"{row_label}\n\n{ylabel}" if row_label and ax is axes[0] else ylabel,
               title=f"{METRIC_LABELS[key]} ({BETTER[key]} is better)")
        ax.legend(fontsize="small")

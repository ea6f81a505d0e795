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

from encoders import FOUNDATION_MODELS, EncoderId
from evaluate import BETTER, METRIC_LABELS, pyplot, save_figure, validation_warning
from runs import FINISHED, REFERENCE_ARM, SEED_PREFIX, run_folder, seed_of
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
    """The arm folders of a sweep (those holding seed* runs): frozen first, then by name."""
    arms = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(p.glob(f"{SEED_PREFIX}*")))
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
    """{arm: {seed: (test_metrics, config, seconds per epoch)}} from ROOT/<arm>/seed<N>/; every arm
    has the frozen arm's seeds."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: no such sweep folder (expected {root}/frozen/seed*/ and {root}/<arm>/seed*/)")
    runs = {}
    for arm in sweep_arms(root):
        runs[arm] = {}
        for run in sorted((root / arm).glob(f"{SEED_PREFIX}*")):
            if not run.is_dir() or seed_of(run) is None:
                raise InputError(f"{run}: not a seed folder (expected {SEED_PREFIX}<N>); move it out of the sweep")
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
            runs[arm][seed_of(run)] = ArmRun(metrics, config, _epoch_seconds(run))
    seeds = {arm: sorted(r) for arm, r in runs.items()}
    if REFERENCE_ARM not in runs or any(s != seeds[REFERENCE_ARM] for s in seeds.values()):
        raise InputError(f"{root}: need frozen/seed* and every other arm's runs for the same seeds (a frozen-only "
                         f"encoder has the frozen arm alone), found {seeds}")
    weights = {run.config["encoder_weights"] for arm in runs.values() for run in arm.values()}
    if len(weights) != 1:
        raise InputError(f"{root}: runs used different encoder weights {sorted(weights)}; compare like with like")
    return runs


def sweep_baselines(root, seeds):
    """{baseline: {seed: metrics}} from the frozen arm's baselines.json files (the feature baselines
    use frozen features in both arms, so one arm holds them all); {} when a run predates them."""
    out = {}
    for seed in seeds:
        path = run_folder(root, REFERENCE_ARM, seed) / "baselines.json"
        if not path.is_file():
            return {}
        doc = read_json(path, "rerun that run with --overwrite")
        if not isinstance(doc, dict) or not isinstance(doc.get("baselines"), dict):
            raise InputError(f"{path}: incomplete (no baselines); rerun that run with --overwrite")
        for name, metrics in doc["baselines"].items():
            out.setdefault(name, {})[seed] = metrics
    return {name: per_seed for name, per_seed in out.items() if len(per_seed) == len(seeds)}


def _arm_label(arm):
    return f"Energy-DPO ({arm})"


def _baseline_label(name):
    return f"baseline: {name}"


def encoder_folders(root):
    """SWEEP/<dataset>/<encoder>/ folders of a sweep over several encoders ([] for one encoder)."""
    return [Path(root) / name for name in FOUNDATION_MODELS if (Path(root) / name).is_dir()]


SUMMARY_COLUMNS = ["encoder", "seed", "method", *COLUMNS, "best_epoch", "encoder_weights"]


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
    runs: dict  # {arm: {seed: ArmRun}}
    seeds: list
    table: dict  # {method: {metric: (mean, std)}}
    baselines: dict  # {baseline: {seed: metrics}}
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
    seeds = sorted(runs[REFERENCE_ARM])
    ref_cfg = runs[REFERENCE_ARM][seeds[0]].config
    weights = ref_cfg["encoder_weights"]
    identity = EncoderId.parse(weights)
    random_init = identity.is_random_init
    arm_of = {_arm_label(arm): arm for arm in arms}
    methods = {label: {s: runs[arm][s].metrics for s in seeds} for label, arm in arm_of.items()}
    baselines = sweep_baselines(root, seeds)
    methods.update({_baseline_label(name): per_seed for name, per_seed in baselines.items()})
    table = {name: {k: _mean_std([_value(per_seed[s], k) for s in seeds]) for k in COLUMNS}
             for name, per_seed in methods.items()}
    diffs = {arm: {k: [_value(runs[arm][s].metrics, k) - _value(runs[REFERENCE_ARM][s].metrics, k) for s in seeds]
                   for k in COMPARED} for arm in arms[1:]}
    improvement = {arm: {k: _mean_std(d) for k, d in per_key.items()} for arm, per_key in diffs.items()}
    arm_info = {arm: {"flags": _arm_flags(runs[arm][seeds[0]].config["args"]),
                      "encoder_trainable_params": runs[arm][seeds[0]].config["encoder_trainable_params"],
                      "seconds_per_epoch": _mean_std([runs[arm][s].seconds_per_epoch for s in seeds])[0]}
                for arm in arms}
    per_seed = [{"seed": s, "method": name, **{k: _value(rows[s], k) for k in COLUMNS},
                 "best_epoch": rows[s].get("best_epoch", "")} for s in seeds for name, rows in methods.items()]
    args = ref_cfg["args"]
    summary = {
        "dataset": args["dataset"], "data_file": args["data_file"], "seeds": seeds,
        "encoder": identity.short_label, "encoder_weights": weights, "random_init_encoder": random_init,
        "ood_val_split": args.get("ood_val_split", DataSpec.ood_val_split), "arms": arm_info,
        "sizes": {k: args[k] for k in ("train_size", "val_size", "test_size", "data_seed", "epochs")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "per_seed": per_seed,
        "table": table | {f"Improvement ({arm})": imp for arm, imp in improvement.items()},
        "paired_differences": diffs,
    }
    cell = lambda ms, sign="": "–" if np.isnan(ms[0]) else f"{ms[0]:{sign}.4f} ± {ms[1]:.4f}"  # noqa: E731
    weights_line = f"{identity.short_label}{':' if random_init else ','} {weights}"
    width, name_width = 18, max(29, *(len(f"Improvement ({arm})") + 1 for arm in arms))
    lines = [f"Energy-DPO on {args['dataset']}: " + " vs ".join(arms),
             f"encoder weights: {weights_line}",
             f"seeds: {' '.join(map(str, seeds))}   data seed: {args['data_seed']}   date: {summary['date']}",
             f"sizes per side: train {args['train_size']}, val {args['val_size']}, test {args['test_size']}; "
             f"max epochs {args['epochs']}; model selection on validation AUROC; OOD val split: "
             f"{summary['ood_val_split']}", ""]
    lines += [f"{'arm':<{name_width - 2}} {'trainable encoder params':>24} {'s/epoch':>8}  flags"]
    lines += [f"{arm:<{name_width - 2}} {info['encoder_trainable_params']:>24,} {info['seconds_per_epoch']:>8.1f}  "
              f"{info['flags'] or '(frozen encoder)'}" for arm, info in arm_info.items()]
    lines += ["", f"{'seed':>6}  {'arm':<{name_width - 8}} {'AUROC':>7} {'AUPR':>7} {'FPR95':>7} {'size-m.':>7} "
                  f"{'val':>7} {'best epoch':>10}"]
    lines += [f"{r['seed']:>6}  {arm_of[r['method']]:<{name_width - 8}} " + " ".join(
              f"{'–' if np.isnan(r[k]) else format(r[k], '.4f'):>7}" for k in COLUMNS) + f" {r['best_epoch']:>10}"
              for r in per_seed if r["method"] in arm_of]
    lines += ["", f"{'Method':<{name_width}}" + "".join(f" | {METRIC_LABELS[k]:<{width}}" for k in COLUMNS)]
    for name in methods:
        lines.append(f"{name:<{name_width}}" + "".join(f" | {cell(table[name][k]):<{width}}" for k in COLUMNS))
    for arm, imp in improvement.items():
        lines.append(f"{f'Improvement ({arm})':<{name_width}}" + "".join(f" | {cell(imp[k], '+'):<{width}}"
                                                                         for k in COMPARED))
    lines.append(f"{'(better when)':<{name_width}}" + "".join(
        f" | {('> 0 (higher)' if BETTER[k] == 'higher' else '< 0 (lower)'):<{width}}" for k in COMPARED))
    lines += ["", "mean ± sample std over seeds; Improvement (arm) = arm − frozen, mean ± std of the paired "
              "per-seed differences: positive is better for AUROC, AUPR and size-matched AUROC, negative is "
              "better for FPR95. Size-matched AUROC: over ID-OOD pairs of equal heavy-atom count (0.5 for a score "
              "that only counts atoms). Baselines are on the same test molecules (frozen features)."]
    if not baselines:
        lines.append("no baselines.json in these runs (made before baselines were computed): no baseline rows")
    for arm in arms:
        warning = validation_warning(table[_arm_label(arm)]["val_auroc"][0], table[_arm_label(arm)]["auroc"][0],
                                     summary["ood_val_split"])
        if warning:
            lines.append(f"{_arm_label(arm)}: {warning}")
    if random_init:
        lines.append(f"{identity.short_label}: these numbers do not measure pretrained Uni-Mol.")
    rows = [(identity.short_label, r["seed"], r["method"], *("" if np.isnan(r[k]) else f"{r[k]:.6f}" for k in COLUMNS),
             r["best_epoch"], weights) for r in per_seed]
    return Comparison(root, summary, "\n".join(lines), rows,
                      ComparedArms(runs, seeds, table, baselines, args["dataset"], identity.short_label))


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
        _plot_panels(axes[n * rows:(n + 1) * rows].ravel(), part.runs, part.seeds, part.table, part.baselines,
                     textwrap.fill(part.label, 24) if len(parts) > 1 else "")
    dataset, label = parts[0].dataset, parts[0].label
    fig.suptitle(f"{dataset} · {label}" if len(parts) == 1 else f"{dataset} · one row per encoder", y=1.03)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_panels(axes, runs, seeds, table, baselines, row_label):
    arms = list(runs)
    x = np.arange(len(arms))
    for ax, key in zip(axes, COMPARED):
        for i, s in enumerate(seeds):
            ax.plot(x, [_value(runs[arm][s].metrics, key) for arm in arms], color="grey", lw=0.8, marker="o",
                    label="one seed (paired)" if i == 0 else None)
        ax.scatter(x, [table[_arm_label(arm)][key][0] for arm in arms], s=300, marker="_", linewidths=2.5,
                   color="C3", zorder=3, label=f"mean of {len(seeds)} seeds")
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

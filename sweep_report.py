"""A sweep's comparison written out: comparison_summary.txt / .json / .csv and comparison.png, per encoder
folder and at the dataset's folder (sweep.py computes what they show)."""
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from evaluate import ARM_VALIDATION_GAP, BETTER, METRIC_LABELS, pyplot, save_figure, validation_warning
from runs import encoder_folders
from sweep import COLUMNS, COMPARED, UPDATES_RATIO, arm_label, baseline_label, compare_arms, value
from utils import atomic_write_csv, atomic_write_json, atomic_write_text

SUMMARY_COLUMNS = ["encoder", "data_seed", "seed", "method", *COLUMNS, "auroc_ci95_low", "auroc_ci95_high",
                   "delong_p_vs_frozen", "best_epoch", "optimizer_steps", "stopped_by", "encoder_weights"]


def write_comparison(root):
    """comparison_summary.txt / .json / .csv and comparison.png for a sweep of arms (frozen and
    fine-tuned variants) over seeds, with the baselines of the same roles beside them. A sweep over
    several encoders gets them per encoder folder, and at its root one section (one plot row) per
    encoder, pretrained encoders first; every CSV row names its encoder. Returns (summary, text)."""
    folders = encoder_folders(root)
    # pretrained encoders first; the sort is stable, so otherwise in FOUNDATION_MODELS' order
    parts = sorted((compare_arms(folder) for folder in folders or [Path(root)]),
                   key=lambda part: part.identity.is_random_init)
    date = time.strftime("%Y-%m-%d %H:%M")
    summaries, texts = [summary_of(part, date) for part in parts], [text_of(part, date) for part in parts]
    if not folders:
        summary, text = summaries[0], texts[0]
    else:
        for part, one, words in zip(parts, summaries, texts):  # one encoder of several: its files beside its arms
            _write_summary(part.folder, one, words, csv_rows(part))
            plot_comparison(part.folder / "comparison.png", [part])
        summary = {"encoders": summaries}
        text = "\n\n".join([f"Energy-DPO on {summaries[0]['dataset']}, per encoder (pretrained first): "
                            + ", ".join(one["encoder"] for one in summaries)] + texts)
    plot_comparison(Path(root) / "comparison.png", parts)
    _write_summary(Path(root), summary, text, [row for part in parts for row in csv_rows(part)])
    return summary, text


def _write_summary(folder, summary, text, rows):
    atomic_write_text(folder / "comparison_summary.txt", text + "\n")
    atomic_write_json(folder / "comparison_summary.json", _json_safe(summary))
    atomic_write_csv(folder / "comparison_summary.csv", rows, SUMMARY_COLUMNS)


def summary_of(part, date):
    """comparison_summary.json's content for one encoder's Comparison."""
    args = part.args
    return {
        "dataset": args["dataset"], "data_file": args["data_file"], "seeds": part.seeds, "data_seeds": part.draws,
        "encoder": part.identity.short_label, "encoder_weights": part.identity.text,
        "random_init_encoder": part.identity.is_random_init, "ood_val_split": part.ood_val_split,
        "arms": part.arm_info(), "sizes": {k: args[k] for k in ("train_size", "val_size", "test_size", "epochs")},
        "date": date, "per_seed": part.per_run(), "table": part.table, "paired_differences": part.diffs,
        "improvement_ci95": part.intervals, "paired_tests": part.tests, "spread": part.spread,
        "auroc_per_draw": part.per_draw,
    }


def _cell(mean_std, sign=""):
    return "–" if np.isnan(mean_std[0]) else f"{mean_std[0]:{sign}.4f} ± {mean_std[1]:.4f}"


def text_of(part, date):
    """comparison_summary.txt's section for one encoder's Comparison."""
    args, arms, identity, table, several = part.args, part.arms, part.identity, part.table, part.several_draws
    draws, seeds = part.draws, part.seeds
    arm_of = {arm_label(arm): arm for arm in arms}
    width, name_width = 18, max(29, *(len(f"Improvement ({arm})") + 1 for arm in arms))
    lines = [f"Energy-DPO on {args['dataset']}: " + " vs ".join(arms),
             f"encoder weights: {identity.short_label}{':' if identity.is_random_init else ','} {identity.text}",
             f"seeds: {' '.join(map(str, seeds))}   data seed{'s' if several else ''}: {' '.join(map(str, draws))}   "
             f"date: {date}",
             f"sizes per side: train {args['train_size']}, val {args['val_size']}, test {args['test_size']}; "
             f"max epochs {args['epochs']}; model selection on validation AUROC; OOD val split: "
             f"{part.ood_val_split}", ""]
    median = lambda x: "–" if x is None else f"{x:g}"  # noqa: E731
    lines += [f"{'arm':<{name_width - 2}} {'trainable encoder params':>24} {'s/epoch':>8} {'steps':>6} {'best ep':>7} "
              f"{'by patience':>11}  flags"]
    lines += [f"{arm:<{name_width - 2}} {info['encoder_trainable_params']:>24,} {info['seconds_per_epoch']:>8.1f} "
              f"{median(info['median_optimizer_steps']):>6} {median(info['median_best_epoch']):>7} "
              f"{str(info['stopped_by_patience']) + ' of ' + str(info['runs']):>11}  {info['flags'] or '(frozen encoder)'}"
              for arm, info in part.arm_info().items()]
    lines.append("steps, best ep: medians over the arm's runs (optimizer steps of the head, best epoch on validation); "
                 "by patience: runs that early stopping ended (the others ran out of their epoch budget)")
    data = lambda r: f"{r['data_seed']:>6} " if several else ""  # noqa: E731
    lines += ["", f"{'data':>6} " * several + f"{'seed':>6}  {'arm':<{name_width - 8}} {'AUROC':>7} {'AUPR':>7} "
              f"{'FPR95':>7} {'size-m.':>7} {'val':>7} {'best epoch':>10} {'steps':>6}  stopped by"]
    lines += [data(r) + f"{r['seed']:>6}  {arm_of[r['method']]:<{name_width - 8}} " + " ".join(
              f"{'–' if np.isnan(r[k]) else format(r[k], '.4f'):>7}" for k in COLUMNS) + f" {r['best_epoch']:>10} "
              f"{r['optimizer_steps']:>6}  {r['stopped_by'] or '–'}{' (still improving)' * bool(r['convergence_warning'])}"
              for r in part.per_run() if r["method"] in arm_of]
    lines += ["", f"{'Method':<{name_width}}" + "".join(f" | {METRIC_LABELS[k]:<{width}}" for k in COLUMNS)]
    for name in part.methods:
        lines.append(f"{name:<{name_width}}" + "".join(f" | {_cell(table[name][k]):<{width}}" for k in COLUMNS))
    for arm in arms[1:]:
        lines.append(f"{f'Improvement ({arm})':<{name_width}}" + "".join(
            f" | {_cell(table[f'Improvement ({arm})'][k], '+'):<{width}}" for k in COMPARED))
    lines.append(f"{'(better when)':<{name_width}}" + "".join(
        f" | {('> 0 (higher)' if BETTER[k] == 'higher' else '< 0 (lower)'):<{width}}" for k in COMPARED))
    over = f"all {len(part.keys)} runs ({len(draws)} data draws × {len(seeds)} seeds)" if several else "seeds"
    lines += ["", f"mean ± sample std over {over}; Improvement (arm) = arm − frozen, mean ± std of the paired "
              "per-run differences (the same data seed and seed): positive is better for AUROC, AUPR and size-matched "
              "AUROC, negative is better for FPR95. Size-matched AUROC: over ID-OOD pairs of equal heavy-atom count "
              "(0.5 for a score that only counts atoms). Baselines are on the same test molecules (frozen features)."]
    for arm in arms[1:]:
        lines += _improvement_lines(arm, part.intervals[arm], part.tests[arm])
    if several:
        lines += ["", f"{'AUROC per data draw':<{name_width}}" + "".join(f" | {'draw ' + str(d):<9}" for d in draws)
                  + f" | {'spread: draws':<13} | seeds"]
        for name, means in part.per_draw.items():
            sign = "+" if name.startswith("Improvement") else ""
            lines.append((f"{name:<{name_width}}" + "".join(f" | {means[str(d)]:<{sign}9.4f}" for d in draws)
                          + (f" | {part.spread[name]['auroc'][0]:<13.4f} | {part.spread[name]['auroc'][1]:.4f}"
                             if name in part.spread else "")).rstrip())
        lines.append("draw D: the mean AUROC (Improvement: the mean paired difference) over the seeds on data seed D; "
                     "spread: over data draws the std of the per-draw means, over seeds the mean within-draw std")
    if not part.baselines:
        lines.append("no baselines.json in these runs (made before baselines were computed): no baseline rows")
    lines += _training_lines(part)
    for arm in arms:
        warning = validation_warning(table[arm_label(arm)]["val_auroc"][0], table[arm_label(arm)]["auroc"][0],
                                     part.ood_val_split, ARM_VALIDATION_GAP)
        if warning:
            lines.append(f"{arm_label(arm)}: {warning} (means over its runs: validation ran ahead of test by "
                         f"{table[arm_label(arm)]['val_auroc'][0] - table[arm_label(arm)]['auroc'][0]:+.3f})")
    if identity.is_random_init:
        lines.append(f"{identity.short_label}: these numbers do not measure pretrained Uni-Mol.")
    return "\n".join(lines)


def _training_lines(part):
    """Warnings about how the arms' heads trained: runs still improving when their budget ran out, and arms
    whose heads got different numbers of updates (then the comparison measures the recipe as well)."""
    lines = []
    for arm, info in part.arm_info().items():
        if info["convergence_warnings"]:
            lines.append(f"{arm_label(arm)}: {info['convergence_warnings']} of {info['runs']} runs still improving when "
                         f"their epoch budget ran out (convergence_warning in test_metrics.json): their numbers are "
                         f"not a converged head's; raise EPOCHS")
    ratio = part.updates_ratio()
    if ratio and ratio[0] > UPDATES_RATIO:
        times, most, fewest = ratio
        steps = {arm: info["median_optimizer_steps"] for arm, info in part.arm_info().items()}
        lines.append(f"head updates differ: {arm_label(most)} took {times:.1f} times the optimizer steps of "
                     f"{arm_label(fewest)} (median {steps[most]:g} vs {steps[fewest]:g}), so the comparison measures "
                     f"the training recipe (batch size, epochs, stopping) as well as the encoder")
    return lines


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


def _number(x, form=".6f"):
    return "" if x is None or np.isnan(x) else format(x, form)


def csv_rows(part):
    """comparison_summary.csv's rows for one encoder's Comparison: metrics to 6 decimals, p-values to 6
    significant digits (a p of 1.7e-07 is not 0)."""
    return [(part.identity.short_label, r["data_seed"], r["seed"], r["method"], *(_number(r[k]) for k in COLUMNS),
             *(_number(v) for v in (r["auroc_ci95"] or (None, None))), _number(r["delong_p_vs_frozen"], ".6g"),
             r["best_epoch"], r["optimizer_steps"], r["stopped_by"], part.identity.text) for r in part.per_run()]


def _json_safe(obj):
    """NaN (a metric that does not exist for a run) as null, which JSON can hold."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def plot_comparison(path, parts):
    """Per part (one encoder's Comparison) a row of panels, one per compared metric: each seed's arms
    joined (paired), their mean, and the best baseline. Several parts: the encoder labels the row."""
    widest = max(len(p.runs) for p in parts)
    cols = len(COMPARED) if widest <= 2 or len(parts) > 1 else 2  # many arms alone: a 2 × 2 grid
    rows = math.ceil(len(COMPARED) / cols)
    panel = max(4.0, 1.0 * widest + 1.0)
    fig, axes = pyplot().subplots(rows * len(parts), cols, figsize=(panel * cols, 3.8 * rows * len(parts)),
                                  squeeze=False)
    for n, part in enumerate(parts):
        _plot_panels(axes[n * rows:(n + 1) * rows].ravel(), part,
                     textwrap.fill(part.identity.short_label, 24) if len(parts) > 1 else "")
    dataset, label = parts[0].args["dataset"], parts[0].identity.short_label
    fig.suptitle(f"{dataset} · {label}" if len(parts) == 1 else f"{dataset} · one row per encoder", y=1.03)
    fig.tight_layout()
    save_figure(fig, path)


def _plot_panels(axes, part, row_label):
    arms, keys, table = part.arms, part.keys, part.table
    x = np.arange(len(arms))
    draws = sorted({k.data_seed for k in keys}, key=lambda d: -1 if d is None else d)
    for ax, key in zip(axes, COMPARED):
        for i, k in enumerate(keys):  # one colour per data draw when there are several
            colour = "grey" if len(draws) == 1 else f"C{4 + draws.index(k.data_seed) % 6}"
            first = next(j for j, other in enumerate(keys) if other.data_seed == k.data_seed) == i
            label = ("one seed (paired)" if len(draws) == 1 else f"data seed {k.data_seed}, each seed (paired)")
            ax.plot(x, [value(part.runs[arm][k].metrics, key) for arm in arms], color=colour, lw=0.8, marker="o",
                    label=label if first else None)
        ax.scatter(x, [table[arm_label(arm)][key][0] for arm in arms], s=300, marker="_", linewidths=2.5,
                   color="C3", zorder=3, label=f"mean of {len(keys)} runs")
        ranked = sorted((table[baseline_label(name)][key][0], name) for name in part.baselines
                        if not np.isnan(table[baseline_label(name)][key][0]))
        if ranked:
            best, name = ranked[0] if BETTER[key] == "lower" else ranked[-1]
            ax.axhline(best, color="C0", ls="--", lw=1, label=f"best baseline ({name})")
        ax.set_xticks(x, arms, rotation=20 if len(arms) > 3 else 0)
        ax.set_xlim(-0.4, len(arms) - 0.6)
        ylabel = f"test {METRIC_LABELS[key]}"
        ax.set(ylabel=f"{row_label}\n\n{ylabel}" if row_label and ax is axes[0] else ylabel,
               title=f"{METRIC_LABELS[key]} ({BETTER[key]} is better)")
        ax.legend(fontsize="small")

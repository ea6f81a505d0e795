"""A sweep folder's runs compared (SWEEP/<dataset>/<arm>/seed<N>/, one run each; with several data draws
<arm>/data<D>_seed<N>/; with several encoders SWEEP/<dataset>/<encoder>/<arm>/...): every arm against
the frozen arm of the same encoder, run by run on the same test molecules, with the baselines of the
same roles beside them. compare_arms gives one encoder's Comparison; sweep_report.py writes it."""
import csv
import dataclasses
from pathlib import Path

import numpy as np

from encoders import EncoderId
from evaluate import read_test_scores
from runs import FINISHED, REFERENCE_ARM, run_folder, run_key
from settings import DataSpec, ModelSpec, TrainConfig
from stats import by_draw, delong_test, improvement_interval, spreads
from train import stopping_report
from utils import InputError, read_json

COMPARED = ("auroc", "aupr", "fpr95", "auroc_size_matched")  # test metrics, with a paired Improvement
COLUMNS = (*COMPARED, "val_auroc")
UPDATES_RATIO = 1.5  # arms whose median head updates differ more than this compare training recipes too


@dataclasses.dataclass(frozen=True)
class ArmRun:
    """One finished run of a sweep."""
    metrics: dict  # its test_metrics.json
    config: dict  # its config.json
    seconds_per_epoch: float  # NaN when its history.csv is missing
    stopping: dict  # how it ended (train.stopping_report): steps, epochs run, best epoch, what ended it


def value(metrics, key):
    """A metric of a run as a float (NaN where the run has none)."""
    found = metrics.get(key)
    return np.nan if found is None else float(found)


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def sweep_arms(root):
    """The arm folders of a sweep (those holding run folders): frozen first, then by name."""
    arms = sorted(p.name for p in Path(root).iterdir() if p.is_dir() and any(run_key(c) for c in p.iterdir()))
    return sorted(arms, key=lambda arm: (arm != REFERENCE_ARM, arm))


def _history(run):
    """A run's history.csv rows with epoch, steps and seconds as numbers; [] when it has none."""
    try:
        with open(run / "history.csv", newline="") as f:
            return [{"epoch": int(row["epoch"]), "steps": int(row["steps"]), "seconds": float(row["seconds"])}
                    for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []


def _stopping(metrics, config, history):
    """How a run ended: its test_metrics.json says (runs since stop reasons were kept), else its history and
    flags tell (train.stopping_report); {} when it has neither."""
    if "stopped_by" in metrics:
        return {k: metrics[k] for k in ("optimizer_steps", "epochs_run", "epoch_budget", "stopped_by",
                                        "convergence_warning") if k in metrics} | {"best_epoch": metrics["best_epoch"]}
    args = config["args"]
    if not history or "epochs" not in args:
        return {}
    return stopping_report(history, metrics["best_epoch"], args["epochs"], args.get("patience", TrainConfig.patience))


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
            history = _history(run)
            seconds = float(np.mean([row["seconds"] for row in history])) if history else float("nan")
            runs[arm][run_key(run)] = ArmRun(metrics, config, seconds, _stopping(metrics, config, history))
    keys = {arm: sorted(r, key=key_order) for arm, r in runs.items()}
    if REFERENCE_ARM not in runs or any(k != keys[REFERENCE_ARM] for k in keys.values()):
        found = {arm: [key.folder for key in k] for arm, k in keys.items()}
        raise InputError(f"{root}: need frozen/seed* and every other arm's runs for the same seeds and data seeds (a "
                         f"frozen-only encoder has the frozen arm alone), found {found}")
    weights = {run.config["encoder_weights"] for arm in runs.values() for run in arm.values()}
    if len(weights) != 1:
        raise InputError(f"{root}: runs used different encoder weights {sorted(weights)}; compare like with like")
    return runs


def key_order(key):
    """Runs in order: data seed (one draw first), then training seed."""
    return -1 if key.data_seed is None else key.data_seed, key.seed


def arm_test_scores(root, arm, key, smiles=None):
    """(SMILES as written, is_ood, energies) of a sweep run's test_scores.csv; an InputError when `smiles`
    (the frozen run's of the same key) are not its test molecules: arms are compared on the same ones."""
    found, is_ood, energy = read_test_scores(run_folder(root, arm, key))
    if smiles is not None and found != smiles:
        raise InputError(f"{run_folder(root, arm, key)}: other test molecules than the frozen run of the same "
                         f"{key.label}; the arms must share --data_seed and sizes")
    return found, is_ood, energy


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


def arm_label(arm):
    return f"Energy-DPO ({arm})"


def baseline_label(name):
    return f"baseline: {name}"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One encoder's arms compared run by run: what its summary files and its plot row show."""
    folder: Path
    runs: dict  # {arm: {RunKey: ArmRun}}, the frozen arm first
    keys: list  # the RunKeys every arm has, in key_order
    draw_of: dict  # {RunKey: its data seed} (the run's own, also in a sweep over one draw)
    identity: EncoderId
    args: dict  # the frozen arm's first run's flags: the sweep's dataset, sizes and protocol
    methods: dict  # {label: {RunKey: metrics}}: each arm, then each baseline
    baselines: dict  # {baseline: {RunKey: metrics}}
    table: dict  # {label: {metric: (mean, std)}}, the Improvement rows ("Improvement (<arm>)") included
    diffs: dict  # {arm: {metric: paired differences to frozen, per run}}
    intervals: dict  # {arm: the AUROC Improvement's t-interval (stats.improvement_interval) or None}
    tests: dict  # {arm: [DeLong's test per paired run]}
    spread: dict  # {label: {metric: (over draws, over seeds)}}; {} for one draw
    per_draw: dict  # {label: {draw: mean AUROC}}, Improvement rows included; {} for one draw

    @property
    def arms(self):
        return list(self.runs)

    @property
    def draws(self):
        return sorted(set(self.draw_of.values()))

    @property
    def seeds(self):
        return sorted({key.seed for key in self.keys})

    @property
    def several_draws(self):
        return len(self.draws) > 1

    @property
    def ood_val_split(self):
        return self.args.get("ood_val_split", DataSpec.ood_val_split)

    def arm_info(self):
        """{arm: its fine-tuning flags, trainable encoder parameters, mean seconds per epoch, and how its runs
        ended: median optimizer steps and best epoch, how many stopped by patience, how many were still
        improving when their budget ran out}."""
        first, info = self.keys[0], {}
        for arm, runs in self.runs.items():
            ended = [runs[k].stopping for k in self.keys]
            median = lambda field: float(np.median([e[field] for e in ended])) if all(ended) else None  # noqa: E731
            info[arm] = {"flags": arm_flags(runs[first].config["args"]),
                         "encoder_trainable_params": runs[first].config["encoder_trainable_params"],
                         "seconds_per_epoch": mean_std([runs[k].seconds_per_epoch for k in self.keys])[0],
                         "median_optimizer_steps": median("optimizer_steps"), "median_best_epoch": median("best_epoch"),
                         "stopped_by_patience": sum(e.get("stopped_by") == "patience" for e in ended),
                         "convergence_warnings": sum("convergence_warning" in e for e in ended), "runs": len(ended)}
        return info

    def updates_ratio(self):
        """(largest / smallest median head updates over the arms, the arm with most, the arm with fewest), or
        None when a run does not say."""
        steps = {arm: info["median_optimizer_steps"] for arm, info in self.arm_info().items()}
        if None in steps.values() or not all(steps.values()):
            return None
        most, fewest = max(steps, key=steps.get), min(steps, key=steps.get)
        return steps[most] / steps[fewest], most, fewest

    def per_run(self):
        """One row per run and method (arms and baselines): its metrics, interval, best epoch and DeLong p."""
        arm_of = {arm_label(arm): arm for arm in self.runs}
        p_of = {(arm, test["data_seed"], test["seed"]): test["p"] for arm, tests in self.tests.items() for test in tests}
        ended = lambda name, k: self.runs[arm_of[name]][k].stopping if name in arm_of else {}  # noqa: E731
        return [{"data_seed": self.draw_of[k], "seed": k.seed, "method": name,
                 **{m: value(rows[k], m) for m in COLUMNS}, "auroc_ci95": rows[k].get("auroc_ci95"),
                 "best_epoch": rows[k].get("best_epoch", ""),
                 "optimizer_steps": ended(name, k).get("optimizer_steps", ""),
                 "stopped_by": ended(name, k).get("stopped_by", ""),
                 "convergence_warning": ended(name, k).get("convergence_warning", ""),
                 "delong_p_vs_frozen": p_of.get((arm_of.get(name), self.draw_of[k], k.seed))}
                for k in self.keys for name, rows in self.methods.items()]


def compare_arms(root):
    """The Comparison of one encoder's arms (its runs under `root`)."""
    runs = collect_arm_runs(root)
    arms = list(runs)
    keys = sorted(runs[REFERENCE_ARM], key=key_order)
    reference = runs[REFERENCE_ARM]
    draw_of = {key: reference[key].config["args"]["data_seed"] for key in keys}
    run_draws = [draw_of[k] for k in keys]
    methods = {arm_label(arm): {k: runs[arm][k].metrics for k in keys} for arm in arms}
    baselines = sweep_baselines(root, keys)
    methods.update({baseline_label(name): per_key for name, per_key in baselines.items()})
    table = {name: {m: mean_std([value(per_key[k], m) for k in keys]) for m in COLUMNS}
             for name, per_key in methods.items()}
    diffs = {arm: {m: [value(runs[arm][k].metrics, m) - value(reference[k].metrics, m) for k in keys]
                   for m in COMPARED} for arm in arms[1:]}
    table |= {f"Improvement ({arm})": {m: mean_std(d) for m, d in per_metric.items()} for arm, per_metric in diffs.items()}
    several = len(set(run_draws)) > 1
    spread = {name: {m: spreads([value(per_key[k], m) for k in keys], run_draws) for m in COMPARED}
              for name, per_key in methods.items()} if several else {}
    # Each draw's mean AUROC (over seeds): whether a ranking or an Improvement's sign holds on every draw
    aurocs = {name: [value(per_key[k], "auroc") for k in keys] for name, per_key in methods.items()}
    aurocs |= {f"Improvement ({arm})": d["auroc"] for arm, d in diffs.items()}
    per_draw = {name: {str(draw): float(np.mean(v)) for draw, v in sorted(by_draw(values, run_draws).items())}
                for name, values in aurocs.items()} if several else {}
    return Comparison(
        folder=Path(root), runs=runs, keys=keys, draw_of=draw_of,
        identity=EncoderId.parse(reference[keys[0]].config["encoder_weights"]),
        args=reference[keys[0]].config["args"], methods=methods, baselines=baselines, table=table, diffs=diffs,
        intervals={arm: improvement_interval(per_metric["auroc"], run_draws) for arm, per_metric in diffs.items()},
        tests={arm: [dict(zip(("auroc_difference", "z", "p"), _delong(root, arm, k)), data_seed=draw_of[k],
                          seed=k.seed) for k in keys] for arm in arms[1:]},
        spread=spread, per_draw=per_draw)


def _delong(root, arm, key):
    """DeLong's test of an arm's run against the frozen run with the same key, on their shared test molecules."""
    smiles, is_ood, frozen_energy = arm_test_scores(root, REFERENCE_ARM, key)
    _, _, energy = arm_test_scores(root, arm, key, smiles)
    ood = np.asarray(is_ood) == 1
    energy, frozen_energy = np.asarray(energy), np.asarray(frozen_energy)
    return delong_test(energy[~ood], energy[ood], frozen_energy[~ood], frozen_energy[ood])


def arm_flags(args):
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

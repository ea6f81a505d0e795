"""The modes as ordered steps: train, eval, featurize, compare, analyze (predict has predict.py).

Each takes typed settings (settings.py) and nothing from the command line, so it can be called
from Python as well as from main.py."""
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

import analyze
import distributed
from baselines import baseline_metrics, baseline_scores, descriptor
from batching import encoded, energies
from data import (CALIBRATION, ROLES, SPLITS, benchmark_name, build_good_split, good_report, good_spec, item_field,
                  load_benchmark, load_test_roles, log_good_report)
from encoders import RANDOM_INIT_LABEL, EncoderId, build_encoder, encoder_info
from encoders.base import prepare_rows
from evaluate import (finite_scores, id_threshold, interval_text, plot_training_curves,
                      results_table, write_test_results)
from features import attach_inputs, frozen_features, model_inputs
from model import EnergyDPOModel, load_checkpoint, load_model, save_checkpoint
from molecules import canonical
from runs import (EVAL_FOLDER, EVAL_LOG, FINISHED, REFERENCE_ARM, check_resumable, check_run_dir, clear_run_dir,
                  remove_stale_temporaries, run_config, run_folder, run_state, trained_molecules, trained_roles,
                  write_roles)
from scoring import encoder_options, from_run, load_job_run, run_molecules
from settings import DataSpec, ModelSpec
from sweep import arm_test_scores, collect_arm_runs, key_order
from sweep_report import write_comparison
from train import EnergyDPOTrainer, learning_warning, stopping_line
from tables import read_table
from utils import (InputError, atomic_path, atomic_write_json, attach_log_file, file_sha256, full_disk_is_one_line,
                   write_csv)

log = logging.getLogger("energy_dpo.pipeline")


def _or_dash(value):
    return "–" if value is None else f"{value:.4f}"


def result_line(dataset, metrics):
    """The last line of a run's log: its test metrics, with what to compare them to and how training ended."""
    identity = EncoderId.parse(metrics["encoder_weights"])
    ended = (f" of {metrics['epochs_run']} run ({metrics['optimizer_steps']} optimizer steps, stopped by "
             f"{metrics['stopped_by']})" if "stopped_by" in metrics else "")
    return (f"{dataset} test ({identity.label}): AUROC {metrics['auroc']:.4f} "
            f"(95% CI {interval_text(metrics)})  "
            f"AUPR {metrics['aupr']:.4f}  AUPR-In {metrics['aupr_in']:.4f}  FPR95 {metrics['fpr95']:.4f}  "
            f"size-matched AUROC {_or_dash(metrics.get('auroc_size_matched'))}  (ID {metrics['n_id']}, "
            f"OOD {metrics['n_ood']}; model: best epoch {metrics['best_epoch']}{ended}, val AUROC "
            f"{metrics['val_auroc']:.4f})")


def heavy_atom_counts(roles):
    return {role: descriptor(mols, "heavy_atoms") for role, mols in roles.items()}


def run_baselines(out_dir, frozen, roles, prepared, *, labels_from, seed, molecules, batch_size, device):
    """Every baseline on `roles` (a run's train / val roles and the test roles scored), written to
    out_dir/baselines.json; returns (metrics per baseline, skipped ones with the reason, seconds).
    Feature baselines use the `frozen` encoder's features, also for a fine-tuned run. `labels_from`:
    the DrugOOD file whose train split gives the ID training molecules' class labels."""
    started = time.monotonic()
    inputs = model_inputs(frozen, roles, prepared, molecules.cache_dir, batch_size, device, molecules.force)
    features = {role: inputs[role].features.numpy() for role in roles}
    labels = (item_field(labels_from, "train", roles["id_train"], "cls_label") if Path(labels_from).is_file()
              else [None] * len(roles["id_train"]))
    scores, skipped = baseline_scores(roles, features, labels, seed)
    sizes = heavy_atom_counts({r: roles[r] for r in ("id_test", "ood_test")})
    metrics = baseline_metrics(scores, sizes["id_test"], sizes["ood_test"])
    seconds = time.monotonic() - started
    atomic_write_json(out_dir / "baselines.json", {
        "encoder_weights": frozen.weights_id, "random_init_encoder": frozen.is_random_init,
        "roles": "the same ID/OOD test molecules as test_metrics.json; trained on the run's own ID/OOD train roles",
        "baselines": metrics, "skipped": skipped, "seconds": round(seconds, 2)})
    return metrics, skipped, seconds


def log_results_table(metrics, baselines, skipped, identity):
    fraction = metrics.get("size_matched_pair_fraction") or 0.0
    log.info("Energy-DPO beside baselines on the same test molecules (%s; size-matched: pairs of equal heavy-atom "
             "count, %.0f%% of pairs):\n%s", identity.label, 100 * fraction,
             "\n".join(results_table({"Energy-DPO": metrics, **baselines}, skipped)))


# ----------------------------------------------------------------------------- train

def run_train(job):
    """Train a detector into job.run.path: roles, caches, training with validation model selection,
    then the test split scored with the best checkpoint, baselines beside it, and the plots."""
    started = time.monotonic()
    team = distributed.current()
    run_dir = job.run.path
    resume, overwrite = job.run.resume, job.run.overwrite
    if job.run.auto_resume:
        state = run_state(run_dir)
        if state == "finished":
            if team.leader:
                print(f"{run_dir}: finished ({FINISHED} exists); nothing to do")
            return
        resume, overwrite = state == "interrupted", state == "started"
    check_run_dir(run_dir, overwrite, resume)
    encoder = build_encoder(job.model, **job.encoder.options)
    flags = job.flags | {"resume": resume, "overwrite": overwrite}  # as --auto_resume resolved them
    config = run_config(flags, encoder, torch.get_num_threads()) | {"data_file_sha256": file_sha256(job.data.data_file)}
    log.info("configuration: %s", json.dumps(config, indent=1))
    if job.model.finetune_encoder:
        trainable, total = config["encoder_trainable_params"], config["encoder_total_params"]
        log.info("fine-tuning %s of %s %s parameters (%.2f%%): strategy %s, frozen layers %s",
                 f"{trainable:,}", f"{total:,}", encoder.info.label, 100 * trainable / total,
                 job.model.finetune_strategy,
                 job.model.freeze_layers)
    if encoder.is_random_init:
        log.warning("%s: numbers from this run are not Uni-Mol results", RANDOM_INIT_LABEL)
    if resume:
        check_resumable(run_dir, config, job.flag_defaults, job.resume_ignores)
    team.barrier()  # every rank has looked at the run folder before the leader changes it
    roles, report = load_benchmark(job.data.data_file, job.data.sizes, job.data.data_seed, job.molecules,
                                   job.data.ood_val_split, job.data.good, job.data.calibration_size)
    roles, prepared = attach_inputs(encoder, roles, report, job.molecules, report["data_file"])
    if job.data.good:  # what the run's DrugOOD file was built from, and how
        config["good"] = report["good"]
    if team.leader:  # every input has checked out: only now may an earlier run in this folder go
        if overwrite:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        attach_log_file(run_dir / "training.log")
        if not resume:
            atomic_write_json(run_dir / "config.json", config)
        atomic_write_json(run_dir / "data_report.json", report)
        write_roles(run_dir, roles)
    log.info("roles: %s; %d items skipped (listed in data_report.json)",
             ", ".join(f"{r} {len(m)}" for r, m in roles.items()), len(report["skipped"]))
    inputs = model_inputs(encoder, {r: roles[r] for r in ROLES}, prepared, job.molecules.cache_dir,
                          job.encoder.encode_batch_size, job.train.device, job.molecules.force)
    spec = dataclasses.replace(job.model, encoder_weights=encoder.weights_id, in_dim=encoder.width)
    net = EnergyDPOModel(spec, encoder if spec.finetune_encoder else None, seed=job.train.seed)
    trainer = EnergyDPOTrainer(net, job.train, run_dir, {"config": config})
    if resume:
        trainer.resume(run_dir / "last.pt")
    history = trainer.fit(inputs)
    stopping = trainer.stopping()
    distributed.stop()  # the leader finishes the run alone
    if not team.leader:
        return
    log.info("%s", stopping_line(stopping))
    title = f"{job.data.dataset}\n{encoder.identity.label}"
    plot_training_curves(run_dir / "training_curves.png", history, trainer.best_epoch, title)
    labels = {"dataset": job.data.dataset, "title": title, "ood_val_split": job.data.ood_val_split,
              "stopping": {k: v for k, v in stopping.items() if k != "best_epoch"}}
    if "convergence_warning" in stopping:
        log.warning("%s", stopping["convergence_warning"])
    stalled = learning_warning(history, job.train.batch_size)
    if stalled:
        log.warning("%s", stalled)
        labels["training_warning"] = stalled
    baselines, skipped, baseline_s = run_baselines(
        run_dir, encoder.frozen_twin(), {r: roles[r] for r in ROLES}, prepared, labels_from=report["data_file"],
        seed=job.train.seed, molecules=job.molecules, batch_size=job.encoder.encode_batch_size, device=job.train.device)
    if CALIBRATION in roles:  # scored once, by the best checkpoint: its energies calibrate predict's p-values
        inputs |= model_inputs(encoder, {CALIBRATION: roles[CALIBRATION]}, prepared, job.molecules.cache_dir,
                               job.encoder.encode_batch_size, job.train.device)
    metrics = finish_run(run_dir, net, inputs, roles, job.train.eval_batch_size, job.train.device, labels)
    log_results_table(metrics, baselines, skipped, encoder.identity)
    log.info("baselines took %.1f s of this run's %.1f s", baseline_s, time.monotonic() - started)
    if metrics.get("validation_warning"):
        log.warning("%s", metrics["validation_warning"])
    log.info("%s", result_line(job.data.dataset, metrics))  # the last line of training.log


def finish_run(run_dir, net, inputs, roles, batch_size, device, labels):
    """Score the test roles with the best checkpoint, store the predict threshold and the calibration
    energies in it, and write the test results (test_metrics.json last: it marks the run finished).

    The threshold comes from validation ID energies, never from the test split; predict's p-values from
    the calibration molecules (CALIBRATION), which model selection never saw; a run without them (its file
    had no ID molecule to spare) calibrates on the validation ID, and says so."""
    best = run_dir / "best_model.pt"
    state = load_checkpoint(best)
    net.load_checkpoint_state(state["model"], best)
    net.to(device)
    calibration_role = CALIBRATION if CALIBRATION in inputs else "id_val"
    scored = finite_scores({role: energies(net, inputs[role], batch_size, device).numpy()
                            for role in dict.fromkeys(("id_val", "id_test", "ood_test", calibration_role))},
                           best, "this run's molecules")
    threshold, calibration = id_threshold(scored["id_val"]), scored[calibration_role]
    scores = {role: scored[role] for role in ("id_test", "ood_test")}
    # what predict decides with (the threshold; the energies its p-values are calibrated on, and whose)
    # and the training warning that eval's results must repeat
    save_checkpoint(best, state | {"threshold_95_id_val": threshold, "calibration_role": calibration_role,
                                   "calibration_energies": sorted(calibration.tolist()),
                                   "training_warning": labels.get("training_warning"), "stopping": labels["stopping"]})
    identity = EncoderId.parse(net.spec.encoder_weights)
    extra = {"best_epoch": state["epoch"], "val_auroc": state["val_auroc"], "threshold_95_id_val": threshold,
             "calibration": {"role": calibration_role, "molecules": len(calibration)},
             "encoder_weights": identity.text, "random_init_encoder": identity.is_random_init,
             **{k: v for k, v in labels.items() if k != "stopping"}, **labels["stopping"]}
    test_roles = {r: roles[r] for r in scores}
    return write_test_results(run_dir, test_roles, scores, extra, heavy_atom_counts(test_roles))


# ----------------------------------------------------------------------------- eval

def run_data_file(run):
    """The DrugOOD file a run read: its --data_file, or the GOOD build it made from that raw file."""
    return run.state.get("config", {}).get("good", {}).get("built_file", run.stored["data_file"])


def training_warning(run):
    """The run's training warning (its checkpoint's; for runs that finished before it was kept there,
    its test_metrics.json's), or None."""
    if "training_warning" in run.state:
        return run.state["training_warning"]
    try:
        return json.loads((run.folder / FINISHED).read_text()).get("training_warning")
    except (OSError, ValueError, AttributeError):
        return None


def run_eval(job, other=None):
    """Re-score a finished run's own test split (same file, checked; same roles), or with `other`
    (an OtherBenchmark) another benchmark's test molecules into RUN/eval/<name>/, with the
    baselines of the run's own training roles beside them."""
    run = load_job_run(job)
    stored = run.stored
    if other is not None:  # another benchmark: results under RUN/eval/<name>/, the run's own untouched
        out_dir = run.folder / EVAL_FOLDER / other.dataset
        dataset = other.dataset
        if (out_dir / FINISHED).exists() and not job.overwrite:
            raise InputError(f"{out_dir}: holds an earlier evaluation; pass --overwrite to replace it")
        seen = trained_molecules(run.folder)
        roles, report = load_test_roles(other.data_file, from_run(other.test_size, stored, "test_size"),
                                        from_run(other.data_seed, stored, "data_seed"), seen, other.good,
                                        run.molecules)
        roles, prepared = attach_inputs(run.encoder, roles, report, run.molecules, other.data_file)
        out_dir.mkdir(parents=True, exist_ok=True)
        attach_log_file(out_dir / EVAL_LOG)
        log.info("%s: removed %s molecules that %s trained or validated on", other.data_file,
                 report["removed_seen_in_run"], run.folder)
        atomic_write_json(out_dir / "data_report.json", report)
        title = f"{dataset} (detector trained on {benchmark_name(stored)})\n{run.identity.label}"
    else:  # the run's own test split, as it was: same file (checked), same roles
        out_dir, dataset = run.folder, benchmark_name(stored)
        recorded = run.state.get("config", {}).get("data_file_sha256")
        if recorded and Path(stored["data_file"]).is_file() and file_sha256(stored["data_file"]) != recorded:
            raise InputError(f"{stored['data_file']}: changed since the run was trained (SHA-256 differs from "
                             f"{recorded[:12]}…); restore it, or score it as another benchmark with --data_file")
        roles, report = load_benchmark(stored["data_file"], (stored["train_size"], stored["val_size"],
                                       stored["test_size"]), stored["data_seed"], run.molecules,
                                       stored.get("ood_val_split", DataSpec.ood_val_split), good_spec(stored))
        roles, prepared = attach_inputs(run.encoder, {r: roles[r] for r in ("id_test", "ood_test")}, report,
                                        run.molecules, stored["data_file"])
        attach_log_file(run.folder / EVAL_LOG)
        title = f"{dataset}\n{run.identity.label}"
    scores = finite_scores(run.score(roles, prepared), run.checkpoint, dataset)
    warning = training_warning(run)
    if warning:
        log.warning("%s", warning)
    extra = {"best_epoch": run.state["epoch"], "val_auroc": run.state["val_auroc"], **run.state.get("stopping", {}),
             "threshold_95_id_val": run.threshold, "encoder_weights": run.identity.text,
             **({"training_warning": warning} if warning else {}),
             "random_init_encoder": run.identity.is_random_init, "dataset": dataset,
             "trained_on": benchmark_name(stored),
             "title": title, "ood_val_split": stored.get("ood_val_split", DataSpec.ood_val_split)}
    if other is not None:  # the baselines of the run's own training data, on the other benchmark's molecules
        own_roles = trained_roles(run.folder)
        own, _ = run.encoder.prepare([s for mols in own_roles.values() for s in mols], run.molecules)
        own_roles = {r: [s for s in mols if s in own] for r, mols in own_roles.items()}
        baselines, skipped, _ = run_baselines(
            out_dir, run.encoder.frozen_twin(), own_roles | roles, prepared | own, labels_from=run_data_file(run),
            seed=stored["seed"], molecules=run.molecules, batch_size=run.scoring.encode_batch_size, device=job.device)
    metrics = write_test_results(out_dir, roles, scores, extra, heavy_atom_counts(roles))
    if other is not None:
        log_results_table(metrics, baselines, skipped, run.identity)
    log.info("%s", result_line(dataset, metrics))
    print(f"wrote {out_dir / FINISHED}")


# ----------------------------------------------------------------------------- prepare

def run_prepare(job):
    """GOOD's split of a raw file written as a DrugOOD JSON (whole or not at all), to inspect, keep, or
    run every mode on as a plain DrugOOD file."""
    doc = build_good_split(job.raw_file, job.good)
    atomic_write_json(job.output, doc, indent=None)
    log_good_report(good_report(doc, job.raw_file))
    print(f"wrote {job.output}: " + ", ".join(f"{split} {len(doc['split'][split])}" for split in SPLITS))


# ----------------------------------------------------------------------------- featurize

def run_featurize(job):
    """Frozen features of job's molecules into job.output (.npy), with .rows.csv (which input row
    each .npy row is) and .failed.csv (the rows that could not be featurised, and why)."""
    encoder = build_encoder(job.model, **job.encoder.options)
    smiles = read_table(job.input, job.smiles_column)[2] if job.input else job.smiles
    written, prepared, failed = prepare_rows(encoder, smiles, job.molecules)
    if failed:
        log.warning("%d of %d molecules could not be featurised (listed in the .failed.csv)", len(failed), len(smiles))
    feats = frozen_features(encoder, list(written.values()), prepared, job.molecules.cache_dir,
                            job.encoder.encode_batch_size, job.device, job.molecules.force).astype(np.float32)
    if not distributed.current().leader:
        return
    out = Path(job.output)
    # all three written before any replaces its earlier version: they describe each other
    rows_path, failed_path = out.with_suffix(".rows.csv"), out.with_suffix(".failed.csv")
    with atomic_path(out) as npy, atomic_path(rows_path) as rows, atomic_path(failed_path) as failures:
        with full_disk_is_one_line(out):  # each write names its own file
            np.save(npy, feats)
        with full_disk_is_one_line(rows_path):
            write_csv(rows, [(row, i, s, canonical(s), encoder.weights_id)
                             for row, (i, s) in enumerate(written.items())],
                      ["npy_row", "input_row", "smiles", "canonical_smiles", "encoder_weights"])
        with full_disk_is_one_line(failed_path):
            write_csv(failures, [(i, smiles[i], r, encoder.weights_id) for i, r in sorted(failed.items())],
                      ["input_row", "smiles", "reason", "encoder_weights"])
    print(f"wrote {out} ({feats.shape[0]} x {feats.shape[1]}, encoder {encoder.identity.label}); "
          f"{len(failed)} failed rows in {out.with_suffix('.failed.csv')}")


# ----------------------------------------------------------------------------- compare, analyze

def run_compare(root):
    _, text = write_comparison(root)
    print(text)


def run_analyze(job):
    """SWEEP/<dataset>/analysis/: per-molecule rank changes (with the molecules that moved most),
    feature drift (linear CKA and PCA against the frozen features) and weight change per layer.
    job.path is the sweep folder; the frozen arm's first run gives the sweep's settings."""
    root = Path(job.path)
    runs = collect_arm_runs(root)
    # one draw of the molecules (the first): ranks and features compare the same test molecules
    keys = sorted(runs[REFERENCE_ARM], key=key_order)
    keys = [k for k in keys if k.data_seed == keys[0].data_seed]
    arms, seeds = list(runs), [k.seed for k in keys]
    reference = runs[REFERENCE_ARM][keys[0]].config
    tuned = [arm for arm in arms[1:] if runs[arm][keys[0]].config["args"].get("finetune_encoder")]
    if not tuned:
        raise InputError(f"{root}: no fine-tuned arm to analyse (arms: {', '.join(arms)})")
    smiles, is_ood, _ = arm_test_scores(root, REFERENCE_ARM, keys[0])
    ranks = {arm: np.mean([analyze.energy_ranks(arm_test_scores(root, arm, key, smiles)[2]) for key in keys], axis=0)
             for arm in arms}
    out = root / "analysis"
    out.mkdir(exist_ok=True)
    attach_log_file(out / "analyze.log")
    if keys[0].data_seed is not None:
        log.info("analyzing the runs of data seed %d (each draw has its own test molecules)", keys[0].data_seed)
    stored = reference["args"]
    identity = EncoderId.parse(reference["encoder_weights"])
    title = f"{stored['dataset']} · {identity.label}"
    changes = analyze.rank_changes(is_ood, ranks[REFERENCE_ARM], {a: ranks[a] for a in tuned})
    analyze.write_molecule_changes(out / "molecule_changes.csv", smiles, is_ood, ranks[REFERENCE_ARM],
                                   {a: ranks[a] for a in tuned}, changes, identity.text)
    mean_improvement = np.mean([changes[a]["improvement"] for a in tuned], axis=0)
    for name, worst in (("most_improved", False), ("most_worsened", True)):
        analyze.molecule_grid(out / f"{name}.png", smiles, is_ood, mean_improvement,
                              f"{title}\n{'away from' if worst else 'toward'} the correct side after fine-tuning "
                              f"(rank fraction, mean over {', '.join(tuned)} and {len(seeds)} seeds)", worst=worst)
    info = encoder_info(identity.kind)
    options = encoder_options(info, stored, root, job.molecules, job.scoring, job.encoder_flags)
    molecules = run_molecules(job.molecules, stored)
    frozen = build_encoder(ModelSpec(foundation_model=identity.kind, amp=stored.get("amp") == "bf16"), **options)
    if frozen.identity != identity:
        fix = (f"{options[info.weights.flag]}: pass --{info.weights.flag} with them" if info.weights
               else f"install the versions of {', '.join(info.packages)} the sweep ran with (its config.json)")
        raise InputError(f"{root}: the sweep ran {identity.text}, the encoder loaded now is {frozen.weights_id}; {fix}")
    inputs, failures = frozen.prepare(smiles, molecules)
    if failures:
        raise InputError(f"{len(failures)} test molecules have no {info.label} {info.inputs} now (e.g. "
                         f"{next(iter(failures))}); check --cache_dir and the molecule limits")
    encode_batch = from_run(job.scoring.encode_batch_size, stored, "encode_batch_size")
    eval_batch = from_run(job.scoring.eval_batch_size, stored, "eval_batch_size")
    frozen_feats = frozen_features(frozen, smiles, inputs, molecules.cache_dir, encode_batch, job.device)
    base, cka, weight_change, first_features = None, {}, {}, {}
    for arm in tuned:
        cka[arm], weight_change[arm] = {}, {}
        for seed, key in zip(seeds, keys):
            net, encoder, state = load_model(run_folder(root, arm, key) / "best_model.pt", options)
            base = base or encoder.base_weights()  # the pretrained weights every fine-tuned run started from
            tuned_inputs = model_inputs(encoder, {"test": smiles}, inputs, molecules.cache_dir, encode_batch,
                                        job.device)["test"]
            feats = encoded(encoder.to(job.device), tuned_inputs, eval_batch, job.device).numpy()
            cka[arm][str(seed)] = analyze.linear_cka(frozen_feats, feats)
            weight_change[arm][str(seed)] = analyze.relative_weight_change(
                base, {k: v.numpy() for k, v in state["model"]["encoder_trainable"].items()}, encoder.layer_of,
                net.spec.lora_alpha / net.spec.lora_rank)
            first_features.setdefault(arm, feats)
    analyze.write_drift(out, cka, weight_change, frozen_feats, first_features, is_ood, title)
    log.info("wrote %s: molecule_changes.csv, most_improved.png, most_worsened.png, feature_drift.json/.png", out)
    for arm in tuned:
        log.info("%s: linear CKA to frozen %s; mean rank move toward the correct side %+.4f", arm,
                 ", ".join(f"seed {s} {v:.4f}" for s, v in cka[arm].items()), float(changes[arm]["improvement"].mean()))

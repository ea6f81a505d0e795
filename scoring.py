"""A finished run rebuilt from its checkpoint alone, to score molecules with: eval, predict and analyze
use it, and so can Python.

    from scoring import load_run
    run = load_run("outputs/demo_ec50_scaffold/minimol_dpo_seed42")
    for row in run.score_smiles(["CCO", "c1ccccc1O"]):
        print(row.smiles, row.energy, row.is_ood, row.warning or row.error)

score_smiles gives the numbers `--mode predict` writes for the same molecules (its energy column is
rounded to 6 decimals). Settings not given are the run's own (its cache folder, molecule limits,
batch sizes), as on the command line."""
import dataclasses
import functools
import logging
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np

from encoders import DEFAULT_ENCODER, ENCODER_FLAGS, encoder_info, run_options, weights_flag
from encoders.base import prepare_rows
from evaluate import finite_scores
from features import model_inputs
from model import load_checkpoint, load_model
from molecules import canonical, forget_parsed, molecule_warning
from runs import trained_roles
from settings import FINETUNE_EVAL_BATCH_SIZE, FROZEN_EVAL_BATCH_SIZE, EncoderSettings, MoleculeSettings, ScoringSettings
from stats import conformal_p_values
from train import team_energies
from utils import InputError

log = logging.getLogger("energy_dpo.scoring")


def from_run(value, stored, name, default=None):
    """A setting for scoring with a finished run: `value` when the user gave one (not None), else the
    run's recorded flag `name`, else `default` (a flag newer than the run)."""
    return value if value is not None else stored.get(name, default)


def encoder_options(info, stored, who, molecules, scoring, encoder_flags):
    """The build options of a finished run's encoder (`info`): those given (`encoder_flags`), else the run's
    (`stored`); an encoder-specific flag given that it does not take (a build option, a molecule setting, the
    encode batch) is a one-line InputError naming the run (`who`)."""
    given = {flag: value for flag, value in molecules.items() if flag in ENCODER_FLAGS} | \
        {"encode_batch_size": scoring.encode_batch_size} | encoder_flags
    return run_options(info, given, stored, who)


def run_molecules(given, stored):
    """MoleculeSettings for scoring with a run: the fields the user gave (`given`), else the run's."""
    return dataclasses.replace(MoleculeSettings.from_flags(stored), **{"force": False, **given})


class Scored(NamedTuple):
    """One molecule scored by a finished run (a row of `--mode predict`'s output)."""
    smiles: str  # as given
    canonical_smiles: str  # '' when it could not be scored
    energy: Optional[float]  # higher is more out-of-distribution; None when it could not be scored
    p_value: Optional[float]  # conformal: (1 + calibration ID molecules scoring at least as high) / (n + 1)
    is_ood: Optional[bool]  # energy above the run's threshold (the 95th percentile of its validation ID)
    warning: str  # e.g. a salt or mixture, or a dummy atom, scored as one molecule / an unknown atom
    error: str  # why it could not be scored ('' when it was)


@dataclasses.dataclass
class FinishedRun:
    """A finished run rebuilt from its checkpoint, with the settings to score with it."""
    folder: Path
    checkpoint: Path
    net: object  # EnergyDPOModel, holding its encoder
    state: dict  # the checkpoint's payload
    stored: dict  # the run's resolved flags
    options: dict  # its encoder's build options ({flag: value}, e.g. Uni-Mol's base weights: a path or 'random')
    molecules: MoleculeSettings
    scoring: ScoringSettings
    device: str = "cpu"

    @property
    def encoder(self):
        return self.net.encoder

    @property
    def identity(self):
        return self.encoder.identity

    @property
    def threshold(self):
        return self.state["threshold_95_id_val"]

    @property
    def calibration_role(self):
        """The role its p-values are calibrated on: data.CALIBRATION, ID molecules no other role used; id_val for
        a run whose file had none to spare, or that finished before runs drew them (model selection used it)."""
        return self.state.get("calibration_role", "id_val")

    @functools.cached_property
    def calibration(self):
        """The energies its p-values are calibrated on (calibration_role's), kept in its checkpoint; for a run
        that finished before they were kept there, its validation ID scored again from its roles.csv (the
        same molecules, the same model)."""
        for key in ("calibration_energies", "calibration_id_val_energies"):  # the second: runs before id_cal
            if key in self.state:
                return np.asarray(self.state[key], np.float64)
        molecules = trained_roles(self.folder)["id_val"]
        log.info("%s predates kept calibration energies: scoring its %d validation ID molecules (roles.csv) again",
                 self.checkpoint, len(molecules))
        prepared, failures = self.encoder.prepare(molecules, self.molecules)
        if failures:
            raise InputError(f"{self.folder}: {len(failures)} of its validation ID molecules have no inputs now "
                             f"(e.g. {next(iter(failures))}), so its p-values cannot be calibrated; check the "
                             f"molecule limits, or retrain the run")
        energies = self.score({"id_val": molecules}, prepared)
        return finite_scores(energies, self.checkpoint, "its validation ID")["id_val"]

    def score(self, roles, prepared, device=None, cache_prefix=True):
        """{role: energies} on `roles` ({role: SMILES as written}) with the encoder's inputs `prepared`;
        each rank of a torchrun team scores its share."""
        device = device or self.device
        molecules, scoring = self.molecules, self.scoring
        inputs = model_inputs(self.encoder, roles, prepared, molecules.cache_dir, scoring.encode_batch_size, device,
                              molecules.force, cache_prefix)
        return {r: team_energies(self.net, inputs[r], scoring.eval_batch_size, device).numpy() for r in roles}

    def score_smiles(self, smiles, device=None):
        """[Scored] in input order: energy, the is_ood decision at the run's threshold, and a warning
        or the reason it could not be scored, per SMILES as written."""
        written, prepared, failed = prepare_rows(self.encoder, smiles, self.molecules)
        energy = {}
        if written:  # molecules scored once: their frozen prefix is not worth caching
            scores = self.score({"input": list(written.values())}, prepared, device, cache_prefix=False)
            energy = dict(zip(written, finite_scores(scores, self.checkpoint, "the input")["input"].tolist()))
        p_values = dict(zip(energy, conformal_p_values(list(energy.values()), self.calibration).tolist()))
        rows = [Scored(s, canonical(written[i]), energy[i], p_values[i], energy[i] > self.threshold,
                       molecule_warning(written[i]), "") if i in energy else
                Scored(s, "", None, None, None, "", failed[i]) for i, s in enumerate(smiles)]
        forget_parsed()  # a caller streaming millions of molecules calls this per chunk
        return rows


def load_run(path, weights=None, device="cpu", molecules=None, scoring=None, grad_checkpointing=False,
             encoder_flags=None):
    """The finished run at `path` (its folder, or its best_model.pt) rebuilt from its checkpoint
    alone. `weights`: its encoder's weights file where it takes one (Uni-Mol's base weights; default:
    the path the run recorded); `molecules`: the MoleculeSettings fields to change ({field: value},
    e.g. {"cache_dir": ...}); `scoring`: ScoringSettings; `encoder_flags`: the encoder's build options
    as the command line gives them ({flag: value}); everything not given is the run's own."""
    ckpt = Path(path)
    ckpt = ckpt / "best_model.pt" if ckpt.is_dir() else ckpt
    payload = load_checkpoint(ckpt)
    stored = payload.get("config", {}).get("args", {})
    if "threshold_95_id_val" not in payload:
        raise InputError(f"{ckpt}: the run has not finished (no predict threshold yet); finish it with "
                         f"--mode train --resume (same flags) first")
    info = encoder_info(payload["model_spec"].get("foundation_model", DEFAULT_ENCODER))
    molecules, scoring, encoder_flags = dict(molecules or {}), scoring or ScoringSettings(), dict(encoder_flags or {})
    encoder_flags |= {"grad_checkpointing": True} if grad_checkpointing else {}
    if weights is not None:
        encoder_flags[weights_flag(info)] = weights
    options = encoder_options(info, stored, ckpt, molecules, scoring, encoder_flags)
    net, _, state = load_model(ckpt, options, state=payload)
    scoring = ScoringSettings(
        eval_batch_size=from_run(scoring.eval_batch_size, stored, "eval_batch_size",
                                 FINETUNE_EVAL_BATCH_SIZE if net.finetune_encoder else FROZEN_EVAL_BATCH_SIZE),
        encode_batch_size=from_run(scoring.encode_batch_size, stored, "encode_batch_size",
                                   EncoderSettings.encode_batch_size))
    net.to(device)
    return FinishedRun(folder=ckpt.parent, checkpoint=ckpt, net=net, state=state, stored=stored, options=options,
                       molecules=run_molecules(molecules, stored), scoring=scoring, device=device)


def load_job_run(job):
    """The finished run a ScoreJob (eval / predict from the command line) names."""
    return load_run(job.path, device=job.device, molecules=job.molecules, scoring=job.scoring,
                    encoder_flags=job.encoder_flags)

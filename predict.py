"""predict: score new molecules with a finished run, streaming the input in chunks.

The input is read, scored and written `chunk_rows` rows at a time into a hidden partial file
beside the output; a progress file records the complete rows, so that --resume continues after the
last complete chunk, and the finished file is renamed into place: --output only ever holds a
complete result. Under torchrun every rank scores its share of each chunk; rank 0 writes."""
import csv
import dataclasses
import itertools
import logging
import math
import os
from pathlib import Path

import numpy as np

import distributed
from data import CALIBRATION
from stats import fdr_discoveries
from scoring import load_job_run
from tables import iter_table
from utils import InputError, atomic_write_json, file_sha256, full_disk_is_one_line, progress, read_json

log = logging.getLogger("energy_dpo.predict")
PREDICT_COLUMNS = ["canonical_smiles", "energy", "p_value", "is_ood", "decided_by", "warning", "error",
                   "encoder_weights"]
THRESHOLD_RULE = "threshold"  # is_ood: energy above the 95th percentile of the run's validation ID


def input_rows(job):
    """(columns, rows): rows a generator of (fields, SMILES), limited to the job's shard."""
    def rows():
        return (iter_table(job.input, job.smiles_column) if job.input
                else (["smiles"], (([s], s) for s in job.smiles)))
    columns, stream = rows()
    clash = [c for c in columns if c in PREDICT_COLUMNS]
    if clash:
        raise InputError(f"{job.input}: column {clash[0]!r} would be overwritten by the output; rename it")
    if job.shard:
        index, count = job.shard
        total = sum(1 for _ in rows()[1])  # a counting pass: the input is never held in memory
        start, stop = (index - 1) * total // count, index * total // count
        stream = itertools.islice(stream, start, stop)
        log.info("shard %d/%d: input rows %d to %d of %d", index, count, start + 1, stop, total)
    return columns, stream


class PredictOutput:
    """predict's output file, its hidden partial file and its progress file."""

    def __init__(self, path, job):
        self.path, self.job = path, job
        self.partial = path.with_name(f".{path.name}.partial")
        self.progress = path.with_name(f".{path.name}.progress.json")
        self.state = None

    def check(self, resume, overwrite):
        """Rows already done (0 for a fresh start); reads only (every rank of a team calls it)."""
        if not resume:
            if self.progress.exists() and not overwrite:
                raise InputError(f"{self.path}: an interrupted predict left {self.progress.name}; pass --resume to "
                                 f"continue it or --overwrite to start again")
            return 0
        if not self.progress.exists():
            raise InputError(f"{self.path}: no interrupted predict to resume (no {self.progress.name}); "
                             f"run it without --resume")
        state = read_json(self.progress, "start again with --overwrite")
        if not isinstance(state, dict) or state.get("job") != self.job:
            raise InputError(f"{self.progress}: the interrupted predict had other inputs or settings "
                             f"({state.get('job') if isinstance(state, dict) else state}); start again with --overwrite")
        if not self.partial.exists() or self.partial.stat().st_size < state["bytes"]:
            raise InputError(f"{self.partial}: missing or shorter than its progress file says; start again with "
                             f"--overwrite")
        self.state = state
        return state["rows"]

    def start(self, columns, done):
        """Resume after `done` rows, or create the partial file (the leader only)."""
        if done:
            with open(self.partial, "r+b") as f:  # drop a chunk that was being written
                f.truncate(self.state["bytes"])
            log.info("resuming %s after %d complete input rows", self.path, done)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with full_disk_is_one_line(self.path):
            try:
                with open(self.partial, "w", newline="") as f:
                    csv.writer(f, lineterminator="\n").writerow(columns + PREDICT_COLUMNS)
            except BaseException:
                self.partial.unlink(missing_ok=True)
                raise
        self.state = {"job": self.job, "rows": 0, "bytes": self.partial.stat().st_size,
                      "scored": 0, "flagged": 0, "failed": 0, "fragments": 0, "dummies": 0}
        atomic_write_json(self.progress, self.state)

    def append(self, out, counts):
        with full_disk_is_one_line(self.path):  # the partial file keeps its complete chunks: --resume continues
            with open(self.partial, "a", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(out)
                f.flush()
                os.fsync(f.fileno())
        self.state = {**self.state, "rows": self.state["rows"] + len(out), "bytes": self.partial.stat().st_size,
                      **{k: self.state[k] + v for k, v in counts.items()}}
        atomic_write_json(self.progress, self.state)

    def finish(self):
        os.replace(self.partial, self.path)
        self.progress.unlink()
        return self.state

    def decide_by_fdr(self, fdr, rule):
        """Rewrite the (complete) partial file's is_ood and decided_by by Benjamini–Hochberg at `fdr` over
        the p-values of all its scored rows; returns how many it flags. Run again after an interruption,
        it gives the same file (the decisions come from the p-values alone)."""
        with open(self.partial, newline="") as f:
            rows = csv.reader(f)
            header = next(rows)
            at = {name: len(header) - len(PREDICT_COLUMNS) + i for i, name in enumerate(PREDICT_COLUMNS)}
            p_values = np.fromiter((float(r[at["p_value"]]) for r in rows if r[at["p_value"]]), np.float64)
        decisions = fdr_discoveries(p_values, fdr)
        discoveries = iter(decisions.tolist())
        rewritten = self.partial.with_name(f"{self.partial.name}.fdr")
        with full_disk_is_one_line(self.path), open(self.partial, newline="") as src, \
                open(rewritten, "w", newline="") as dst:
            writer = csv.writer(dst, lineterminator="\n")
            for n, row in enumerate(csv.reader(src)):
                if n and row[at["p_value"]]:
                    row[at["is_ood"]], row[at["decided_by"]] = int(next(discoveries)), rule
                writer.writerow(row)
        os.replace(rewritten, self.partial)
        return int(decisions.sum())

    def discard(self):
        self.partial.unlink()
        self.progress.unlink()


def score_chunk(run, chunk, device):
    """Output rows and counts for a chunk of (fields, SMILES) input rows, decided by the run's threshold
    (--fdr decides again once every p-value is known: PredictOutput.decide_by_fdr)."""
    scored = run.score_smiles([s for _, s in chunk], device)
    weights = run.encoder.weights_id
    out = [fields + ([row.canonical_smiles, f"{row.energy:.6f}", f"{row.p_value:.6g}", int(row.is_ood),
                      THRESHOLD_RULE, row.warning, "", weights]
                     if row.error == "" else ["", "", "", "", "", "", row.error, weights])
           for (fields, _), row in zip(chunk, scored)]
    counts = {"scored": sum(row.energy is not None for row in scored), "flagged": sum(bool(row.is_ood) for row in scored),
              "failed": sum(row.error != "" for row in scored),
              "fragments": sum("fragments" in row.warning for row in scored),
              "dummies": sum("dummy atom" in row.warning for row in scored)}
    return out, counts


def fdr_power_warning(fdr, scored, calibrated):
    """Words for a Benjamini-Hochberg decision that the calibration set's size held back, or None: with n
    calibration molecules no p-value is below 1/(n + 1), so among N molecules BH at rate q flags anything
    only once at least N / (q (n + 1)) of them score above every calibration energy."""
    needed = math.ceil(scored / (fdr * (calibrated + 1)) - 1e-9)
    if needed <= 1:
        return None
    alone = math.ceil(scored / fdr - 1e-9) - 1  # the size at which 1/(n + 1) <= fdr / scored
    return (f"--fdr {fdr:g} flagged nothing among {scored} molecules: the run's {calibrated} calibration molecules "
            f"give p-values of 1/{calibrated + 1} = {1 / (calibrated + 1):.2g} at the smallest, above {fdr:g}/{scored} "
            f"= {fdr / scored:.2g}, so Benjamini-Hochberg flags molecules only when at least {needed} score above "
            f"every calibration energy; with {alone} calibration molecules (train with "
            f"--calibration_size {alone}) one alone could be flagged")


def run_predict(score_job, job):
    """Score `job`'s molecules with the finished run `score_job` names, into job.output."""
    run = load_job_run(score_job)
    team = distributed.current()
    calibrated = len(run.calibration)  # on every process: a run without kept energies scores them as a team
    if run.calibration_role != CALIBRATION and team.leader:
        log.warning("%s: its p-values are calibrated on its %d validation ID molecules, on which model selection "
                    "also chose the best epoch (the run has no calibration set of its own: it predates them, was "
                    "trained with --calibration_size 0, or its file had no ID molecule to spare), so they may run "
                    "optimistic; retrain it for a calibration set", run.folder, calibrated)
    columns, rows = input_rows(job)
    source = Path(job.input).resolve() if job.input else None
    recorded = {"input": str(source) if source else job.smiles,
                "shard": f"{job.shard[0]}/{job.shard[1]}" if job.shard else None, "chunk_rows": job.chunk_rows,
                "input_bytes": source.stat().st_size if source else None, "smiles_column": job.smiles_column,
                "input_mtime_ns": source.stat().st_mtime_ns if source else None,
                "max_heavy_atoms": run.molecules.max_heavy_atoms, "conformer_timeout": run.molecules.conformer_timeout,
                "model_sha256": file_sha256(run.checkpoint), "fdr": job.fdr}
    output = PredictOutput(Path(job.output), recorded)
    done = output.check(job.resume, job.overwrite)  # every rank: the same answer, or the same error
    team.barrier()
    if team.leader:
        output.start(columns, done)
    rows = itertools.islice(rows, done, None)
    for number in progress(itertools.count(), desc="predict chunks", unit="chunk"):
        chunk = list(itertools.islice(rows, job.chunk_rows))
        if not chunk:
            break
        out, counts = score_chunk(run, chunk, score_job.device)
        run.molecules = dataclasses.replace(run.molecules, force=False)  # --force_recompute_cache: once
        if team.leader:
            output.append(out, counts)
            if output.state["rows"] >= 10 * job.chunk_rows and number % 10 == 9:
                log.info("predict: %d input rows done", output.state["rows"])
    if not team.leader:
        return
    if not output.state["rows"] and not job.shard:
        output.discard()
        raise InputError(f"{job.input}: no SMILES found")
    if job.fdr:  # Benjamini–Hochberg needs every p-value: it decides once all rows are scored
        rule = f"fdr {job.fdr:g}" + (f" within shard {job.shard[0]}/{job.shard[1]}" if job.shard else "")
        if job.shard:
            log.warning("--fdr with --shard: Benjamini-Hochberg runs over this shard's molecules, so the false-"
                        "discovery rate is controlled within each shard, not over the whole input; for one decision "
                        "over the whole file, run predict on it without --shard")
        output.state["flagged"] = output.decide_by_fdr(job.fdr, rule)
        if not output.state["flagged"]:
            warning = fdr_power_warning(job.fdr, output.state["scored"], len(run.calibration))
            if warning:
                log.warning("%s", warning)
    totals = output.finish()
    if totals["failed"]:
        log.warning("%d of %d molecules could not be featurised (reasons in the error column)", totals["failed"],
                    totals["rows"])
    if totals["fragments"]:
        log.warning("%d inputs have several fragments (salts, mixtures): scored as one molecule, see the warning "
                    "column", totals["fragments"])
    if totals["dummies"]:
        log.warning("%d inputs hold dummy atoms (*): scored as unknown atoms, see the warning column",
                    totals["dummies"])
    rule = (f"by Benjamini-Hochberg at false-discovery rate {job.fdr:g} over their p-values" if job.fdr else
            f"at energy > {run.threshold:.4f}, the 95th percentile of validation ID")
    print(f"wrote {job.output}: {totals['scored']} scored ({totals['flagged']} flagged OOD {rule}), {totals['failed']} "
          f"failed; encoder {run.identity.label}")

"""The run folder: the one list of its files, its state, config.json (with the versions of every
package behind its numbers), resume checks, roles.csv, clearing and stale temporaries. Rebuilding a
finished run to score with it: scoring.py."""
import importlib.metadata
import platform
import re
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Optional

import distributed
from encoders import FOUNDATION_MODELS
from molecules import canonical
from utils import InputError, atomic_write_csv, read_csv_rows, read_json

# Every file a training run writes into its folder. FINISHED marks a finished run: it is written last.
FINISHED = "test_metrics.json"
RUN_FILES = ("config.json", "training.log", "history.csv", "best_model.pt", "last.pt", FINISHED, "test_scores.csv",
             "data_report.json", "roc_curve.png", "energy_histogram.png", "training_curves.png", "roles.csv",
             "baselines.json")
EVAL_LOG = "eval.log"  # added by --mode eval, which rewrites the test results in place
EVAL_FOLDER = "eval"  # RUN/eval/<benchmark>/: the run scored on other benchmarks
TRAINED_ROLES = ("id_train", "id_val", "ood_train", "ood_val")
# A sweep folder SWEEP/<dataset>/ holds run folders <arm>/seed<N>/, or <arm>/data<D>_seed<N>/ when it draws
# the molecules with several data seeds; a sweep over several encoders has them under <encoder>/ (sweep_plan.py
# plans them, sweep.py compares them).
REFERENCE_ARM = "frozen"  # every other arm of a sweep is compared with it, run by run
SEED_PREFIX, DATA_PREFIX = "seed", "data"
# The packages behind every result; an encoder adds its own (EncoderInfo.packages).
PACKAGES = ("torch", "rdkit", "numpy", "scipy", "scikit-learn", "matplotlib", "tqdm", "peft")


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


def package_versions(encoder_info):
    """Python and the versions of the packages behind a result made with the encoder `encoder_info`."""
    names = PACKAGES + tuple(n for n in encoder_info.packages if n not in PACKAGES)
    return {"python": platform.python_version(), **{n: importlib.metadata.version(n) for n in names}}


def run_config(flags, encoder, cpu_threads):
    """What config.json records: every resolved flag, the encoder weights, trainable encoder
    parameters, package versions and the CPU threads (their number moves the last bits of float sums)."""
    return {"args": dict(sorted(flags.items())), "encoder_weights": encoder.weights_id,
            "random_init_encoder": encoder.is_random_init,
            "encoder_trainable_params": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
            "encoder_total_params": encoder.total_params,
            "packages": package_versions(encoder.info), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torchrun_processes": distributed.current().size, "cpu_threads": cpu_threads}


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


class RunKey(NamedTuple):
    """Which run of an arm: its data seed (None in a sweep over one draw of the molecules, whose folders
    are seed<N>) and its training seed."""
    data_seed: Optional[int]
    seed: int

    @property
    def folder(self):
        seed = f"{SEED_PREFIX}{self.seed}"
        return seed if self.data_seed is None else f"{DATA_PREFIX}{self.data_seed}_{seed}"

    @property
    def label(self):
        return f"seed {self.seed}" if self.data_seed is None else f"data seed {self.data_seed}, seed {self.seed}"


def run_key(folder):
    """The RunKey a run folder's name (seed<N> or data<D>_seed<N>) gives, or None for any other name."""
    match = re.fullmatch(rf"(?:{DATA_PREFIX}(\d+)_)?{SEED_PREFIX}(\d+)", Path(folder).name)
    return RunKey(int(match[1]) if match[1] else None, int(match[2])) if match else None


def run_path(root, arm, key):
    """ROOT/<arm>/<the run's folder> as a path string (as given: ./ kept); `key` a RunKey, or a training seed
    alone (a sweep over one draw)."""
    return f"{root}/{arm}/{(key if isinstance(key, RunKey) else RunKey(None, key)).folder}"


def run_folder(root, arm, key):
    return Path(run_path(root, arm, key))


def arm_folder(arm, encoder=None):
    """An arm's folder in SWEEP/<dataset>/: <arm>, or <encoder>/<arm> in a sweep over several encoders."""
    return arm if encoder is None else f"{encoder}/{arm}"


def encoder_folders(root):
    """SWEEP/<dataset>/<encoder>/ folders of a sweep over several encoders ([] for one encoder)."""
    return [Path(root) / name for name in FOUNDATION_MODELS if (Path(root) / name).is_dir()]

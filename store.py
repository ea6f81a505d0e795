"""The sharded on-disk array store behind every cache (conformers, features, prefix states).

A store is a directory with meta.json (what its entries depend on) and immutable shard folders of
.npy files: no pickle, memory-mapped on read. Entries are keyed by a string (the SMILES as
written); each field of an entry is an array whose first axis may differ between entries.

Under torchrun, every process of the team must call cached_entries together, with the same keys,
and the team is passed in explicitly (distributed.current() at the call site): it holds
collectives, and a process that skipped a call would leave the others waiting."""
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path

import numpy as np

from utils import InputError, atomic_write_json, full_disk_is_one_line

log = logging.getLogger("energy_dpo.store")

def _tmp_name():
    # host and pid in the name: a later run can tell a dead writer's leftovers from a live one's
    return f".tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex}"


def _remove_stale_tmp(directory):
    """Delete temporary shard folders whose writer (a process on this host) no longer runs."""
    host = socket.gethostname()
    for tmp in Path(directory).glob(".tmp-*"):
        parts = tmp.name.removeprefix(".tmp-").rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a process that ended", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def open_store(directory, meta, force=False):
    directory = Path(directory)
    if force and directory.exists():
        log.info("--force_recompute_cache: clearing %s", directory)
        shutil.rmtree(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{directory}: cannot create the cache folder ({exc.strerror}); "
                         f"pass a writable --cache_dir") from None
    if not os.access(directory, os.W_OK):
        raise InputError(f"{directory}: the cache folder is not writable; pass a writable --cache_dir")
    _remove_stale_tmp(directory)
    meta_path = directory / "meta.json"
    if meta_path.exists():
        try:
            on_disk = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            on_disk = None
        if on_disk != meta:
            log.warning("cache %s was made for %s, not %s: clearing it", directory, on_disk, meta)
            shutil.rmtree(directory)
            directory.mkdir(parents=True)
    if not meta_path.exists():
        atomic_write_json(meta_path, meta)
    return directory


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_shard(shard):
    """A shard's keys, arrays and offsets, checked: every file against the SHA-256 its writer recorded
    (shards written before checksums were kept record none), offsets against the data, floats finite."""
    written = json.loads((shard / "fields.json").read_text())
    fields, digests = (written, {}) if isinstance(written, list) else (written["fields"], written["sha256"])
    for name, digest in digests.items():
        if _sha256(shard / name) != digest:
            raise ValueError(f"{name} does not match its SHA-256: the file was changed after it was written")
    keys = np.load(shard / "keys.npy", allow_pickle=False)
    arrays, offsets = {}, {}
    for field in fields:
        arrays[field] = np.load(shard / f"{field}.npy", mmap_mode="r", allow_pickle=False)
        offsets[field] = np.load(shard / f"{field}.offsets.npy", allow_pickle=False)
        if len(offsets[field]) != len(keys) + 1 or offsets[field][-1] != len(arrays[field]):
            raise ValueError(f"{field} offsets do not match the data")
        if arrays[field].dtype.kind == "f" and not np.isfinite(arrays[field]).all():
            raise ValueError(f"{field} holds non-finite values")
    return keys, arrays, offsets


def store_get(directory, keys, check=None):
    """{key: {field: array}} for the wanted keys present in the store. A corrupt shard is deleted
    with a warning, so that its entries are recomputed (another process may be deleting it too).
    Only shards holding a wanted key are loaded and checked; `check(entry)` raises ValueError for an
    entry that is damaged in a way only its kind can tell (an index out of range)."""
    wanted, found = set(keys), {}
    for shard in sorted(Path(directory).glob("shard-*")):
        try:
            if wanted.isdisjoint(np.load(shard / "keys.npy", allow_pickle=False).tolist()):
                continue
            shard_keys, arrays, offsets = _read_shard(shard)
            entries = {key: {f: a[offsets[f][i]:offsets[f][i + 1]] for f, a in arrays.items()}
                       for i, key in enumerate(shard_keys.tolist()) if key in wanted}
            for key, entry in entries.items():
                if check is not None:
                    check(entry)
        except (OSError, ValueError, KeyError, TypeError, EOFError, json.JSONDecodeError) as exc:
            log.warning("corrupt cache shard %s (%s): deleting it; its entries will be recomputed", shard, exc)
            if shard.is_dir():
                shutil.rmtree(shard, ignore_errors=True)
            else:
                shard.unlink(missing_ok=True)
            continue
        found.update(entries)
    return found


def store_put(directory, entries):
    """Write {key: {field: array}} as a new shard (a temporary folder renamed into place)."""
    directory = Path(directory)
    tmp = directory / _tmp_name()
    with full_disk_is_one_line(directory / "shard"), _removed_on_failure(tmp):
        tmp.mkdir()
        fields = list(next(iter(entries.values())))
        np.save(tmp / "keys.npy", np.array(list(entries), dtype=str))
        for field in fields:
            parts = [np.asarray(entry[field]) for entry in entries.values()]
            np.save(tmp / f"{field}.npy", np.concatenate(parts))
            np.save(tmp / f"{field}.offsets.npy", np.cumsum([0] + [len(p) for p in parts]))
        files = ["keys.npy", *(f"{field}{part}.npy" for field in fields for part in ("", ".offsets"))]
        atomic_write_json(tmp / "fields.json", {"fields": fields, "sha256": {f: _sha256(tmp / f) for f in files}})
        os.replace(tmp, directory / f"shard-{uuid.uuid4().hex}")


@contextlib.contextmanager
def _removed_on_failure(folder):
    try:
        yield
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def cached_entries(keys, directory, meta, compute, team, force=False, check=None):
    """Entries for `keys`: stored ones are read, the rest come from `compute(missing)`, which
    returns ({key: entry}, {key: failure reason}), and are stored. Failures are not stored.

    `team`: the torchrun team (distributed.Team), whose every rank calls this with the same keys:
    each computes and stores its share of the missing entries, then all read the complete store
    (and learn every rank's failures). `check`: see store_get."""
    if team.leader:  # only the leader may clear the store (--force_recompute_cache, changed meta)
        directory = open_store(directory, meta, force)
    team.barrier()
    if not team.leader:
        directory = open_store(directory, meta)
    found = store_get(directory, keys, check)
    missing = [k for k in dict.fromkeys(keys) if k not in found]
    if team.size > 1:
        # The leader's view decides (another job sharing the cache may add shards while the ranks
        # look), so that every rank takes the same steps; what the leader found is in the store.
        missing = team.gather_objects(missing)[0]
        absent = set(missing)
        lacking = [k for k in dict.fromkeys(keys) if k not in found and k not in absent]
        found.update(store_get(directory, lacking, check))
    if not missing:
        return found, {}
    mine = missing[team.share(len(missing))]
    try:
        new, failures = compute(mine) if mine else ({}, {})
        if new:
            store_put(directory, new)
        trouble = None
    except Exception as exc:
        if team.size == 1:
            raise
        trouble = exc
    if team.size > 1:
        # every rank stops on one rank's error, with that error, rather than waiting for it forever
        troubles = team.gather_objects(None if trouble is None else str(trouble) or type(trouble).__name__)
        if trouble is not None:
            raise trouble
        rank, words = next(((r, t) for r, t in enumerate(troubles) if t is not None), (None, None))
        if words is not None:
            raise InputError(f"torchrun rank {rank} stopped: {words}")
        failures = {k: v for part in team.gather_objects(failures) for k, v in part.items()}
        new = store_get(directory, missing, check)
        lost = [k for k in missing if k not in new and k not in failures]
        if lost:
            raise InputError(f"{directory}: {len(lost)} entries written by this torchrun team are gone (e.g. "
                             f"{lost[0]}): is another job clearing this cache? Run again")
    found.update(new)
    return found, failures



"""What every module needs: the one-line user error, the one atomic write, JSON reading, SHA-256,
file permissions and progress bars. Imports nothing heavy (no torch), so every process stays light."""
import contextlib
import csv
import errno
import functools
import hashlib
import json
import logging
import logging.handlers
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

import distributed

# Below this many free bytes a failed write is taken to be a full disk: some writers (numpy's
# tofile, torch's zip writer) report it in their own words, without errno.ENOSPC.
NEARLY_FULL_BYTES = 1 << 20


class InputError(Exception):
    """A problem with user-supplied data or the machine, reported as one line without a traceback."""


def _process_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_permissions(path):
    """Give a file made by mkstemp (always 0600) the permissions open() would give it, so that
    collaborators on a shared file system can read results."""
    os.chmod(path, 0o666 & ~_process_umask())


@contextlib.contextmanager
def full_disk_is_one_line(path):
    """Turn a write to `path` that fails because its disk is full into the one-line InputError
    "no space left on device: PATH"; any other failure passes unchanged. Callers clean up first."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full:
            with contextlib.suppress(OSError):
                full = shutil.disk_usage(Path(path).parent).free < NEARLY_FULL_BYTES
        if not full:
            raise
        raise InputError(f"no space left on device: {path} (nothing half-written was kept; earlier results "
                         f"are untouched): free space there and run again") from None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path` for a writer to fill; on success it is renamed over
    `path` with normal permissions, so readers only ever see a complete file and an earlier result
    survives any failure. The temporary file keeps `path`'s suffix (writers such as np.save and
    savefig choose by it) and is removed on failure. A full disk is an InputError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    with full_disk_is_one_line(path):
        try:
            yield Path(tmp)
            normal_permissions(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path, obj, indent=2):
    """indent=None: one line, for files too large to read by eye (a GOOD build of PCBA)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def write_csv(path, rows, columns):
    """A CSV file with a header line (to a path that atomic_path gave, or one written once)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(rows)


def atomic_write_csv(path, rows, columns):
    with atomic_path(path) as tmp:
        write_csv(tmp, rows, columns)


def read_json(path, what):
    """A JSON file the tool wrote; a damaged one is a one-line error naming it and `what` to do."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: damaged ({str(exc)[:80]}); {what}") from None


def read_csv_rows(path, what):
    """A CSV file the tool wrote, as dicts; a missing one is a one-line error saying `what` to do."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: missing; {what}")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def file_sha256(path):
    """SHA-256 of a file's bytes; a file unchanged since it was last hashed in this process (same
    inode, size and modification time) is not read again: a run hashes its weights and data file
    more than once, and the Uni-Mol checkpoint alone is 190 MB."""
    st = os.stat(path)
    return _sha256_of(os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_of(path, dev, inode, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal only, and from one process of a torchrun team: a redirected log
    stays readable."""
    return tqdm(iterable, disable=not (sys.stderr.isatty() and distributed.current().leader), **kwargs)


LOG_FORMAT = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
LOGGER = "energy_dpo"  # every module logs under it: energy_dpo.<module>


def attach_log_file(path):
    """Start writing the tool's log to `path` as well, beginning with the records held in memory
    since the command started (a run folder is only touched once its inputs have checked out)."""
    root = logging.getLogger(LOGGER)
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(LOG_FORMAT)
    for held in [h for h in root.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        held.setTarget(file_handler)
        held.flush()
        root.removeHandler(held)
        held.close()
    root.addHandler(file_handler)


def setup_logging(hold):
    """Console (stderr) logging, one logger per module under 'energy_dpo'. With `hold` (the modes
    that write a log file) the records are also held in memory until attach_log_file names
    the file: a run folder is only touched once its inputs have checked out, and its log still
    starts at the beginning."""
    root = logging.getLogger(LOGGER)
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        handler.close()
        root.removeHandler(handler)
    team, console = distributed.current(), logging.StreamHandler(sys.stderr)
    if not team.leader:  # the leader logs for the team; the others speak only of errors
        root.setLevel(logging.ERROR)
        console.setFormatter(logging.Formatter(f"%(asctime)s rank {team.rank} %(levelname)s %(message)s", "%H:%M:%S"))
        return root.addHandler(console)
    held = [logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)] if hold else []
    for handler in (console, *held):
        handler.setFormatter(LOG_FORMAT)
        root.addHandler(handler)

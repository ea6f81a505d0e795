"""An encoder's weights file (its encoders.WeightsOption) the way its own users get it: Uni-Mol's from
the dptech/Uni-Mol-Models hub repository, as unimol_tools does (huggingface_hub finds the file and the
SHA-256 the hub reports for it; the bytes come over HTTP (requests) into a partial file that an
interrupted download continues), checked against that SHA-256. The checkpoint is only ever loaded
weights-only (encoders.base.load_weights_only)."""
import logging
import os
import re
from pathlib import Path

import requests
from huggingface_hub import get_hf_file_metadata, hf_hub_url

from utils import InputError, file_sha256, full_disk_is_one_line, normal_permissions, progress

log = logging.getLogger("energy_dpo.download")


def _endpoint():
    # read at call time (huggingface_hub reads HF_ENDPOINT once, at its import)
    return os.environ.get("HF_ENDPOINT") or None


def hub_sha256(weights):
    """The SHA-256 the hub reports for the checkpoint (its LFS ETag)."""
    url = hf_hub_url(weights.hub_repo, weights.file, endpoint=_endpoint())
    try:
        etag = (get_hf_file_metadata(url).etag or "").strip('"')
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        raise InputError(f"{url}: cannot reach the hub ({str(exc).splitlines()[0][:120]}); check the network, "
                         f"or download {weights.file} by hand (README 'Getting the real inputs')") from None
    if not re.fullmatch(r"[0-9a-f]{64}", etag):
        raise InputError(f"{url}: the hub reports no SHA-256 for {weights.file} (ETag {etag!r}); download it by hand")
    return etag


def download_weights(weights, path):
    """`path` (…/<weights.file>, e.g. mol_pre_no_h_220816.pt) holding the hub's checkpoint, fetched if missing or not the
    hub's. The bytes go to a hidden partial file beside it, which a later run continues (an HTTP
    Range request) after an interruption; the file is renamed into place only once its SHA-256 is
    the hub's, and a partial file that turns out corrupt is deleted and reported. A partial file that
    is already whole is only renamed; one the server has nothing to add to (416) but that is not the
    hub's file is downloaded again from the start."""
    path = Path(path)
    if path.name != weights.file:
        raise InputError(f"{path}: the hub's file is {weights.file}; name the folder, not another file")
    expected = hub_sha256(weights)
    if path.is_file() and file_sha256(path) == expected:
        log.info("%s: already the hub's %s (SHA-256 %s…)", path, weights.file, expected[:12])
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{expected[:16]}.partial")  # the hub's version in its name
    url = hf_hub_url(weights.hub_repo, weights.file, endpoint=_endpoint())
    # a partial file may already be whole (the rename into place was interrupted): then only finish
    if not (partial.exists() and file_sha256(partial) == expected):
        if not _fetch(url, partial, path, weights):  # 416: the server has no bytes after the partial file's
            log.warning("%s: the hub has no bytes after its %s bytes, and they are not the hub's file: "
                        "downloading it again from the start", partial, f"{partial.stat().st_size:,}")
            partial.unlink()
            _fetch(url, partial, path, weights)
        actual = file_sha256(partial)
        if actual != expected:
            partial.unlink()
            raise InputError(f"{path}: SHA-256 {actual[:12]}… is not the hub's {expected[:12]}…: the download is "
                             f"corrupt and was deleted; run the same command again")
    normal_permissions(partial)
    os.replace(partial, path)
    log.info("%s: SHA-256 %s… checked against the hub", path, expected[:12])
    return path


def _fetch(url, partial, path, weights):
    """Append the bytes after the partial file's to it (all of them when there is none); False when the
    server answers 416 (Range Not Satisfiable: it has no bytes after the partial file's)."""
    start = partial.stat().st_size if partial.exists() else 0
    log.info("downloading %s from %s into %s%s", weights.file, weights.hub_repo, path.parent,
             f" (continuing after {start:,} bytes)" if start else "")
    try:
        with full_disk_is_one_line(path), requests.get(url, headers={"Range": f"bytes={start}-"} if start else {},
                                                       stream=True, timeout=60) as response:
            if start and response.status_code == 416:
                return False
            response.raise_for_status()
            if start and response.status_code != 206:  # the server sent the whole file again
                partial.unlink()
                start = 0
            total = start + int(response.headers.get("Content-Length", 0))
            with open(partial, "ab") as f, progress(total=total, initial=start, unit="B", unit_scale=True,
                                                     desc=weights.file) as bar:
                for block in response.iter_content(1 << 20):
                    f.write(block)
                    bar.update(len(block))
    except requests.RequestException as exc:
        raise InputError(f"{path}: the download stopped ({str(exc).splitlines()[0][:120]}); run the same command "
                         f"again: it continues where it stopped") from None
    return True

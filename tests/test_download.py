"""Uni-Mol's weights fetched as unimol_tools users get them: huggingface_hub against a local server in
the hub's URL layout (HF_ENDPOINT pointed at it) that serves a random-init checkpoint (189 MB, as the
real one), answering ranges as HTTP servers do (206, and 416 past the end); an interrupted download
continues, a partial file already whole is finished, a corrupt one is deleted and reported."""
import hashlib
import http.server
import threading

import numpy as np
import pytest

from main import main
from model import UniMolEncoder
from encoders import UNIMOL_WEIGHTS

WEIGHTS_FILE = UNIMOL_WEIGHTS.file
DROP_AT = 5_000_000
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """dptech/Uni-Mol-Models/resolve/<revision>/<file>: HEAD gives the hub's headers (ETag = the LFS
    SHA-256), GET the bytes with Range support. `drops`: so many GETs stop 5 MB in, as a dropped
    connection would; `served`: other bytes than the ETag's, as a corrupt mirror."""

    def __init__(self, data, served=None, drops=0):
        self.data, self.served, self.drops, self.ranges = data, served or data, drops, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def headers_for(self, length, status):
                self.send_response(status)
                sha = hashlib.sha256(hub.data).hexdigest()
                for key, value in (("X-Repo-Commit", COMMIT), ("ETag", f'"{sha}"'), ("X-Linked-Etag", f'"{sha}"'),
                                   ("X-Linked-Size", str(len(hub.data))), ("Content-Length", str(length)),
                                   ("Accept-Ranges", "bytes")):
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self):  # noqa: N802 - http.server's names
                if not self.path.endswith(f"/dptech/Uni-Mol-Models/resolve/main/{WEIGHTS_FILE}"):
                    self.send_error(404)
                    return
                self.headers_for(len(hub.data), 200)

            def do_GET(self):  # noqa: N802
                if not self.path.endswith(f"/resolve/main/{WEIGHTS_FILE}"):
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers["Range"] else 0
                hub.ranges.append(start)
                if start and start >= len(hub.served):  # RFC 9110: nothing after the last byte
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(hub.served)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = hub.served[start:]
                self.headers_for(len(body), 206 if start else 200)
                if hub.drops:
                    hub.drops -= 1
                    self.wfile.write(body[:DROP_AT])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the connection drops mid-file
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def last_line(capsys):
    """The command's one-line error (log lines may come before it), with no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: "), err
    return err.splitlines()[-1]


@pytest.fixture
def hub(monkeypatch, tmp_path, random_ckpt):
    servers = []

    def start(data=None, **kwargs):
        server = FakeHub(data or random_ckpt.read_bytes(), **kwargs)
        servers.append(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("UNIMOL_WEIGHT_DIR", str(tmp_path / "weights"))
        return server
    yield start
    for server in servers:
        server.close()


def test_make_weights_fetches_the_hub_checkpoint_and_checks_it(hub, tmp_path, random_ckpt, capsys):
    hub()
    assert main(["--mode", "weights"]) == 0
    path = tmp_path / "weights" / WEIGHTS_FILE
    assert path.read_bytes() == random_ckpt.read_bytes()
    assert "SHA-256 checked" in capsys.readouterr().err
    assert UniMolEncoder(str(path)).weights_id == UniMolEncoder(str(random_ckpt)).weights_id  # loads weights-only
    stamp = path.stat().st_mtime_ns
    assert main(["--mode", "weights"]) == 0 and path.stat().st_mtime_ns == stamp  # already there: untouched


def test_an_interrupted_download_continues_where_it_stopped(hub, tmp_path, capsys):
    data = np.random.default_rng(0).bytes(12_000_000)  # any bytes: the download checks only the SHA-256
    server = hub(data, drops=1)  # the connection drops 5 MB in
    assert main(["--mode", "weights"]) == 1
    err = last_line(capsys)
    assert "the download stopped" in err and "run the same command again" in err
    path = tmp_path / "weights" / WEIGHTS_FILE
    assert not path.exists()  # nothing half-written under the checkpoint's name
    assert main(["--mode", "weights"]) == 0  # the same command, once the network is back
    assert path.read_bytes() == data
    assert len(server.ranges) == 2 and 0 < server.ranges[1] <= DROP_AT  # the second run asked for the rest only
    assert sorted(p.name for p in path.parent.iterdir()) == [WEIGHTS_FILE]  # no partial file left


def partial_file(tmp_path, data):
    path = tmp_path / "weights" / f".{WEIGHTS_FILE}.{hashlib.sha256(data).hexdigest()[:16]}.partial"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_a_partial_file_that_is_already_whole_is_finished_not_fetched_again(hub, tmp_path):
    data = np.random.default_rng(2).bytes(2_000_000)
    server = hub(data)
    partial_file(tmp_path, data).write_bytes(data)  # killed after the last byte, before the rename
    assert main(["--mode", "weights"]) == 0
    assert (tmp_path / "weights" / WEIGHTS_FILE).read_bytes() == data and server.ranges == []


def test_a_full_length_partial_file_that_is_wrong_is_fetched_again_from_the_start(hub, tmp_path, capsys):
    data = np.random.default_rng(3).bytes(2_000_000)
    server = hub(data)
    partial_file(tmp_path, data).write_bytes(bytes(len(data)))  # as long as the file, other bytes: the hub says 416
    assert main(["--mode", "weights"]) == 0
    assert (tmp_path / "weights" / WEIGHTS_FILE).read_bytes() == data and server.ranges == [len(data), 0]
    assert "downloading it again from the start" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == [WEIGHTS_FILE]


def test_a_corrupt_download_is_deleted_and_reported(hub, tmp_path, capsys):
    data = np.random.default_rng(1).bytes(3_000_000)
    hub(data, served=data[:-10] + bytes(10))  # the last bytes wrong, as a broken mirror's
    assert main(["--mode", "weights"]) == 1
    err = last_line(capsys)
    assert "is not the hub's" in err and "corrupt and was deleted" in err
    assert not (tmp_path / "weights" / WEIGHTS_FILE).exists()


def test_train_can_download_its_weights(hub, tmp_path, small_benchmark, cache_dir, capsys):
    hub()
    assert main(["--data_file", str(small_benchmark), "--unimol_weights", "download", "--cache_dir", str(cache_dir),
                 "--num_workers", "1", "--epochs", "1", "--train_size", "6", "--val_size", "4", "--test_size", "4",
                 "--output_dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "weights" / WEIGHTS_FILE).is_file()
    config = (tmp_path / "run" / "config.json").read_text()
    assert str(tmp_path / "weights" / WEIGHTS_FILE) in config  # the run records the path it used

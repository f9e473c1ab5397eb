"""download: real HTTP servers on 127.0.0.1 and file:// mirrors, no mocks.

Each test configures what a local ``ThreadingHTTPServer`` does for each
(mirror, file, attempt): serve the file, answer 404 or 500, stall, cut the
body short or serve the wrong bytes. Every test checks the stage's outcome and
that the output folder holds only complete files with the expected md5: no
temporary file, nothing partial, nothing wrong.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import checkout_env, md5_of, run_stage_script, stage_command, write_params
from mnist_dvc.data import RAW_FILES
from mnist_dvc.stage import StageError
from stages import download

NAMES = list(RAW_FILES.values())  # in the order the stage downloads them
TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS = NAMES
TIMEOUT = 0.5  # download.timeout in these tests: a stalled attempt is abandoned after this


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still stalled at shutdown must not block the finalizer

    def handle_error(self, request, client_address):
        pass  # a client that gave up on a stalled response: expected here


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.mirrors.handle(self)


class Mirrors:
    """One HTTP server; URL ``/<mirror>/<file>`` is ``<file>`` on mirror ``<mirror>``.

    ``plan[(mirror, file)]`` is a list of behaviours, one per attempt (the last
    one repeats); without a plan the file is served. Behaviours: "ok", 403, 404, 500,
    "stall" (headers and a little of the body, then silence), "stall-headers"
    (no response at all), "truncate" (Content-Length says more than is sent,
    then the connection closes), "truncate-no-length", "truncate-chunked", and
    bytes (served instead of the file, with a matching Content-Length).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.plan: dict[tuple[str, str], list] = {}
        self.requests: list[str] = []
        self.hung_up: list[str] = []  # paths whose stalled response the client gave up on
        self.release = threading.Event()  # ends stalls at teardown
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.mirrors = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def url(self, mirror: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mirror}/"

    def count(self, mirror: str, name: str) -> int:
        return Counter(self.requests)[f"/{mirror}/{name}"]

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            attempt = Counter(self.requests)[h.path]
            self.requests.append(h.path)
        mirror, _, name = h.path.strip("/").partition("/")
        plan = self.plan.get((mirror, name), ["ok"])
        behaviour = plan[min(attempt, len(plan) - 1)]
        body = self.files.get(name)
        h.close_connection = True
        if body is None or behaviour == 404:
            h.send_error(404, "Not Found")
        elif behaviour in (403, 500):
            h.send_error(behaviour)
        elif behaviour == "stall-headers":
            self._until_hang_up(h)
        elif isinstance(behaviour, bytes):
            self._send(h, behaviour, len(behaviour))
        elif behaviour == "stall":
            self._send(h, body[:1000], len(body))
            h.wfile.flush()
            self._until_hang_up(h)
        elif behaviour == "truncate":
            self._send(h, body[: len(body) // 2], len(body))
        elif behaviour == "truncate-no-length":
            self._send(h, body[: len(body) // 2], None)
        elif behaviour == "truncate-chunked":
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            h.wfile.write(f"{len(body):x}\r\n".encode() + body[: len(body) // 2])
        else:
            assert behaviour == "ok", behaviour
            self._send(h, body, len(body))

    def _until_hang_up(self, h: http.server.BaseHTTPRequestHandler) -> None:
        """Stay silent until the client closes the connection (noted in ``hung_up``), the test
        ends, or 10 x download.timeout pass: a client that never gives up is not noted."""
        h.connection.settimeout(0.05)
        for _ in range(int(10 * TIMEOUT / 0.05)):
            if self.release.is_set():
                return
            try:
                if h.connection.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:  # reset by the client
                break
        else:
            return
        with self._lock:
            self.hung_up.append(h.path)

    @staticmethod
    def _send(h, payload: bytes, length: int | None) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        if length is not None:
            h.send_header("Content-Length", str(length))
        h.end_headers()
        h.wfile.write(payload)


@pytest.fixture
def server(mirror, request) -> Mirrors:
    folder, _ = mirror
    mirrors = Mirrors({name: (folder / name).read_bytes() for name in NAMES})
    request.addfinalizer(mirrors.close)
    return mirrors


@pytest.fixture
def refused_url():
    """An http:// URL on a port that is bound but not listening: connections are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/mnist/"
    sock.close()


@pytest.fixture
def stage(tmp_path, mirror, monkeypatch):
    """Run the download stage in-process with ``mirrors`` into tmp_path/raw; returns the output folder."""
    _, md5 = mirror
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "raw"

    def run(mirrors: list[str], **overrides) -> Path:
        settings = {"download__retries": 2, "download__timeout": TIMEOUT, "download__backoff": 0.01, **overrides}
        write_params(tmp_path, mirrors[0], md5, download__mirrors=mirrors, **settings)
        download.main(["--out", str(out)])
        return out

    run.out = out
    run.md5 = md5
    return run


def assert_only_verified_files(out: Path, md5: dict[str, str], expected: list[str]) -> None:
    """``out`` holds exactly ``expected`` (file names), each with its params md5, and nothing else."""
    by_name = {name: md5[key] for key, name in RAW_FILES.items()}
    present = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert present == sorted(expected), present  # no .tmp file, no partial or extra file
    for name in expected:
        assert md5_of(out / name) == by_name[name], name


def stage_error(run, mirrors, **overrides) -> str:
    with pytest.raises(StageError) as info:
        run(mirrors, **overrides)
    return str(info.value)


def corrupt_copy(src: Path, dest: Path, broken: str) -> Path:
    """A copy of mirror folder ``src`` in which file ``broken`` has one byte changed."""
    dest.mkdir()
    for name in NAMES:
        data = bytearray((src / name).read_bytes())
        if name == broken:
            data[len(data) // 2] ^= 0xFF
        (dest / name).write_bytes(bytes(data))
    return dest


# --- success ----------------------------------------------------------------------

def test_http_mirror_downloads_all_four_files_md5_verified(stage, server, capsys):
    out = stage([server.url("a")])
    assert_only_verified_files(out, stage.md5, NAMES)
    assert sorted(server.requests) == sorted(f"/a/{name}" for name in NAMES)  # one request each
    printed = capsys.readouterr().out
    for key, name in RAW_FILES.items():
        assert f"{name}: md5 {stage.md5[key]} verified" in printed


def test_file_mirror_downloads_all_four_files_md5_verified(stage, mirror):
    folder, _ = mirror
    out = stage([folder.as_uri() + "/"])
    assert_only_verified_files(out, stage.md5, NAMES)


def test_mirror_url_without_trailing_slash_works(stage, mirror):
    folder, _ = mirror
    out = stage([folder.as_uri()])
    assert_only_verified_files(out, stage.md5, NAMES)


def test_successful_download_replaces_a_stale_corrupt_file(stage, server):
    stage.out.mkdir()
    (stage.out / TRAIN_IMAGES).write_bytes(b"stale and wrong")
    out = stage([server.url("a")])
    assert_only_verified_files(out, stage.md5, NAMES)


# --- fallback and retry --------------------------------------------------------------

def test_404_on_first_mirror_falls_back_to_second_without_retrying(stage, server):
    for name in NAMES:
        server.plan[("a", name)] = [404]
    out = stage([server.url("a"), server.url("b")])
    assert_only_verified_files(out, stage.md5, NAMES)
    for name in NAMES:
        assert server.count("a", name) == 1  # a 404 is not retried: the file is not there
        assert server.count("b", name) == 1


def test_500_then_success_on_same_mirror_is_retried(stage, server):
    server.plan[("a", TRAIN_LABELS)] = [500, "ok"]
    out = stage([server.url("a"), server.url("b")])
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("a", TRAIN_LABELS) == 2
    assert server.count("b", TRAIN_LABELS) == 0
    assert len(server.requests) == 5


def test_retries_are_spaced_by_exponential_backoff(stage, server, monkeypatch):
    server.plan[("a", TRAIN_LABELS)] = [500, 500, "ok"]
    waits = []
    monkeypatch.setattr(download.time, "sleep", waits.append)
    out = stage([server.url("a")], download__retries=3, download__backoff=0.2)
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("a", TRAIN_LABELS) == 3
    assert waits == [0.2, 0.4]  # download.backoff, then twice that


def test_connection_refused_falls_back_to_next_mirror(stage, server, refused_url):
    out = stage([refused_url, server.url("b")])
    assert_only_verified_files(out, stage.md5, NAMES)
    assert all(server.count("b", name) == 1 for name in NAMES)


def test_stalled_server_is_abandoned_after_timeout_and_next_mirror_used(stage, server):
    server.plan[("a", TEST_IMAGES)] = ["stall"]
    start = time.monotonic()
    out = stage([server.url("a"), server.url("b")])
    elapsed = time.monotonic() - start
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("a", TEST_IMAGES) == 2 and server.count("b", TEST_IMAGES) == 1
    assert server.hung_up == [f"/a/{TEST_IMAGES}"] * 2  # the stage gave up on both stalled attempts...
    assert elapsed >= 2 * TIMEOUT  # ...each after download.timeout of silence


def test_server_that_never_answers_is_abandoned_after_timeout(stage, server):
    server.plan[("a", TRAIN_IMAGES)] = ["stall-headers", "ok"]
    start = time.monotonic()
    out = stage([server.url("a")])
    assert time.monotonic() - start >= TIMEOUT
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("a", TRAIN_IMAGES) == 2
    assert server.hung_up == [f"/a/{TRAIN_IMAGES}"]  # the stage gave up on the silent first attempt


@pytest.mark.parametrize("behaviour", ["truncate", "truncate-chunked", "truncate-no-length"])
def test_truncated_body_is_retried_and_never_left_behind(stage, server, behaviour):
    server.plan[("a", TEST_IMAGES)] = [behaviour, "ok"]
    out = stage([server.url("a")])
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("a", TEST_IMAGES) == 2


def test_corrupt_file_mirror_falls_back_to_next_mirror(stage, server, mirror, tmp_path):
    folder, _ = mirror
    corrupt = corrupt_copy(folder, tmp_path / "corrupt", TEST_LABELS)
    out = stage([corrupt.as_uri() + "/", server.url("b")])
    assert_only_verified_files(out, stage.md5, NAMES)
    assert server.count("b", TEST_LABELS) == 1 and server.count("b", TRAIN_IMAGES) == 0


# --- failures: one error, nothing partial or wrong left ---------------------------------

def test_truncated_body_on_every_attempt_is_rejected_and_nothing_is_left(stage, server):
    server.plan[("a", TEST_IMAGES)] = ["truncate"]
    message = stage_error(stage, [server.url("a")])
    size = len(server.files[TEST_IMAGES])
    assert f"{server.url('a')}{TEST_IMAGES} (attempt 2/2): truncated: received {size // 2} of {size} bytes" in message
    assert_only_verified_files(stage.out, stage.md5, [TRAIN_IMAGES, TRAIN_LABELS])


def test_wrong_md5_is_rejected_and_nothing_is_left(stage, server):
    wrong = bytearray(server.files[TEST_IMAGES])
    wrong[len(wrong) // 2] ^= 0xFF  # same length, one byte changed
    wrong = bytes(wrong)
    server.plan[("a", TEST_IMAGES)] = [wrong]
    message = stage_error(stage, [server.url("a")])
    expected, actual = stage.md5["test_images"], hashlib.md5(wrong).hexdigest()
    assert expected != actual
    url = server.url("a") + TEST_IMAGES
    for attempt in (1, 2):
        assert f"{url} (attempt {attempt}/2): md5 mismatch: expected {expected}, got {actual}" in message
    assert_only_verified_files(stage.out, stage.md5, [TRAIN_IMAGES, TRAIN_LABELS])


def test_wrong_md5_in_params_is_rejected_and_nothing_is_left(stage, server):
    wrong_md5 = "0" * 32
    message = stage_error(stage, [server.url("a")], download__md5__train_labels=wrong_md5)
    real = hashlib.md5(server.files[TRAIN_LABELS]).hexdigest()
    assert f"{server.url('a')}{TRAIN_LABELS} (attempt 1/2): md5 mismatch: expected {wrong_md5}, got {real}" in message
    assert_only_verified_files(stage.out, stage.md5, [TRAIN_IMAGES])


def test_corrupt_file_in_file_mirror_is_rejected_and_nothing_is_left(stage, mirror, tmp_path):
    folder, _ = mirror
    corrupt = corrupt_copy(folder, tmp_path / "corrupt", TEST_LABELS)
    message = stage_error(stage, [corrupt.as_uri() + "/"])
    expected, actual = stage.md5["test_labels"], md5_of(corrupt / TEST_LABELS)
    url = corrupt.as_uri() + "/" + TEST_LABELS
    assert message.startswith(f"could not download {TEST_LABELS} from any mirror:\n")
    # A local file does not change: one attempt, not the two that download.retries allows.
    assert f"{url} (attempt 1/2): md5 mismatch: expected {expected}, got {actual} (not retried" in message
    assert "attempt 2/2" not in message
    assert_only_verified_files(stage.out, stage.md5, [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES])


def test_missing_file_mirror_folder_is_reported(stage, tmp_path):
    missing = tmp_path / "no-such-folder"
    message = stage_error(stage, [missing.as_uri() + "/"])
    assert f"{missing.as_uri()}/{TRAIN_IMAGES} (attempt 1/2): FileNotFoundError" in message
    assert "attempt 2/2" not in message  # a missing local file is not retried
    assert not stage.out.exists() or list(stage.out.iterdir()) == []


def test_all_mirrors_failing_is_one_error_listing_every_url_and_reason(stage, server, refused_url, tmp_path):
    server.plan[("a", TEST_IMAGES)] = [404]
    server.plan[("b", TEST_IMAGES)] = [500]
    server.plan[("c", TEST_IMAGES)] = [b"not the file"]
    server.plan[("d", TEST_IMAGES)] = [403]
    mirrors = [server.url("a"), refused_url, server.url("b"), server.url("c"), server.url("d"),
               (tmp_path / "none").as_uri() + "/"]
    message = stage_error(stage, mirrors)
    lines = message.splitlines()
    assert lines[0] == f"could not download {TEST_IMAGES} from any mirror:"
    not_retried = " (not retried: a retry would give the same)"
    expected = [
        (server.url("a"), 1, "HTTP 404 Not Found" + not_retried),
        (refused_url, 1, "ConnectionRefusedError"),
        (refused_url, 2, "ConnectionRefusedError"),
        (server.url("b"), 1, "HTTP 500 Internal Server Error"),
        (server.url("b"), 2, "HTTP 500 Internal Server Error"),
        # Over HTTP a wrong body may be a passing fault (a proxy, a partial sync): retried.
        (server.url("c"), 1, f"md5 mismatch: expected {stage.md5['test_images']}, got {hashlib.md5(b'not the file').hexdigest()}"),
        (server.url("c"), 2, "md5 mismatch"),
        (server.url("d"), 1, "HTTP 403 Forbidden" + not_retried),
        ((tmp_path / "none").as_uri() + "/", 1, "FileNotFoundError"),
    ]
    assert len(lines) == 1 + len(expected) + 1, message
    for line, (mirror_url, attempt, reason) in zip(lines[1:], expected):
        assert line.startswith(f"  {mirror_url}{TEST_IMAGES} (attempt {attempt}/2): {reason}"), line
    assert lines[-2].endswith(not_retried)  # the missing local file
    # The last line says what to do without internet, and where the README explains it.
    assert lines[-1].startswith("No internet? ") and 'README.md, section "No internet?"' in lines[-1]
    assert_only_verified_files(stage.out, stage.md5, [TRAIN_IMAGES, TRAIN_LABELS])


def test_all_mirrors_failing_as_a_script_exits_1_with_one_error_and_no_traceback(server, refused_url, mirror, tmp_path):
    _, md5 = mirror
    server.plan[("a", TEST_IMAGES)] = [404]
    server.plan[("b", TEST_IMAGES)] = [b"wrong bytes"]
    mirrors = [server.url("a"), refused_url, server.url("b")]
    write_params(tmp_path, mirrors[0], md5, download__mirrors=mirrors, download__retries=2,
                 download__timeout=TIMEOUT, download__backoff=0.01)
    result = run_stage_script("download", "--out", "raw", cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: could not download {TEST_IMAGES} from any mirror:\n"), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 + 1 + 2 + 2 + 1, result.stderr  # the headline, one line per attempt, the hint
    assert f"{server.url('a')}{TEST_IMAGES} (attempt 1/2): HTTP 404 Not Found" in lines[1]
    assert all(f"{refused_url}{TEST_IMAGES} (attempt {i}/2): ConnectionRefusedError" in lines[1 + i] for i in (1, 2))
    bad = hashlib.md5(b"wrong bytes").hexdigest()
    assert all(f"{server.url('b')}{TEST_IMAGES} (attempt {i}/2): md5 mismatch: expected {md5['test_images']}, got {bad}"
               in lines[3 + i] for i in (1, 2))
    assert lines[-1].startswith("No internet? ")
    assert re.findall(r"^\S+: md5 [0-9a-f]{32} verified$", result.stdout, re.M) == [
        f"{TRAIN_IMAGES}: md5 {md5['train_images']} verified", f"{TRAIN_LABELS}: md5 {md5['train_labels']} verified"
    ]
    assert_only_verified_files(tmp_path / "raw", md5, [TRAIN_IMAGES, TRAIN_LABELS])


def test_sigterm_during_a_download_exits_130_and_leaves_no_partial_file(server, mirror, tmp_path):
    _, md5 = mirror
    server.plan[("a", TEST_IMAGES)] = ["stall"]
    write_params(tmp_path, server.url("a"), md5, download__timeout=30.0)
    proc = subprocess.Popen([*stage_command("download"), "--out", "raw"], cwd=tmp_path, env=checkout_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while server.count("a", TEST_IMAGES) == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert server.count("a", TEST_IMAGES) == 1, "the stage never reached the stalled file"
        time.sleep(0.2)  # the first bytes are in the temporary file now
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith("interrupted (SIGTERM): no output was replaced"), stderr
    assert_only_verified_files(tmp_path / "raw", md5, [TRAIN_IMAGES, TRAIN_LABELS])

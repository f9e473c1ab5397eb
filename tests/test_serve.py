"""The web app (mnist_dvc/apps/serve.py), tested through the real server process.

Each server is ``python -m mnist_dvc.apps.serve --root <reproduced repo> --port 0``
in a subprocess: it prints the URL it listens on, and is stopped by the
fixture's finalizer. Its answers are compared with the ``predict`` command's
on the same pictures, and with the model files and metrics it says it serves.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import REPO, tiny_mnist_arrays
from test_images import png_header_only

from mnist_dvc.apps.images import to_mnist
from mnist_dvc.apps.inference import Predictor
from mnist_dvc.apps.serve import BODY_IDLE_SECONDS, MAX_BODY, create_app

pytestmark = pytest.mark.e2e

START_TIMEOUT = 60  # s; start-up is ~3 s, more when the other xdist worker trains


class Server:
    """``python -m mnist_dvc.apps.serve`` on a free port; ``stop()`` ends it."""

    def __init__(self, root: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_dvc.apps.serve", "--root", str(root), "--port", "0", *args],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.process.stdout, self.stdout), (self.process.stderr, self.stderr)):
            threading.Thread(target=self._collect, args=(stream, lines), daemon=True).start()
        self.url = self._wait_for_url()

    @staticmethod
    def _collect(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def _wait_for_url(self) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.stdout):
                if line.startswith("Serving on http://"):
                    return line.split()[2].rstrip("/")
            if self.process.poll() is not None:
                self.process.wait()
                time.sleep(0.1)  # let the readers collect the last lines
                return None
            time.sleep(0.05)
        raise AssertionError(f"the server printed no URL within {START_TIMEOUT} s: {self.stdout} {self.stderr}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(root: Path, *args: str) -> Server:
    """A running server (or an AssertionError with its output), ready for requests."""
    server = Server(root, *args)
    if server.url is None:
        raise AssertionError(f"the server exited {server.process.returncode}: {''.join(server.stderr)}")
    response = httpx.get(f"{server.url}/api/health", timeout=30)
    assert response.status_code == 200, response.text
    return server


@pytest.fixture(scope="module")
def server(reproduced):
    server = start_server(reproduced)
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


# --- pictures -------------------------------------------------------------------------

def png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def scanned_digits(count: int = 6) -> list[bytes]:
    """Fixture test digits, dark on light and enlarged to 280x280, like a scan."""
    images = tiny_mnist_arrays()["test_images"][:count]
    return [png(Image.fromarray(255 - image).resize((280, 280), Image.BICUBIC)) for image in images]


def canvas_stroke() -> bytes:
    """A vertical stroke as the page draws it: dark, 20 px, round caps, on a transparent 280x280 canvas."""
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.line([(140, 50), (140, 230)], fill=(17, 24, 39, 255), width=20)
    for y in (50, 230):
        draw.ellipse([130, y - 10, 150, y + 10], fill=(17, 24, 39, 255))
    return png(img)


def check_answer(answer: dict, picture: bytes) -> None:
    assert set(answer) == {"manual", "skorch", "input"}
    for name in ("manual", "skorch"):
        probabilities = answer[name]["probabilities"]
        assert len(probabilities) == 10 and min(probabilities) >= 0
        assert sum(probabilities) == pytest.approx(1, abs=1e-9)
        assert answer[name]["digit"] == int(np.argmax(probabilities))
    image = np.array(answer["input"])
    assert image.shape == (28, 28) and image.min() >= 0 and image.max() <= 1
    # The input the models saw is exactly what to_mnist makes of the picture.
    assert np.array_equal(image.astype(np.float32), to_mnist(picture))


# --- tests ---------------------------------------------------------------------------------

def test_health_names_the_loaded_files_and_their_test_accuracy(client, reproduced):
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["backend"] == "pytorch"
    assert health["max_body_bytes"] == MAX_BODY
    metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
    files = {"manual": "models/mlp.pt", "skorch": "models/skorch_params.pt"}
    assert set(health["models"]) == set(files)
    for name, model in health["models"].items():
        assert model["file"] == files[name]
        assert model["sha256"] == hashlib.sha256((reproduced / files[name]).read_bytes()).hexdigest()
        assert model["test_accuracy"] == metrics[name]["accuracy"]


def test_the_page_and_its_files_come_from_the_server(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<canvas id="canvas"' in page.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        response = client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"], path
        assert "://" not in response.text, f"{path} loads something from elsewhere"
    # Nothing from a CDN: every src/href is local (or the inline data: icon).
    for attribute in ("src=", "href="):
        for value in page.text.split(attribute)[1:]:
            assert value[1:].startswith(("/", "data:")), value[:60]
    assert client.get("/static/../serve.py").status_code == 404
    assert client.get("/static/nothing.js").json() == {"error": "Not Found"}


def test_predictions_match_the_predict_command(client, reproduced, tmp_path):
    pictures = [*scanned_digits(), canvas_stroke()]
    paths = []
    for index, picture in enumerate(pictures):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(picture)
    cli = subprocess.run([sys.executable, "-m", "mnist_dvc.apps.predict", "--json", "--models-root", str(reproduced),
                          *map(str, paths)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    for picture, path, want in zip(pictures, paths, expected):
        raw = client.post("/api/predict", content=picture, headers={"Content-Type": "image/png"})
        form = client.post("/api/predict", files={"file": (path.name, picture, "image/png")})
        for response in (raw, form):
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            check_answer(answer, picture)
            for name in ("manual", "skorch"):
                assert answer[name]["digit"] == want[name]["digit"], path
                # float32 sums: one picture here, a batch of them in the command
                assert answer[name]["probabilities"] == pytest.approx(want[name]["probabilities"], abs=1e-6)
    # Any image content type, octet-stream, or none at all: the bytes say what the picture is.
    for content_type in ("image/jpeg", "application/octet-stream", None):
        headers = {"Content-Type": content_type} if content_type else {}
        request = client.build_request("POST", "/api/predict", content=pictures[0], headers=headers)
        assert request.headers.get("Content-Type") == content_type
        assert client.send(request).status_code == 200


def test_onnx_server_answers_the_same(reproduced, server):
    onnx = start_server(reproduced, "--onnx")
    try:
        health = httpx.get(f"{onnx.url}/api/health").json()
        assert health["backend"] == "onnx"
        for name, model in health["models"].items():
            assert model["file"].endswith(".onnx")
            assert model["sha256"] == hashlib.sha256((reproduced / model["file"]).read_bytes()).hexdigest()
        for picture in [*scanned_digits(), canvas_stroke()]:
            answers = [httpx.post(f"{url}/api/predict", content=picture,
                                  headers={"Content-Type": "image/png"}).json() for url in (server.url, onnx.url)]
            for name in ("manual", "skorch"):
                assert answers[0][name]["digit"] == answers[1][name]["digit"]
                assert answers[0][name]["probabilities"] == pytest.approx(answers[1][name]["probabilities"], abs=1e-4)
    finally:
        onnx.stop()


def send_raw(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send only a request head; return what the server answers (until it closes or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        answer = b""
        try:
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except TimeoutError:
            pass
        return answer


def upload_until_answered(port: int, total: int) -> tuple[int, bytes]:
    """A chunked upload of ``total`` bytes, no Content-Length, stopped as soon as the server answers.

    Returns the bytes sent and the answer.
    """
    chunk = b"\x89PNG" + b"\0" * 65532
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            assert writable, "the server neither read nor answered for 10 s"
            sock.sendall(frame)
            sent += len(chunk)
        deadline = time.monotonic() + 10
        while b"}" not in answer and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return sent, answer


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_bad_uploads_get_a_clear_4xx_and_the_server_carries_on(server, client):
    good = canvas_stroke()
    bomb = png_header_only(50_000, 50_000)
    assert to_mnist(good) is not None and len(bomb) < 200

    # Over 2 MB, declared: refused from the head alone, before any of the body is sent ...
    status, body = status_and_json(send_raw(server.port, (
        b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))))
    assert status == 413 and "larger than the limit" in body["error"]
    # ... and a client that sends it all anyway still reads the 413.
    response = client.post("/api/predict", content=os.urandom(3_000_000), headers={"Content-Type": "image/png"})
    assert response.status_code == 413 and "error" in response.json()
    # Over 2 MB, chunked without Content-Length: refused while it is still being sent.
    total = 64 * MAX_BODY
    sent, answer = upload_until_answered(server.port, total)
    status, body = status_and_json(answer)
    assert status == 413 and "larger than the limit" in body["error"]
    assert MAX_BODY < sent < total

    cases = {
        "not an image": (b"just some text, not a picture", "image/png", 422, "not an image"),
        "truncated PNG": (good[: len(good) // 2], "image/png", 422, "corrupt or truncated"),
        "empty body": (b"", "image/png", 422, "empty"),
        "one colour": (png(Image.new("L", (280, 280), 255)), "image/png", 422, "no digit found"),
        "decompression bomb": (bomb, "image/png", 422, "too large"),
        "text/plain": (good, "text/plain", 415, "unsupported content type"),
        "JSON": (b'{"image": 1}', "application/json", 415, "unsupported content type"),
        "multipart without a boundary": (good, "multipart/form-data", 400, "boundary"),
    }
    for case, (content, content_type, want_status, message) in cases.items():
        response = client.post("/api/predict", content=content, headers={"Content-Type": content_type})
        assert response.status_code == want_status, (case, response.text)
        assert message in response.json()["error"], (case, response.text)
    # Multipart forms without a file called "file".
    forms = {"no field 'file'": ({"files": {"picture": ("a.png", good, "image/png")}}, "no file field named 'file'"),
             "'file' is text": ({"files": {"other": ("a.txt", b"x", "text/plain")}, "data": {"file": "not a file"}},
                                "the form field 'file' holds text, not a file"),
             "'file' without a filename": ({"files": {"file": (None, good[:1000], "image/png")}},
                                           "the form field 'file' holds text, not a file"),
             "'file' without a filename, big": ({"files": {"file": (None, b"x" * 1_500_000, "image/png")}},
                                                "the form field 'file' holds text, not a file")}
    for case, (form, message) in forms.items():
        response = client.post("/api/predict", **form)
        assert response.status_code == 400 and message in response.json()["error"], (case, response.text)
    # Wrong method, unknown path: still JSON errors.
    response = client.get("/api/predict")
    assert response.status_code == 405 and response.headers["allow"] == "POST" and "error" in response.json()
    assert client.get("/api/nothing").status_code == 404

    # The server is still up, answers good requests, and never logged an unexpected error.
    response = client.post("/api/predict", content=good, headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    check_answer(response.json(), good)
    assert server.alive()
    assert "Traceback" not in "".join(server.stderr) and "500" not in "".join(server.stderr)


def test_an_upload_cut_off_or_stalled_is_dropped_without_an_error_in_the_log(server, client):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\x89PNG\r\n\x1a\n")
    # Cut off: the client goes away after 10 of the 1,000 bytes it announced (a phone off Wi-Fi).
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        time.sleep(0.3)
    # Stalled: the client stays, silent. The server answers 408 and closes, after BODY_IDLE_SECONDS.
    start = time.monotonic()
    status, body = status_and_json(send_raw(server.port, head, timeout=BODY_IDLE_SECONDS + 10))
    elapsed = time.monotonic() - start
    assert status == 408 and body["error"].startswith("the upload stalled"), body
    assert BODY_IDLE_SECONDS - 0.5 < elapsed < BODY_IDLE_SECONDS + 5
    # Good requests are still answered, and nothing went to the log as an error.
    response = client.post("/api/predict", content=canvas_stroke(), headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    time.sleep(0.3)
    log = "".join(server.stderr)
    assert "Traceback" not in log and "Exception" not in log and "ERROR" not in log, log


def test_missing_models_stop_the_server_before_it_listens(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    for args in ((), ("--onnx",)):
        server = Server(tmp_path, *args)
        try:
            assert server.url is None, "the server started without models"
            assert server.process.returncode == 1
            lines = [line for line in server.stderr if line.strip()]
            assert len(lines) == 1, lines
            assert lines[0].startswith("error: ") and "dvc repro" in lines[0] and "dvc pull" in lines[0]
        finally:
            server.stop()


def test_a_bug_is_a_json_500_and_the_app_goes_on(reproduced):
    """In-process: the catch-all for what must never happen (a failing model call)."""
    predictor = Predictor(reproduced)
    working = predictor.probabilities
    calls = []

    def fails_once(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return working(images)

    predictor.probabilities = fails_once
    app = create_app(predictor)

    async def two_requests():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [await client.post("/api/predict", content=canvas_stroke(), headers={"Content-Type": "image/png"})
                    for _ in range(2)]

    first, second = asyncio.run(two_requests())
    assert first.status_code == 500 and first.json() == {"error": "internal server error"}
    assert second.status_code == 200 and second.json()["manual"]["digit"] in range(10)

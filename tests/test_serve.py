"""The web app (mnist_dvc/apps/serve.py): in process through httpx's ASGI transport,
and once as the real server.

The app runs over the reproduced project's models; its answers are compared
with the ``predict`` command's on the same pictures, and with the model files
and metrics it says it serves; corrections sent to ``/api/feedback`` land in a
feedback store in ``tmp_path``. One test starts ``python -m mnist_dvc.apps.serve``
(uvicorn) and checks what only a real socket shows: the 413 however a large
body comes, and a clean log.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import (REPO, Server, ask, canvas_stroke, checkout_env, committed_params_file, encode, png_header_only,
                     scanned_digits, start_server)

from mnist_dvc.apps.feedback import FeedbackStore
from mnist_dvc.apps.images import to_mnist, to_png
from mnist_dvc.apps.inference import Predictor
from mnist_dvc.apps import serve
from mnist_dvc.apps.serve import MAX_BODY, create_app
from mnist_dvc.data import FEEDBACK_LABELS, read_feedback_labels

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def predictor(reproduced):
    """The reproduced project's PyTorch models, loaded once."""
    return Predictor(reproduced)


@pytest.fixture(scope="module")
def app(predictor):
    """The app over the reproduced project's PyTorch models, in this process."""
    return create_app(predictor)


def post(picture, content_type: str | None = "image/png", **kwargs) -> dict:
    headers = {"Content-Type": content_type} if content_type else {}
    return {"method": "POST", "url": "/api/predict", "content": picture, "headers": headers, **kwargs}


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


class Upload:
    """A request body sent in 64 kB pieces, as an async iterable; counts the pieces taken.

    After ``pieces`` pieces it ends, or, with ``stall=True``, waits for good.
    """

    PIECE = b"\x89PNG" + b"\0" * 65532

    def __init__(self, pieces: int, stall: bool = False):
        self.pieces, self.stall, self.taken = pieces, stall, 0

    async def __aiter__(self):
        while self.taken < self.pieces:
            self.taken += 1
            yield self.PIECE
        if self.stall:
            await asyncio.Event().wait()


# --- the app, in process ---------------------------------------------------------------------

def test_health_names_the_loaded_files_and_their_test_accuracy(app, reproduced):
    health = ask(app, [{"method": "GET", "url": "/api/health"}])[0].json()
    assert health["status"] == "ok" and health["backend"] == "pytorch"
    assert health["max_body_bytes"] == MAX_BODY
    metrics = json.loads((reproduced / "metrics/evaluate.json").read_text())
    files = {"manual": "models/mlp.pt", "skorch": "models/skorch_params.pt"}
    assert set(health["models"]) == set(files)
    for name, model in health["models"].items():
        assert model["file"] == files[name]
        assert model["sha256"] == hashlib.sha256((reproduced / files[name]).read_bytes()).hexdigest()
        assert model["test_accuracy"] == metrics[name]["accuracy"]


def test_the_page_and_its_files_come_from_the_server(app):
    paths = ["/", "/static/app.js", "/static/style.css", "/static/../serve.py", "/static/nothing.js"]
    page, script, style, outside, missing = ask(app, [{"method": "GET", "url": path} for path in paths])
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert '<canvas id="canvas"' in page.text
    for response, kind in ((script, "javascript"), (style, "text/css")):
        assert response.status_code == 200 and kind in response.headers["content-type"], response.url
        assert "://" not in response.text, f"{response.url} loads something from elsewhere"
    # Nothing from a CDN: every src/href is local (or the inline data: icon).
    for attribute in ("src=", "href="):
        for value in page.text.split(attribute)[1:]:
            assert value[1:].startswith(("/", "data:")), value[:60]
    assert outside.status_code == 404
    assert missing.json() == {"error": "Not Found"}


def test_concurrent_requests_each_get_the_answer_for_their_own_picture(app, reproduced):
    # The pictures are read in worker threads, two at a time: all the requests in flight at once,
    # each answered with what the models say of its own picture, sent alone.
    pictures = [*scanned_digits(), canvas_stroke()] * 4
    alone = [response.json() for response in ask(app, [post(picture) for picture in pictures[:len(pictures) // 4]])]

    responses = ask(app, [post(picture) for picture in pictures], at_once=True)
    assert [response.status_code for response in responses] == [200] * len(pictures)
    assert [response.json() for response in responses] == alone * 4


def test_predictions_match_the_predict_command(app, reproduced, tmp_path):
    pictures = [*scanned_digits(), canvas_stroke()]
    paths = []
    for index, picture in enumerate(pictures):
        paths.append(tmp_path / f"{index}.png")
        paths[-1].write_bytes(picture)
    cli = subprocess.run([sys.executable, "-m", "mnist_dvc.apps.predict", "--json", "--models-root", str(reproduced),
                          *map(str, paths)], cwd=REPO, env=checkout_env(),
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    requests = []
    for picture, path in zip(pictures, paths):
        requests += [post(picture),  # raw body, as the page sends it
                     {"method": "POST", "url": "/api/predict", "files": {"file": (path.name, picture, "image/png")}}]
    responses = ask(app, requests)
    for index, (picture, path, want) in enumerate(zip(pictures, paths, expected)):
        for response in responses[2 * index: 2 * index + 2]:
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/json"
            answer = response.json()
            check_answer(answer, picture)
            for name in ("manual", "skorch"):
                assert answer[name]["digit"] == want[name]["digit"], path
                # float32 sums: one picture here, a batch of them in the command
                assert answer[name]["probabilities"] == pytest.approx(want[name]["probabilities"], abs=1e-6)
    # Any image content type, octet-stream, or none at all: the bytes say what the picture is.
    for response in ask(app, [post(pictures[0], kind) for kind in ("image/jpeg", "application/octet-stream", None)]):
        assert response.status_code == 200, response.text


def test_onnx_backend_answers_the_same(app, reproduced):
    onnx = create_app(Predictor(reproduced, onnx=True))
    health = ask(onnx, [{"method": "GET", "url": "/api/health"}])[0].json()
    assert health["backend"] == "onnx"
    for model in health["models"].values():
        assert model["file"].endswith(".onnx")
        assert model["sha256"] == hashlib.sha256((reproduced / model["file"]).read_bytes()).hexdigest()
    pictures = [*scanned_digits(), canvas_stroke()]
    for want, got in zip(ask(app, [post(p) for p in pictures]), ask(onnx, [post(p) for p in pictures])):
        for name in ("manual", "skorch"):
            assert want.json()[name]["digit"] == got.json()[name]["digit"]
            assert want.json()[name]["probabilities"] == pytest.approx(got.json()[name]["probabilities"], abs=1e-4)


def test_a_body_over_the_limit_is_a_413_that_says_the_limit(app):
    declared, chunked = Upload(64), Upload(64)
    length = {"Content-Length": str(MAX_BODY + 1)}
    refused = ask(app, [
        # Declared: refused from the head alone, none of the body read ...
        post(declared, headers={"Content-Type": "image/png", **length}),
        # ... also on a route that reads no body ...
        {"method": "GET", "url": "/api/health", "content": declared, "headers": length},
        # ... and without a length (chunked): counted by FastAPI, refused as it passes the limit.
        post(chunked),
    ])
    for response in refused:
        assert response.status_code == 413
        assert response.json() == {"error": f"the request body is larger than the limit ({MAX_BODY:,} bytes)"}
    assert declared.taken == 0
    assert MAX_BODY < chunked.taken * len(Upload.PIECE) <= MAX_BODY + len(Upload.PIECE)
    # Exactly the limit is fine (and not a picture).
    at_limit = ask(app, [post(b"\0" * MAX_BODY)])[0]
    assert at_limit.status_code == 422 and "not an image" in at_limit.json()["error"]


def test_bad_uploads_get_a_clear_4xx(app):
    good = canvas_stroke()
    bomb = png_header_only(50_000, 50_000)
    assert to_mnist(good) is not None and len(bomb) < 200
    cases = {
        "not an image": (post(b"just some text, not a picture"), 422, "not an image"),
        "truncated PNG": (post(good[: len(good) // 2]), 422, "corrupt or truncated"),
        "empty body": (post(b""), 422, "empty"),
        "one colour": (post(encode(Image.new("L", (280, 280), 255))), 422, "no digit found"),
        "decompression bomb": (post(bomb), 422, "too large"),
        "text/plain": (post(good, "text/plain"), 415, "unsupported content type 'text/plain'"),
        "JSON": (post(b'{"image": 1}', "application/json"), 415, "unsupported content type"),
        "URL-encoded form (curl -d)": (post(good, "application/x-www-form-urlencoded"), 415, "unsupported"),
        "multipart without a boundary": (post(good, "multipart/form-data"), 400, "boundary"),
        "no field 'file'": ({"method": "POST", "url": "/api/predict",
                             "files": {"picture": ("a.png", good, "image/png")}}, 400, "no file field named 'file'"),
        "'file' is text": ({"method": "POST", "url": "/api/predict", "data": {"file": "digit.png"},
                            "files": {"other": ("a.txt", b"x", "text/plain")}}, 400, "no file field named 'file'"),
        "'file' without a filename": ({"method": "POST", "url": "/api/predict",
                                       "files": {"file": (None, good, "image/png")}}, 400, "curl -F file=@digit.png"),
        "wrong method": ({"method": "GET", "url": "/api/predict"}, 405, "Method Not Allowed"),
        "unknown path": ({"method": "GET", "url": "/api/nothing"}, 404, "Not Found"),
    }
    responses = ask(app, [request for request, _, _ in cases.values()] + [post(good)])
    for (case, (_, status, message)), response in zip(cases.items(), responses):
        assert response.status_code == status, (case, response.text)
        assert message in response.json()["error"], (case, response.text)
    assert responses[list(cases).index("wrong method")].headers["allow"] == "POST"
    # ... and a good picture after all of them is answered.
    assert responses[-1].status_code == 200
    check_answer(responses[-1].json(), good)


def test_a_stalled_upload_gets_a_408_and_its_connection_closed(app, monkeypatch):
    monkeypatch.setattr(serve, "BODY_SECONDS", 0.05)
    stalled = Upload(1, stall=True)
    response = ask(app, [post(stalled)])[0]
    assert response.status_code == 408 and stalled.taken == 1
    assert response.json() == {"error": "the upload stalled: the body was not complete after 0.05 s"}
    assert response.headers["connection"] == "close"


def test_an_upload_cut_off_is_answered_to_nobody_and_logs_nothing(app, caplog):
    """The client goes away after 10 of the 1,000 bytes it announced (a phone off Wi-Fi)."""
    messages = iter([{"type": "http.request", "body": b"\x89PNG\r\n\x1a\n\0\0", "more_body": True},
                     {"type": "http.disconnect"}])
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict", "query_string": b"",
             "root_path": "", "server": ("app", 80), "client": ("127.0.0.1", 5000),
             "headers": [(b"host", b"app"), (b"content-type", b"image/png"), (b"content-length", b"1000")]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert not [record for record in caplog.records if record.levelname in ("ERROR", "CRITICAL")]


def test_a_bug_is_a_json_500_and_the_app_goes_on(reproduced):
    """The catch-all for what must never happen (a failing model call)."""
    predictor = Predictor(reproduced)
    working = predictor.probabilities
    calls = []

    def fails_once(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return working(images)

    predictor.probabilities = fails_once
    first, second = ask(create_app(predictor), [post(canvas_stroke()), post(canvas_stroke())])
    assert first.status_code == 500 and first.json() == {"error": "internal server error"}
    assert second.status_code == 200 and second.json()["manual"]["digit"] in range(10)


# --- corrections (/api/feedback, mnist_dvc/apps/feedback.py's store), in process ----------------

def correction(picture: bytes, label=None, content_type: str = "image/png") -> dict:
    params = {} if label is None else {"label": label}
    return {"method": "POST", "url": "/api/feedback", "params": params, "content": picture,
            "headers": {"Content-Type": content_type}}


def test_corrections_over_http_are_stored_once_201_then_200_with_the_stored_input(predictor, tmp_path):
    app = create_app(predictor, FeedbackStore(tmp_path / "feedback"))
    scans = scanned_digits(6)
    # Six clients at once, each picture sent twice: 6 new (201), then 6 already had (200).
    first = ask(app, [correction(scan, label=d) for d, scan in enumerate(scans)], at_once=True)
    again = ask(app, [correction(scan, label=(d + 1) % 10) for d, scan in enumerate(scans)], at_once=True)
    assert [r.status_code for r in first] == [201] * 6 and [r.status_code for r in again] == [200] * 6
    assert sorted(r.json()["stored"] for r in first) == [1, 2, 3, 4, 5, 6]
    labels = read_feedback_labels(tmp_path / "feedback")
    for d, (scan, response) in enumerate(zip(scans, again)):
        answer = response.json()
        assert answer == {"file": first[d].json()["file"], "label": (d + 1) % 10, "stored": 6}
        assert labels[answer["file"]] == (d + 1) % 10
        assert (tmp_path / "feedback" / answer["file"]).read_bytes() == to_png(to_mnist(scan))
    health = ask(app, [{"method": "GET", "url": "/api/health"}])[0].json()
    assert health["collect"] == {"folder": str(tmp_path / "feedback"), "limit": 10_000}


def test_without_collect_nothing_is_stored_and_the_answer_says_how_to_turn_it_on(predictor, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = create_app(predictor)
    response = ask(app, [correction(scanned_digits(1)[0], label=3)])[0]
    assert response.status_code == 403 and "start it with --collect DIR" in response.json()["error"]
    assert list(tmp_path.iterdir()) == []
    assert ask(app, [{"method": "GET", "url": "/api/health"}])[0].json()["collect"] is None


@pytest.mark.parametrize("request_, status, reason", [
    ({"label": None}, 422, "invalid label: Field required"),
    ({"label": "10"}, 422, "invalid label: Input should be less than or equal to 9"),
    ({"label": "-1"}, 422, "invalid label: Input should be greater than or equal to 0"),
    ({"label": "seven"}, 422, "invalid label: Input should be a valid integer"),
    ({"label": "3", "picture": b"not a picture"}, 422, "the file is not an image in a supported format"),
    ({"label": "3", "picture": b""}, 422, "the file is empty (0 bytes)"),
    ({"label": "3", "picture": "blank"}, 422, "no digit"),
    ({"label": "3", "content_type": "text/plain"}, 415, "unsupported content type"),
    ({"label": "3", "picture": b"\0" * 2_000_001}, 413, "larger than the limit"),
], ids=["missing", "10", "negative", "word", "not-a-picture", "empty", "blank", "text", "too-large"])
def test_every_bad_correction_gets_a_4xx_with_its_reason_and_stores_nothing(predictor, tmp_path, request_,
                                                                            status, reason):
    picture = request_.get("picture", scanned_digits(1)[0])
    if picture == "blank":
        picture = encode(Image.new("L", (100, 100), 255))
    app = create_app(predictor, FeedbackStore(tmp_path))
    response = ask(app, [correction(picture, request_["label"], request_.get("content_type", "image/png"))])[0]
    assert response.status_code == status and reason in response.json()["error"], response.text
    assert read_feedback_labels(tmp_path) == {} and [p.name for p in tmp_path.iterdir()] == [FEEDBACK_LABELS]


def test_a_full_collection_gets_a_409_and_still_takes_relabels(predictor, tmp_path):
    app = create_app(predictor, FeedbackStore(tmp_path, limit=2))
    scans = scanned_digits(3)
    assert [r.status_code for r in ask(app, [correction(s, label=1) for s in scans[:2]])] == [201, 201]
    full = ask(app, [correction(scans[2], label=1)])[0]
    assert full.status_code == 409 and "full (2 pictures)" in full.json()["error"]
    assert ask(app, [correction(scans[0], label=8)])[0].status_code == 200
    assert sorted(read_feedback_labels(tmp_path).values()) == [1, 8]


def test_serve_refuses_a_collect_limit_below_one_in_one_line(capsys):
    with pytest.raises(SystemExit) as caught:
        serve.main(["--collect", "x", "--collect-limit", "0"])
    assert caught.value.code == 2 and "--collect-limit: 0 is below 1" in capsys.readouterr().err


# --- the real server ----------------------------------------------------------------------------

def send_head(port: int, head: bytes, timeout: float = 30) -> bytes:
    """Send only a request head; return the server's answer (until it is complete, closes or the timeout)."""
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
    chunk = Upload.PIECE
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable:
                break
            assert writable, "the server neither read nor answered for 30 s"
            sock.sendall(frame)
            sent += len(chunk)
        while not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return sent, answer


def status_and_json(answer: bytes) -> tuple[int, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_real_server_answers_and_refuses_large_bodies_over_http(reproduced):
    """One uvicorn process: the page, a prediction, and a 413 however the large body comes."""
    server = start_server(reproduced)
    try:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/").status_code == 200
            good = canvas_stroke()
            response = client.post("/api/predict", content=good, headers={"Content-Type": "image/png"})
            assert response.status_code == 200
            check_answer(response.json(), good)
            # Declared over the limit: answered from the head alone, before any of the body is sent ...
            status, body = status_and_json(send_head(server.port, (
                b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1))))
            assert status == 413 and "larger than the limit" in body["error"]
            # ... and a client that sends it all anyway still reads the 413 (uvicorn drops the rest).
            response = client.post("/api/predict", content=os.urandom(3_000_000), headers={"Content-Type": "image/png"})
            assert response.status_code == 413 and "larger than the limit" in response.json()["error"]
            # Chunked without a length: refused while it is still being sent.
            total = 64 * MAX_BODY
            sent, answer = upload_until_answered(server.port, total)
            status, body = status_and_json(answer)
            assert status == 413 and "larger than the limit" in body["error"]
            assert MAX_BODY < sent < total
            # The connection is still good for the next request, and nothing went to the log as an error.
            assert client.post("/api/predict", content=good, headers={"Content-Type": "image/png"}).status_code == 200
        time.sleep(0.3)
        log = "".join(server.stderr)
        assert server.alive()
        assert "Traceback" not in log and "Exception" not in log and "ERROR" not in log, log
    finally:
        server.stop()


def test_missing_models_stop_the_server_before_it_listens(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_file().read_text())
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


def test_the_openapi_schema_documents_the_answers_and_the_label_range(predictor, tmp_path):
    app = create_app(predictor, FeedbackStore(tmp_path))
    schema = ask(app, [{"method": "GET", "url": "/api/openapi.json"}])[0].json()
    predict = schema["paths"]["/api/predict"]["post"]["responses"]
    assert predict["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/PredictAnswer")
    assert predict["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorAnswer")
    feedback = schema["paths"]["/api/feedback"]["post"]
    (label,) = [p for p in feedback["parameters"] if p["name"] == "label"]
    assert label["required"] and label["schema"]["minimum"] == 0 and label["schema"]["maximum"] == 9
    assert {"200", "201", "401", "403", "409", "413", "415", "422"} <= set(feedback["responses"])
    assert set(schema["components"]["schemas"]["Correction"]["properties"]) == {"file", "label", "stored"}

"""serve: draw a digit in the browser; both trained models read it as you draw.

    python -m mnist_dvc.apps.serve [--host 127.0.0.1] [--port 8000] [--root DIR] [--onnx]
    make serve

A FastAPI app on uvicorn. Both models are loaded once, at start-up (an
``inference.Predictor``); without the model files the command stops before
listening, with one line saying to run ``dvc repro`` or ``dvc pull``.

- ``GET /``: the page (``mnist_dvc/apps/static/``: plain HTML, CSS and JavaScript,
  nothing from the network);
- ``POST /api/predict``: one picture, as the raw request body (``Content-Type:
  image/...`` or ``application/octet-stream``) or as a multipart form with a
  ``file`` field; answers ``{"manual": {"digit", "probabilities"}, "skorch":
  {...}, "input": 28 rows of 28 floats}`` (``predict --json``'s answer for a
  picture, without ``path``, plus the 28x28 input the models saw);
- ``GET /api/health``: the backend, each model's file, sha256 and test
  accuracy (metrics/evaluate.json).

Bad input is answered with a 4xx and ``{"error": "one sentence"}``, never a
500: a body over ``MAX_BODY`` bytes gets 413 before it is read (declared
``Content-Length``, or counted while it arrives), a body that stops
arriving 408, a picture ``to_mnist`` cannot use 422, an unsupported content
type 415, a malformed form 400. (uvicorn itself answers a plain-text 503
while it holds ``limit_concurrency`` connections.)

The little CPU work of a request (``to_mnist`` ~2 ms, both forward passes
~0.1 ms) runs inline on the event loop: it is the fastest way on a small
machine, and one picture is decoded at a time, which bounds the memory a
burst of large uploads can take.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import socket
import sys
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mnist_dvc.data import IMAGE_SIDE
from mnist_dvc.apps.images import ImageError, to_mnist, to_png
from mnist_dvc.apps.inference import MODELS, Predictor, describe
from mnist_dvc.stage import StageError

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 2_000_000  # bytes: a canvas drawing is a few kB; the page shrinks big photos before sending
# After a 413, what the client is still sending is read and dropped, at most this much and
# this long, before the connection is closed (nginx's "lingering close"): a client that writes
# its whole request before reading the answer then gets the 413 instead of a connection reset.
LINGER_BYTES = 8 * MAX_BODY
LINGER_SECONDS = 2.0
LINGER_IDLE = 0.5  # ... and no longer than this after the client goes quiet
# A body that stops arriving is answered 408 and its connection closed: a client that
# stalls mid-upload (a phone off Wi-Fi, or on purpose) must not hold a connection for good.
BODY_IDLE_SECONDS = 10.0  # the longest pause between two pieces of a body
BODY_SECONDS = 60.0  # the longest a whole body may take (2 MB at 33 kB/s)
FILE_FIELD = "file"
RAW_TYPES = ("image/", "application/octet-stream")
NAMES = {"manual": "explicit PyTorch loop", "skorch": "skorch NeuralNetClassifier"}
PAGE_HEADERS = {
    # Everything the page uses comes from this server; the 28x28 preview is a canvas,
    # an uploaded picture a blob: URL.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag): an updated page is seen at once
}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# --- request size limit (pure ASGI) ----------------------------------------------------

class BodyTooLarge(Exception):
    """Raised into the app when the body it is reading passes the limit (a 413 is already sent)."""


class BodyTimeout(Exception):
    """Raised into the app when the body it is reading stops arriving (a 408 is already sent)."""


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, without reading them,
    and bodies that stop arriving with 408.

    A declared ``Content-Length`` over the limit is answered at once, before
    any of the body is read (and a client that sent ``Expect: 100-continue``
    never sends it). A body without one (chunked) is counted as the app
    receives it: the 413 goes out as soon as the count passes the limit, and
    the app's reading stops there. Then, at most ``LINGER_BYTES`` or
    ``LINGER_SECONDS`` more of what the client is still sending is dropped
    (until it pauses for ``LINGER_IDLE``) before the connection closes, so
    that the client can read the 413 rather than a connection reset.

    While the app reads a body, each piece must come within
    ``BODY_IDLE_SECONDS`` of the last and the whole within ``BODY_SECONDS``;
    otherwise the answer is a 408 and the connection closes. (uvicorn's own
    timeouts cover idle connections, not a request whose body stalls.)
    """

    def __init__(self, app, limit: int = MAX_BODY):
        self.app, self.limit = app, limit
        self.too_large = json.dumps({"error": f"the request body is larger than the limit "
                                              f"({limit:,} bytes)"}).encode()
        self.too_slow = json.dumps({"error": f"the upload stalled: no data for {BODY_IDLE_SECONDS:g} s, "
                                             f"or not complete after {BODY_SECONDS:g} s"}).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared, expect_continue = None, False
        for name, value in scope["headers"]:
            if name == b"content-length":
                declared = int(value) if value.isdigit() else None  # the HTTP parser rejects bad ones
            elif name == b"expect":
                expect_continue = value.lower() == b"100-continue"
        if declared is not None and declared > self.limit:
            await self._refuse(send, 413, self.too_large)
            if not expect_continue:
                await self._linger(receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return

        received = 0
        started = refused = body_done = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BODY_SECONDS

        async def limited_receive():
            nonlocal received, refused, body_done
            if body_done:  # the app waits for the client to disconnect: no time limit
                return await receive()
            try:
                timeout = max(0.0, min(BODY_IDLE_SECONDS, deadline - loop.time()))
                message = await asyncio.wait_for(receive(), timeout)
            except asyncio.TimeoutError:
                if not started:
                    refused = True
                    await self._refuse(send, 408, self.too_slow)
                raise BodyTimeout("the request body stopped arriving") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.limit:
                    if not started:
                        refused = True
                        await self._refuse(send, 413, self.too_large)
                    raise BodyTooLarge(f"request body over {self.limit} bytes")
            else:
                body_done = True
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return  # the app's own answer to its interrupted read is dropped: the 413 is out
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except Exception:  # noqa: BLE001 - BodyTooLarge, BodyTimeout, or whatever the app turned it into
            if not refused:
                raise
        if refused:
            if received > self.limit:
                await self._linger(receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _refuse(send, status: int, body: bytes) -> None:
        """The refusal's head and body; the response ends (and the connection closes) later."""
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body, "more_body": True})

    @staticmethod
    async def _linger(receive) -> None:
        loop = asyncio.get_running_loop()
        deadline, dropped = loop.time() + LINGER_SECONDS, 0
        try:
            while dropped < LINGER_BYTES:
                timeout = min(deadline - loop.time(), LINGER_IDLE)
                if timeout <= 0:
                    return
                message = await asyncio.wait_for(receive(), timeout)
                if message["type"] != "http.request":
                    return
                dropped += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
        except (asyncio.TimeoutError, OSError):
            return


# --- the app -----------------------------------------------------------------------------

class Static(StaticFiles):
    """Static files with the page's headers."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def image_bytes(request: Request) -> bytes:
    """The picture's bytes: the raw body, or the form's ``file`` field. Raises HTTPException."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "multipart/form-data":
        if content_type and not content_type.startswith(RAW_TYPES):
            raise HTTPException(415, f"unsupported content type {content_type!r}: send the picture as the "
                                     f"request body with Content-Type image/png, image/jpeg, ... or "
                                     f"application/octet-stream, or as a multipart form field named {FILE_FIELD!r}")
        return await request.body()
    # A part without a filename is a text field: up to the whole body's limit, so that a
    # picture sent that way is answered for what it is, not for its size.
    async with request.form(max_files=1, max_fields=8, max_part_size=MAX_BODY) as form:
        upload = form.get(FILE_FIELD)
        if upload is None:
            raise HTTPException(400, f"the form has no file field named {FILE_FIELD!r}")
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, f"the form field {FILE_FIELD!r} holds text, not a file: "
                                     f"upload the picture as a file (a part with a filename)")
        return await upload.read()


def create_app(predictor: Predictor) -> BodyLimit:
    """The ASGI app over loaded models: FastAPI, wrapped in the body-size limit."""
    hashes, accuracy = predictor.file_hashes(), predictor.test_accuracy()
    backend = "onnx" if predictor.onnx else "pytorch"
    health = json.dumps({
        "status": "ok",
        "backend": backend,
        "max_body_bytes": MAX_BODY,
        "models": {name: {"description": NAMES[name], "file": predictor.files[name],
                          "sha256": hashes[name], "test_accuracy": accuracy[name]}
                   for name in MODELS},
    }).encode()
    page = (STATIC / "index.html").read_bytes()

    # No Swagger UI: it loads its scripts from a CDN, and the app must work offline.
    app = FastAPI(title="mnist-dvc: draw a digit", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return JSONResponse({"error": f"invalid request: {first}", "detail": jsonable_encoder(errors)},
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never bad input. Starlette raises it again after this answer, and uvicorn
        # logs it with its traceback; the server goes on.
        return error(500, "internal server error")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/api/health")
    async def get_health() -> Response:
        """The backend, and each model's file, sha256 and test accuracy."""
        return Response(health, media_type="application/json")

    @app.post("/api/predict")
    async def predict(request: Request) -> Response:
        """Both models' answers for one picture: raw body (image/*) or multipart field ``file``."""
        try:
            data = await image_bytes(request)
        except ClientDisconnect:
            # The client went away mid-upload: nobody reads this answer; it only keeps the
            # disconnect out of the server's log as an "Exception in ASGI application".
            return error(400, "the upload was cut off before its end")
        try:
            image = to_mnist(data)
        except ImageError as exc:
            return error(422, str(exc))
        probabilities = predictor.probabilities(image[None])
        answer = {name: describe(rows[0]) for name, rows in probabilities.items()}
        answer["input"] = image.tolist()
        return Response(json.dumps(answer).encode(), media_type="application/json")

    app.mount("/static", Static(directory=STATIC), name="static")
    return BodyLimit(app)


def warm_up(predictor: Predictor) -> None:
    """One picture through the whole path, so the first visitor does not pay for lazy imports."""
    stroke = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    stroke[4:24, 13:16] = 1
    predictor.probabilities(to_mnist(to_png(stroke))[None])


def keep_freed_memory() -> None:
    """Let glibc keep the few MB a request allocates and frees, instead of returning them each time.

    By default, arrays over 128 kB (a 280x280 float32 picture is 314 kB) are
    fresh ``mmap``s and the heap's top is trimmed as soon as 256 kB are
    free, so every request pays page faults again: ``to_mnist`` took 2.7 ms
    instead of 2.1 ms (importing torch happens to raise both thresholds, so
    only the ONNX server felt it). Allocations of 4 MB or more (a big
    photo) are still returned to the system when freed. Elsewhere than
    glibc, nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. Raises OSError.

    Connections made from now on wait in the backlog until the server accepts them.
    """
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_dvc.apps.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, "
                                                            "this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    parser.add_argument("--root", type=Path, default=Path("."), metavar="DIR",
                        help="the project folder holding models/, params.yaml and metrics/ (default: .)")
    parser.add_argument("--onnx", action="store_true", help="use models/*.onnx with ONNX Runtime instead of PyTorch")
    args = parser.parse_args(argv)

    keep_freed_memory()
    try:
        predictor = Predictor(args.root, onnx=args.onnx, threads=1)
        warm_up(predictor)
        server = uvicorn_server(create_app(predictor))
        sock = listen(args.host, args.port)
        # The ~250,000 objects of torch, FastAPI and the models live as long as the process:
        # out of the garbage collector's view, a full collection no longer stalls a request ~0.1 s.
        gc.collect()
        gc.freeze()
    except StageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130

    host, port = sock.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    accuracy = ", ".join(f"{name} {value:.2%}" for name, value in predictor.test_accuracy().items()
                         if value is not None)
    print(f"mnist-dvc: {'ONNX Runtime' if args.onnx else 'PyTorch'} models from {args.root.resolve()}"
          + (f" (test accuracy: {accuracy})" if accuracy else ""))
    print(f"Serving on http://{url_host}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl+C: uvicorn has stopped serving; nothing more to say
        pass
    return 0


def uvicorn_server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                            limit_concurrency=100, timeout_keep_alive=5, timeout_graceful_shutdown=3,
                            server_header=False)
    return uvicorn.Server(config)


if __name__ == "__main__":
    sys.exit(main())

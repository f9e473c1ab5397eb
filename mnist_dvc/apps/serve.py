"""serve: draw a digit in the browser; both trained models read it as you draw.

    python -m mnist_dvc.apps.serve [--host 127.0.0.1] [--port 8000] [--root DIR] [--onnx]
                                   [--collect DIR [--collect-limit N] [--collect-token T]]
                                   [--stage prod [--poll S]]
    make serve

A FastAPI app on uvicorn: the page (``static/``), ``POST /api/predict``,
``POST /api/feedback`` (with ``--collect``), ``GET /api/health`` and ``GET /api/model``.
The models are loaded once, before listening; with ``--stage`` they are the
version a GTO stage names, and a ``Follower`` swaps in the next one when the
stage moves. Bad input gets a 4xx with ``{"error": "one sentence"}``, never a 500.
Endpoints, answers and limits: docs/web-app.md; ``--stage`` and the collection
token: docs/registry.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
from pathlib import Path

import anyio
import anyio.to_thread
import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from mnist_dvc.data import IMAGE_SIDE, N_CLASSES
from mnist_dvc.apps.feedback import DEFAULT_LIMIT, FeedbackStore, StoreFull
from mnist_dvc.apps.images import ImageError, to_mnist, to_png
from mnist_dvc.apps.inference import Predictor, Served, answer_of, load_release
from mnist_dvc.apps.registry import ARTIFACTS, RegistryError, release_of, sha256_of, version_in_stage
from mnist_dvc.stage import StageError

STATIC = Path(__file__).resolve().parent / "static"
MAX_BODY = 2_000_000  # bytes: a canvas drawing is a few kB; the page shrinks big photos before sending
TOO_LARGE = f"the request body is larger than the limit ({MAX_BODY:,} bytes)"
# uvicorn's timeouts cover idle connections, not a body that stalls: a client that stops
# mid-upload gets a 408 after this long, and its connection closed.
BODY_SECONDS = 30.0
# Worker threads reading pictures at once: two pictures are read on two cores while the event
# loop serves HTTP, and a burst of large uploads decodes only that many, which bounds its memory.
READERS = 2
FILE_FIELD = "file"  # curl -F file=@digit.png
POLL_SECONDS = 5.0  # --poll: how often --stage reads the registry
TOKEN_ENV = "MNIST_DVC_COLLECT_TOKEN"  # the collection token, kept out of `ps` and shell history
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


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- the models a registry stage names (--stage) ---------------------------------------

class Follower:
    """The models of the version a GTO stage names, swapped in whole when the stage moves.

    ``current`` is replaced by one assignment once the new models are loaded and warm: a request
    takes it once and is answered wholly by that version. A version that cannot be loaded is not
    swapped in: the old one keeps serving, one line says why, ``last_error`` keeps it.
    """

    def __init__(self, root: Path, stage: str, onnx: bool = False, log=to_stderr):
        self.root, self.stage, self.onnx, self.log = Path(root), stage, onnx, log
        self.current: Served | None = None
        self.last_error: str | None = None
        self._refused: str | None = None  # the version (or the reason) refused and logged: once, not each poll

    def check(self) -> bool:
        """Read the registry; load and swap in the stage's version if it moved. True if it swapped."""
        served = self.current
        try:
            version = version_in_stage(self.root, self.stage)
            if version is None:
                return self._refuse(f"no version is in stage {self.stage!r} (promote one first)")
            if served and version == served.release.version:
                self._refused = None  # back on the served version: a refused one is tried again if named again
                return False  # a version is one commit for good: nothing moved
            if version == self._refused:
                return False  # refused already, and said so once
            release = release_of(self.root, version)
        except Exception as exc:  # a RegistryError, or gto's own, e.g. for a tag made by hand that it cannot parse
            reason = str(exc) if isinstance(exc, RegistryError) else f"{type(exc).__name__}: {exc}"
            return self._refuse(f"the registry cannot be read: {reason}")
        try:
            loaded = load_release(self.root, release, self.stage, onnx=self.onnx)
            warm_up(loaded.predictor)
        except StageError as exc:
            return self._refuse(str(exc), release)
        self.current, self.last_error, self._refused = loaded, None, None
        was = f", was {served.release.version}" if served else ""
        self.log(f"mnist-dvc: serving {release.version} ({release.commit[:7]}) of stage {self.stage}{was}")
        return True

    def _refuse(self, reason: str, release=None) -> bool:
        """Keep serving what is served; ``last_error`` says why, and one line says it once."""
        self.last_error = f"{release.version} ({release.commit[:7]}): {reason}" if release else reason
        key = release.version if release else reason
        if key != self._refused:
            self._refused = key
            still = f"; still serving {self.current.release.version}" if self.current else ""
            what = f"not serving {self.last_error}" if release else f"cannot follow stage {self.stage!r}: {reason}"
            self.log(f"mnist-dvc: {what}{still}")
        return False

    def follow(self, every: float, stop: threading.Event) -> None:
        """Check the registry every ``every`` seconds in a daemon thread, until ``stop`` is set."""
        def loop():
            while not stop.wait(every):
                try:
                    self.check()
                except Exception as exc:  # a bug, not a bad version: say it, keep serving, keep following
                    self._refuse(f"the registry check failed: {type(exc).__name__}: {exc}")
        threading.Thread(target=loop, name=f"follow-{self.stage}", daemon=True).start()


# --- the answers' shapes, for the OpenAPI schema (/api/openapi.json) -----------------------
# The handlers build their JSON directly (pre-encoded bytes, no validation on the way out):
# these models only document it.

class ModelAnswer(BaseModel):
    digit: int
    probabilities: list[float]  # ten, summing to 1


class PredictAnswer(BaseModel):
    manual: ModelAnswer
    skorch: ModelAnswer
    input: list[list[float]]  # the 28x28 input the models saw, in [0, 1]
    model_version: str | None = None  # with --stage: the registry version that answered


class Correction(BaseModel):
    file: str  # <sha256>.png in the --collect folder
    label: int
    stored: int  # pictures held now


class ErrorAnswer(BaseModel):
    error: str  # one sentence


ERRORS = {status: {"model": ErrorAnswer} for status in (400, 408, 413, 415, 422)}


# --- the app -----------------------------------------------------------------------------

class Static(StaticFiles):
    """Static files with the page's headers."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update(PAGE_HEADERS)
        return response


async def upload(request: Request) -> bytes:
    """The picture's bytes: the raw body, or the form's ``file`` field. Raises HTTPException.

    The body is read whole first (FastAPI counts it against ``max_body_size``),
    within ``BODY_SECONDS``; a form is then parsed from memory.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form = content_type == "multipart/form-data"
    if not form and content_type and not content_type.startswith(RAW_TYPES):
        raise HTTPException(415, f"unsupported content type {content_type!r}: send the picture as the "
                                 f"request body with Content-Type image/png, image/jpeg, ... or "
                                 f"application/octet-stream, or as a form file field named {FILE_FIELD!r}")
    try:
        async with asyncio.timeout(BODY_SECONDS):
            body = await request.body()
    except TimeoutError:
        raise HTTPException(408, f"the upload stalled: the body was not complete after {BODY_SECONDS:g} s",
                            headers={"Connection": "close"}) from None
    except ClientDisconnect:
        # The client went away mid-upload: nobody reads this answer; it only keeps the
        # disconnect out of the server's log as an "Exception in ASGI application".
        raise HTTPException(400, "the upload was cut off before its end") from None
    if not form:
        return body
    async with request.form(max_files=1, max_fields=1) as fields:
        field = fields.get(FILE_FIELD)
        if not isinstance(field, UploadFile):
            raise HTTPException(400, f"the form has no file field named {FILE_FIELD!r}: "
                                     f"send the picture as curl -F {FILE_FIELD}=@digit.png does")
        return await field.read()


def model_input(data: bytes) -> np.ndarray:
    """A picture's bytes as the models' 28x28 input; HTTPException(422) with the reason if unusable."""
    try:
        return to_mnist(data)
    except ImageError as exc:
        raise HTTPException(422, str(exc)) from None


def refuse_declared_oversize(app: FastAPI):
    """``app`` behind one check: a declared ``Content-Length`` over MAX_BODY gets the JSON 413 at once.

    FastAPI's ``max_body_size`` refuses it too, but in plain text, past the
    app's exception handlers (docs/web-app.md#errors).
    """
    async def checked(scope, receive, send):
        if scope["type"] == "http":
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BODY:
                return await error(413, TOO_LARGE)(scope, receive, send)
        await app(scope, receive, send)
    return checked


def bearer_matches(request: Request, token: str) -> bool:
    """The request's ``Authorization: Bearer <token>`` is ``token`` (compared in constant time)."""
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def create_app(predictor: Predictor | None, store: FeedbackStore | None = None, follower: Follower | None = None,
               collect_token: str | None = None):
    """The ASGI app over loaded models: FastAPI with its body-size limit, behind the declared-size check.

    ``store``: where ``POST /api/feedback`` saves corrections (``--collect``); None stores nothing.
    ``follower``: the models of a registry stage (``--stage``), in place of ``predictor``.
    ``collect_token``: what ``POST /api/feedback`` must send as ``Authorization: Bearer``; None: nothing.
    """
    token = collect_token or None
    collect = None if store is None else {"folder": str(store.folder), "limit": store.limit,
                                          **({"token_required": True} if token else {})}
    page = (STATIC / "index.html").read_bytes()
    readers = anyio.CapacityLimiter(READERS)

    if follower is None:  # the workspace's models/: no version, stage or commit to name
        files = {path: predictor.root / path for path in ARTIFACTS.values()}
        sha256 = {path: (sha256_of(file) if file.is_file() else None) for path, file in files.items()}
        workspace = Served(None, None, predictor, sha256, predictor.test_accuracy())

    def current() -> Served:
        return follower.current if follower else workspace

    async def off_loop(func, *args):
        """``func(*args)`` in a worker thread, at most READERS at a time (the CPU work of a request)."""
        return await anyio.to_thread.run_sync(func, *args, limiter=readers)

    def answer(data: bytes) -> bytes:
        served = current()  # taken once: the whole answer is one version's
        image = model_input(data)
        result = {name: answer_of(rows[0]) for name, rows in served.predictor.probabilities(image[None]).items()}
        result["input"] = image.tolist()
        if served.release:
            result["model_version"] = served.release.version
        return json.dumps(result).encode()

    # No Swagger UI: it loads its scripts from a CDN, and the app must work offline.
    app = FastAPI(title="mnist-dvc: draw a digit", docs_url=None, redoc_url=None,
                  openapi_url="/api/openapi.json", max_body_size=MAX_BODY)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = TOO_LARGE if exc.status_code == 413 else str(exc.detail)  # Starlette's: "Content Too Large"
        return error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]  # FastAPI raises it with at least one error, each with a "loc" and a "msg"
        return JSONResponse({"error": f"invalid {first['loc'][-1]}: {first['msg']}",
                             "detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, never bad input. Starlette raises it again after this answer, and uvicorn
        # logs it with its traceback; the server goes on.
        return error(500, "internal server error")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/api/health")
    async def get_health() -> JSONResponse:
        """The backend, each model's file, sha256 and test accuracy, and where corrections are saved."""
        served = current()
        health = {
            "status": "ok",
            "backend": "onnx" if served.predictor.onnx else "pytorch",
            "max_body_bytes": MAX_BODY,
            "models": {name: {"description": NAMES[name], "file": file, "sha256": served.sha256[file],
                              "test_accuracy": served.accuracy[name]}
                       for name, file in served.predictor.files.items()},
            "collect": collect,
        }
        if served.release:
            health["model_version"] = served.release.version
        return JSONResponse(health)

    @app.get("/api/model")
    async def get_model() -> JSONResponse:
        """Each artifact's name, version, stage, commit and file sha256; the registry's last error."""
        served = current()
        version, commit = (served.release.version, served.release.commit) if served.release else (None, None)
        in_use = set(served.predictor.files.values())
        return JSONResponse({"stage": served.stage, "version": version, "commit": commit,
                             "last_error": follower.last_error if follower else None,
                             "artifacts": [{"name": name, "version": version, "stage": served.stage, "commit": commit,
                                            "path": path, "sha256": served.sha256[path], "in_use": path in in_use}
                                           for name, path in ARTIFACTS.items()]})

    @app.post("/api/predict", responses={200: {"model": PredictAnswer}, **ERRORS})
    async def predict(request: Request) -> Response:
        """Both models' answers for one picture: raw body (image/*) or multipart field ``file``."""
        return Response(await off_loop(answer, await upload(request)), media_type="application/json")

    @app.post("/api/feedback", status_code=201, responses={
        201: {"model": Correction, "description": "a new picture"},
        200: {"model": Correction, "description": "a picture already stored: its label replaced"},
        **{status: {"model": ErrorAnswer} for status in (401, 403, 409, 507)}, **ERRORS})
    async def feedback(request: Request, label: int = Query(ge=0, le=N_CLASSES - 1,
                                                            description="the right digit")) -> Response:
        """Store a correction: the picture (as for /api/predict) and its right digit, ``?label=N``."""
        if store is None:
            return error(403, "this server does not collect corrections: start it with --collect DIR "
                              "(e.g. make serve SERVE_ARGS=\"--collect data/feedback/pictures\")")
        if token is not None and not bearer_matches(request, token):
            return error(401, "this server needs the collection token: send it as Authorization: Bearer <token>",
                         {"WWW-Authenticate": "Bearer"})
        data = await upload(request)
        try:
            stored = await off_loop(lambda: store.add(model_input(data), label))
        except StoreFull as exc:
            return error(409, str(exc))
        except (OSError, StageError) as exc:  # the disk, or labels.csv changed by hand: not the request's fault
            return error(507, f"the correction could not be saved in {store.folder}: {exc}")
        return JSONResponse({"file": stored.file, "label": stored.label, "stored": stored.total},
                            status_code=201 if stored.created else 200)

    app.mount("/static", Static(directory=STATIC), name="static")
    return refuse_declared_oversize(app)


def warm_up(predictor: Predictor) -> None:
    """One picture through the whole path, so the first visitor does not pay for lazy imports."""
    stroke = np.zeros((IMAGE_SIDE, IMAGE_SIDE), np.float32)
    stroke[4:24, 13:16] = 1
    predictor.probabilities(to_mnist(to_png(stroke))[None])


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) reaches this machine only."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 picks a free one. Raises OSError.

    Bound before the URL is printed: it names the real port, and a client that
    connects at once waits in the backlog until uvicorn accepts it.
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
    parser.add_argument("--collect", type=Path, metavar="DIR",
                        help="save the corrections people send (POST /api/feedback) in DIR, e.g. "
                             "data/feedback/pictures; without it nothing is stored")
    parser.add_argument("--collect-limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                        help=f"the most pictures --collect keeps (default: {DEFAULT_LIMIT})")
    parser.add_argument("--collect-token", metavar="TOKEN", default=os.environ.get(TOKEN_ENV),
                        help=f"what POST /api/feedback must send as Authorization: Bearer (default: ${TOKEN_ENV}, "
                             "which keeps it out of `ps`); needed for --collect on any address but loopback")
    parser.add_argument("--stage", metavar="STAGE",
                        help="serve the version this GTO stage names (e.g. prod), fetched by DVC at its commit, "
                             "and follow the stage as it moves (docs/registry.md); default: the workspace's models/")
    parser.add_argument("--poll", type=float, default=POLL_SECONDS, metavar="S",
                        help=f"with --stage: read the registry every S seconds (default: {POLL_SECONDS:g})")
    args = parser.parse_args(argv)
    if args.collect_limit < 1:
        parser.error(f"argument --collect-limit: {args.collect_limit} is below 1")
    if not 0 < args.poll < float("inf"):  # NaN too
        parser.error(f"argument --poll: {args.poll:g} is not a positive number of seconds")
    if args.collect is not None and not args.collect_token and not is_loopback(args.host):
        parser.error(f"--collect on {args.host} lets anyone who reaches it change what the models learn: "
                     f"give a token (${TOKEN_ENV}, or --collect-token), or listen on 127.0.0.1")

    follower = None
    try:
        if args.stage:
            follower = Follower(args.root, args.stage, onnx=args.onnx, log=lambda line: None)
            follower.check()  # at start, a refusal is the error below, not a log line
            if follower.current is None:
                raise StageError(f"stage {args.stage!r}: {follower.last_error}")
            follower.log = to_stderr
            predictor, accuracy, release = (follower.current.predictor, follower.current.accuracy,
                                            follower.current.release)
            origin = (f"{release.version} ({release.commit[:7]}), stage {args.stage} of {args.root.resolve()}, "
                      f"checked every {args.poll:g} s")
        else:
            predictor = Predictor(args.root, onnx=args.onnx)
            warm_up(predictor)
            accuracy, origin = predictor.test_accuracy(), str(args.root.resolve())
        store = None if args.collect is None else FeedbackStore(args.collect, args.collect_limit)
        app = create_app(None if follower else predictor, store, follower, args.collect_token)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                               limit_concurrency=100, timeout_keep_alive=5,
                                               timeout_graceful_shutdown=3, server_header=False))
        sock = listen(args.host, args.port)
        # torch's, FastAPI's and the models' objects live as long as the process: out of the
        # collector's view, a full collection no longer stalls a request (docs/web-app.md#performance).
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
    known = ", ".join(f"{name} {value:.2%}" for name, value in accuracy.items() if value is not None)
    print(f"mnist-dvc: {'ONNX Runtime' if args.onnx else 'PyTorch'} models from {origin}"
          + (f" (test accuracy: {known})" if known else ""))
    if store is not None:
        print(f"Saving corrections in {store.folder} ({store.count()} so far, at most {store.limit})"
              + ("; they need the collection token" if args.collect_token else ""))
    stop = threading.Event()
    if follower:
        follower.follow(args.poll, stop)
    print(f"Serving on http://{f'[{host}]' if ':' in host else host}:{port}/ (Ctrl+C to stop)", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl+C: uvicorn has stopped serving; nothing more to say
        pass
    finally:
        stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())

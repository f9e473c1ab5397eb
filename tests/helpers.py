"""Plain helpers the tests share: the tiny MNIST, params.yaml edits, commands, pictures, servers.

Fixtures live in ``conftest.py`` (and the S3 server's in the ``s3server``
plugin); everything here is an ordinary function or constant, imported as
``from helpers import ...`` (pyproject puts ``tests`` on the path).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gzip
import hashlib
import io
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from filelock import FileLock

from mnist_dvc.data import RAW_FILES

REPO = Path(__file__).resolve().parent.parent
N_TRAIN = 1500  # of load_digits' 1,797; the other 297 are the test set
# What a project copy needs to run the pipeline: tracked sources, no data (write_params writes params.yaml).
PROJECT_FILES = ["stages", "mnist_dvc", "dvc.yaml", ".dvc/config", ".dvc/.gitignore",
                 ".dvc/plots", ".dvcignore", ".gitignore", "data/feedback/.gitignore"]
# Small settings so a whole pipeline runs in seconds on the fixture data.
FAST_PARAMS = {
    "download.retries": 2,
    "download.timeout": 5.0,
    "download.backoff": 0.01,
    "preprocess.val_size": 200,
    "train.epochs": 2,
    "tune.subset_size": 300,
    "tune.cv": 2,
    "tune.grid.lr": [0.001, 0.01],
    "tune.grid.hidden": [[32]],
    "tune.grid.max_epochs": [2],
}
# The reproduced project trains at the defaults (5 epochs, batch 64, the
# tutorial's MLP) on all training images, like `make repro`: no validation split.
REPRODUCED_OVERRIDES = {"preprocess__val_size": 0, "train__epochs": 5}


# --- the tiny MNIST ---------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8, 1-D labels or N x H x W images) as a gzipped IDX file."""
    magic = 0x800 + array.ndim
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    with gzip.GzipFile(path, "wb", mtime=0) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def mnist_style(digit: np.ndarray) -> np.ndarray:
    """One small digit (floats, ink > 0) drawn the way MNIST's were: the ink's longer side
    scaled to 20 px (aspect ratio kept, smooth), centred by centre of mass in 28x28."""
    from PIL import Image
    from scipy import ndimage

    rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
    ink = digit[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    height, width = ink.shape
    scale = 20 / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = np.asarray(Image.fromarray(ink, mode="F").resize(size, Image.BILINEAR)).clip(0, None)
    out = np.zeros((28, 28), np.float32)
    top, left = (28 - size[1]) // 2, (28 - size[0]) // 2
    out[top:top + size[1], left:left + size[0]] = small
    dy, dx = np.round(np.array([14.0, 14.0]) - ndimage.center_of_mass(out)).astype(int)
    out = np.roll(out, (dy, dx), axis=(0, 1))
    return out / out.max()


def tiny_mnist_arrays() -> dict[str, np.ndarray]:
    """load_digits (1,797 handwritten 8x8 digits) drawn like MNIST: 28x28 uint8 images, 0..9 labels.

    Drawn once per process (about a second), then copied: a caller may change its arrays.
    """
    return {key: array.copy() for key, array in _drawn_tiny_mnist().items()}


@functools.cache
def _drawn_tiny_mnist() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.stack([mnist_style(d) for d in digits.images])
    images = np.round(images * 255).astype(np.uint8)
    labels = digits.target.astype(np.uint8)
    return {
        "train_images": images[:N_TRAIN],
        "train_labels": labels[:N_TRAIN],
        "test_images": images[N_TRAIN:],
        "test_labels": labels[N_TRAIN:],
    }


def write_mirror(folder: Path, arrays: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Write the four gzipped IDX files into ``folder``; return their md5s by params key."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = arrays if arrays is not None else tiny_mnist_arrays()
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])
    return {key: md5_of(folder / name) for key, name in RAW_FILES.items()}


# --- what git HEAD holds: never what `dvc exp run` or `dvc repro` left in the workspace ---

def committed(path: str) -> str:
    """The text of ``path`` (relative to this checkout) as git HEAD holds it.

    A user's workspace may hold an applied experiment (`dvc exp run` and `dvc exp
    apply` write its params.yaml, metrics and models there), and the tests must
    pass all the same. A file HEAD lacks (no git, or not committed yet) is read
    from the workspace.
    """
    result = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True, text=True)
    return result.stdout if result.returncode == 0 else (REPO / path).read_text()


def with_values_of(head, workspace):
    """``workspace``'s keys (nested dicts), each with ``head``'s value where ``head`` has the key."""
    if not (isinstance(head, dict) and isinstance(workspace, dict)):
        return head
    return {key: with_values_of(head[key], value) if key in head else value for key, value in workspace.items()}


def committed_params() -> dict:
    """params.yaml as git HEAD holds it, and any key the workspace's file adds to it.

    An experiment changes values: HEAD's are taken. A section or key being
    written (with the code that reads it) is tested before it is committed:
    it is taken from the workspace, and a key it removed is gone.
    """
    from ruamel.yaml import YAML

    load = YAML(typ="safe", pure=True).load  # YAML 1.2, as DVC and the stages read it: `1e-3` is a number
    return with_values_of(load(committed("params.yaml")), load((REPO / "params.yaml").read_text()))


@functools.cache
def committed_params_file() -> Path:
    """A file that holds ``committed_params()``, for the loaders that read a path (one per process)."""
    folder = Path(tempfile.mkdtemp(prefix="committed-params-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(committed_params(), sort_keys=False))
    return path


# --- params.yaml ----------------------------------------------------------------------

def set_key(params: dict, dotted: str, value) -> Any:
    """``params["a"]["b"] = value`` for ``dotted`` "a.b"; the value it had (None where there was none)."""
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node[part]
    before = node.get(last)
    node[last] = value
    return before


def edit_params(path: Path | str, changes: dict[str, Any]) -> dict[str, Any]:
    """Set each dotted key of ``changes`` in the YAML file ``path``; return the values they had."""
    path = Path(path)
    params = yaml.safe_load(path.read_text())
    before = {dotted: set_key(params, dotted, value) for dotted, value in changes.items()}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return before


def write_params(folder: Path, mirror_url: str, md5: dict[str, str], **overrides) -> Path:
    """The project's params.yaml (``committed_params()``), pointed at ``mirror_url`` with FAST_PARAMS
    and ``overrides``.

    Override keys use ``__`` for dots: ``train__lr=0.01``.
    """
    path = folder / "params.yaml"
    shutil.copyfile(committed_params_file(), path)
    edit_params(path, {"download.mirrors": [mirror_url], "download.md5": dict(md5), **FAST_PARAMS,
                       **{key.replace("__", "."): value for key, value in overrides.items()}})
    return path


def sections_with(changes: dict, path: Path | str = "params.yaml"):
    """The model and train sections of ``path`` (default: the cwd's params.yaml; the project's:
    ``committed_params_file()``) with ``changes`` applied, e.g.
    ``{"train": {"schedule": "cosine", "augment": {"shift": 2}}}``."""
    from mnist_dvc.params import load_section

    sections = {name: load_section(name, path) for name in ("model", "train")}
    for name, update in changes.items():
        update = dict(update)
        if "augment" in update:
            update["augment"] = sections[name].augment.model_copy(update=update["augment"])
        sections[name] = sections[name].model_copy(update=update)
    return sections["model"], sections["train"]


# --- commands: stages of this checkout, git and dvc -------------------------------------

def checkout_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with this checkout on PYTHONPATH, so that
    ``python -m stages.<name>`` and ``python -m mnist_dvc.apps.<app>`` run it from any folder."""
    return {**(os.environ if base is None else base), "PYTHONPATH": str(REPO)}


def stage_command(name: str) -> list[str]:
    """The command dvc.yaml runs for a stage, ``python -m stages.<name>``."""
    return [sys.executable, "-m", f"stages.{name}"]


def run_stage_script(name: str, *args: str, cwd: Path, check: bool = True, **kwargs):
    """Run the stage ``name`` of this checkout as DVC would, with ``cwd`` as the project folder."""
    result = subprocess.run(
        [*stage_command(name), *args], cwd=cwd, env=checkout_env(), capture_output=True, text=True, **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"stage {name} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tool_env() -> dict[str, str]:
    """The environment for git/dvc: this venv's bin first, so dvc.yaml's `python` is ours."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.invalid",
               GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.invalid",
               DVC_NO_ANALYTICS="1", PYTHONPATH="")
    return env


DVC = str(Path(sys.executable).parent / "dvc")  # this venv's dvc


def sh(*cmd, cwd: Path, check: bool = True, timeout: float = 600,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command (git, dvc) in ``cwd`` with ``env`` (default: ``tool_env()``); on failure show its output."""
    cmd = [str(part) for part in cmd]
    result = subprocess.run(cmd, cwd=cwd, env=tool_env() if env is None else env, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    return sh(DVC, *args, cwd=cwd, **kwargs)


def copy_sources(dest: Path) -> None:
    """PROJECT_FILES, from this checkout's working tree, into ``dest`` (benchmarks/pipeline_time.py too)."""
    for name in PROJECT_FILES:
        src, dst = REPO / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)


def make_project(dest: Path, mirror: tuple[Path, dict[str, str]], **overrides) -> Path:
    """A git repository with the project's sources and a fast params.yaml, committed."""
    dest.mkdir(parents=True, exist_ok=True)
    copy_sources(dest)
    folder, md5 = mirror
    write_params(dest, folder.as_uri() + "/", md5, **overrides)
    sh("git", "init", "-q", "-b", "main", cwd=dest)
    sh("git", "add", "-A", cwd=dest)
    sh("git", "commit", "-q", "-m", "project", cwd=dest)
    return dest


def ran_stages(output: str) -> set[str]:
    """Stage names that `dvc repro` / `dvc exp run` says it ran."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


# --- pictures ---------------------------------------------------------------------------

def encode(image, fmt: str = "PNG", **save_options) -> bytes:
    """``image`` (a PIL image, or a uint8 array) as the bytes of a ``fmt`` file."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_options)
    return buffer.getvalue()


def scanned_digits(count: int = 6) -> list[bytes]:
    """Fixture test digits, dark on light and enlarged to 280x280, like a scan (PNG)."""
    from PIL import Image

    images = tiny_mnist_arrays()["test_images"][:count]
    return [encode(Image.fromarray(255 - image).resize((280, 280), Image.BICUBIC)) for image in images]


def canvas_stroke() -> bytes:
    """A vertical stroke as the page draws it: dark, 20 px, round caps, on a transparent 280x280 canvas."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.line([(140, 50), (140, 230)], fill=(17, 24, 39, 255), width=20)
    for y in (50, 230):
        draw.ellipse([130, y - 10, 150, y + 10], fill=(17, 24, 39, 255))
    return encode(img)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (1-bit grey) and holds a few bytes of pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


# --- the web app in process, and as a real server process -----------------------------------

def ask(app, requests: list[dict], at_once: bool = False) -> list:
    """``requests`` (httpx.AsyncClient.request keywords) sent to the ASGI ``app`` in this process
    (httpx's ASGI transport), one after the other or all ``at_once``; their responses, in order."""
    import asyncio

    import httpx

    async def send_all():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            if at_once:
                return await asyncio.gather(*(client.request(**request) for request in requests))
            return [await client.request(**request) for request in requests]
    return asyncio.run(send_all())



SERVER_START_TIMEOUT = 60  # s; start-up is ~3 s, more when the other xdist worker trains


class Server:
    """``python -m mnist_dvc.apps.serve`` on a free port; ``stop()`` ends it."""

    def __init__(self, root: Path, *args: str):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mnist_dvc.apps.serve", "--root", str(root), "--port", "0", *args],
            cwd=REPO, env=checkout_env(),
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
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            for line in list(self.stdout):
                if line.startswith("Serving on http://"):
                    return line.split()[2].rstrip("/")
            if self.process.poll() is not None:
                self.process.wait()
                time.sleep(0.1)  # let the readers collect the last lines
                return None
            time.sleep(0.05)
        raise AssertionError(f"the server printed no URL within {SERVER_START_TIMEOUT} s: {self.stdout} {self.stderr}")

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
    import httpx

    server = Server(root, *args)
    if server.url is None:
        raise AssertionError(f"the server exited {server.process.returncode}: {''.join(server.stderr)}")
    response = httpx.get(f"{server.url}/api/health", timeout=30)
    assert response.status_code == 200, response.text
    return server


# --- headless Chromium (Debian's, through its own chromedriver; Selenium never downloads one) ---

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Every host name unresolvable and every request sent to a closed port: a page that needs the
# network (a CDN script, a web font) shows it, as it would on a machine with no internet.
OFFLINE_ARGUMENTS = ("--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                     "--proxy-bypass-list=<-loopback>")


def missing_browser() -> str | None:
    """Why headless Chromium cannot run here (a skip reason), or None."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        return (f"no browser for this test: {', '.join(missing)} not installed "
                "(Debian: apt-get install chromium chromium-driver)")
    return None


def chromium(profile_dir: Path, width: int = 1180, height: int = 860, offline: bool = False):
    """Headless Chromium with the system driver, logging the console; ``offline``: no host is reachable."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile_dir / 'profile'}",
                     f"--window-size={width},{height}", "--force-device-scale-factor=1",
                     *(OFFLINE_ARGUMENTS if offline else ())):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def shared_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test run, whichever xdist worker asks first; the folder.

    Under pytest-xdist every worker has its own basetemp below one shared
    parent: the folder lives in that parent, and a lock makes the others wait
    for the first build instead of repeating it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (root / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (root / f"{name}.done").touch()
    return folder

"""download: fetch the four gzipped MNIST IDX files into data/raw/, md5-verified.

In:  params.yaml ``download`` (dvc.yaml lists only ``download.md5``: the md5s decide the files).
Out: data/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

Each file is tried on every mirror in order, ``retries`` times with exponential
backoff, except where a retry cannot help (an HTTP 4xx, a ``file://`` mirror).
Only a file whose md5 matches is renamed into place. When every attempt fails,
one error lists each URL tried and why, and what to do offline. No torch here.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mnist_dvc.data import RAW_FILES
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, atomic_path, parse_paths, run_stage

CHUNK = 1 << 16
# HTTP answers that may change on a retry; any other 4xx will not.
RETRYABLE_CLIENT_ERRORS = {408, 425, 429}
OFFLINE_HINT = ("No internet? Put the four .gz files in a folder and list it first in download.mirrors "
                "as file:///path/to/folder/ (README.md, section \"No internet?\").")


class Md5Mismatch(Exception):
    """The downloaded bytes are not the expected file."""


def fetch(url: str, dest: Path, expected_md5: str, timeout: float) -> None:
    """Stream ``url`` into ``dest`` (a temporary path), checking length and md5."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as response, dest.open("wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length else None
        # disable=None: a bar only on a terminal, never in logs.
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False, disable=None) as bar:
            received = 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if total is not None and received != total:
        raise Md5Mismatch(f"truncated: received {received} of {total} bytes")
    if digest.hexdigest() != expected_md5:
        raise Md5Mismatch(f"md5 mismatch: expected {expected_md5}, got {digest.hexdigest()}")


def failure_reason(exc: Exception) -> str:
    """A short reason for a failed attempt."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return str(exc) or type(exc).__name__


def is_permanent(url: str, exc: Exception) -> bool:
    """Whether retrying ``url`` after ``exc`` would fail the same way."""
    if url.startswith("file:"):
        return True  # a missing, unreadable or corrupt local file stays so
    if isinstance(exc, urllib.error.HTTPError):
        return 400 <= exc.code < 500 and exc.code not in RETRYABLE_CLIENT_ERRORS
    return False


def download_file(name: str, expected_md5: str, out_dir: Path, params) -> None:
    """Fetch ``name`` from the first mirror that serves it with the right md5."""
    failures = []
    for mirror in params.mirrors:
        url = mirror.rstrip("/") + "/" + name
        for attempt in range(params.retries):
            if attempt:
                time.sleep(params.backoff * 2 ** (attempt - 1))
            try:
                with atomic_path(out_dir / name) as tmp:
                    fetch(url, tmp, expected_md5, params.timeout)
                return
            except (OSError, http.client.HTTPException, Md5Mismatch, ValueError) as exc:
                line = f"  {url} (attempt {attempt + 1}/{params.retries}): {failure_reason(exc)}"
                if is_permanent(url, exc):
                    failures.append(line + " (not retried: a retry would give the same)")
                    break
                failures.append(line)
    raise StageError(f"could not download {name} from any mirror:\n" + "\n".join(failures) + "\n" + OFFLINE_HINT)


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(__doc__, argv, out="data/raw")
    params = load_section("download")
    for key, name in RAW_FILES.items():
        download_file(name, getattr(params.md5, key), args.out, params)
        print(f"{name}: md5 {getattr(params.md5, key)} verified")


if __name__ == "__main__":
    run_stage(main)

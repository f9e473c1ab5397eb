"""download: fetch the four gzipped MNIST IDX files into data/raw/, md5-verified.

In:  params.yaml ``download`` (mirrors, md5, retries, timeout, backoff).
Out: data/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

dvc.yaml lists only ``download.md5`` as this stage's params: the md5s decide
the files, wherever they come from, so a mirror of one's own reruns nothing
and no path of this machine is recorded in dvc.lock.

Each file is tried on every mirror in order, ``retries`` times per mirror with
exponential backoff. A failure that cannot change on a retry is not retried:
an HTTP 4xx answer (the file is not there, or not for us), and anything from a
``file://`` mirror (a missing or corrupt local file stays so). Bytes stream
into a temporary file while their md5 is computed; only a file whose md5
matches is renamed into place, so a failed, truncated or corrupt download
never leaves a valid-looking file behind. When every attempt fails, one error
lists each URL tried and why, and ends with what to do offline.

This stage needs no torch: it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from mnist_dvc.data import RAW_FILES
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError, atomic_path, run_stage

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
        # disable=None: a bar only on a terminal; in logs (CI, dvc output piped) it
        # would bury the one-line error under carriage-return fragments.
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False,
                  disable=None) as bar:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args(argv)
    params = load_section("download")
    args.out.mkdir(parents=True, exist_ok=True)
    for key, name in RAW_FILES.items():
        download_file(name, getattr(params.md5, key), args.out, params)
        print(f"{name}: md5 {getattr(params.md5, key)} verified")


if __name__ == "__main__":
    run_stage(main)

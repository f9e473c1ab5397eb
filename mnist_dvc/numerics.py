"""The CPU numerics of every process that writes a versioned output: ``pin()`` before ``import torch``.

``portable`` (``numerics.cpu``) gives the same bits on every x86-64 CPU, ``native``
this CPU's fastest kernels; both pin the threads (docs/reproducibility.md, "What is
pinned, and why"). torch, MKL and OpenMP read these once, when they load. Only the
standard library here.
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


def mode_in(params_file: Path | str = "params.yaml") -> str:
    """``numerics.cpu`` of ``params_file``; the default where it cannot be read (the stage's validation says why)."""
    try:
        from ruamel.yaml import YAML

        mode = YAML(typ="safe", pure=True).load(Path(params_file).read_text(encoding="utf-8"))["numerics"]["cpu"]
    except Exception:  # noqa: BLE001 - any problem: the stage's own validation names it
        return DEFAULT
    return mode if mode in MODES else DEFAULT


def pin(mode: str | None = None) -> str:
    """Set ``mode``'s environment (default: params.yaml's) before torch loads; returns the mode. Once torch
    is imported, its kernels are chosen: another mode cannot be set, and ``check`` refuses to run."""
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
    if any(os.environ.get(key) != value for key, value in environment(mode).items()):
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

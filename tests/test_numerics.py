"""The CPU numerics every stage pins before torch loads (mnist_dvc/numerics.py), whatever the caller's environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import REPO, edit_params, tool_env
from mnist_dvc import numerics
from mnist_dvc.model import configure_torch
from mnist_dvc.stage import StageError

FOREIGN = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "TRUE"}
# What a stage's process sees once the stages package is imported, and the kernels torch then uses.
PROBE = ("import json, os, stages, torch; "
         "print(json.dumps({'env': {k: os.environ.get(k) for k in %r}, "
         "'capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads()}))")


def stage_process_sees(workdir) -> dict:
    env = {**tool_env(), **FOREIGN, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", PROBE % (sorted(FOREIGN),)], cwd=workdir, env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_stage_process_pins_portable_numerics_whatever_the_environment_says(workdir):
    seen = stage_process_sees(workdir)
    assert seen["env"] == {**numerics.environment("portable")}
    assert seen["threads"] == 1
    if numerics.describe_cpu().get("isa") in ("AVX2", "AVX-512"):
        assert seen["capability"] == "AVX2"  # capped, also on an AVX-512 CPU


def test_native_numerics_take_the_libraries_own_choice_and_still_pin_the_threads(workdir):
    edit_params(workdir / "params.yaml", {"numerics.cpu": "native"})
    seen = stage_process_sees(workdir)
    assert seen["env"] == {key: value for key, value in numerics.environment("native").items()}
    assert seen["env"]["ATEN_CPU_CAPABILITY"] is None and seen["env"]["MKL_CBWR"] is None
    assert seen["threads"] == 1


def test_torch_loaded_with_other_settings_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # as if the process had started with it, before torch
    with pytest.raises(StageError, match=r"numerics.cpu = 'portable', but torch was loaded with other CPU "
                                         r"settings: start the process .* anew"):
        configure_torch(1, "cpu", "portable")
    monkeypatch.undo()
    configure_torch(1, "cpu", "portable")  # the test process itself is pinned (conftest.py)


def test_a_bad_numerics_value_names_the_key(workdir):
    edit_params(workdir / "params.yaml", {"numerics.cpu": "fast"})
    from mnist_dvc.params import load_section

    with pytest.raises(StageError, match=r"numerics.cpu = 'fast': Input should be 'portable' or 'native'"):
        load_section("numerics")

"""Nothing unsafe is loaded, and an interrupted stage never leaves a half-written output."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers import DVC, checkout_env, dvc, run_stage_script, stage_command, tool_env, write_params
from mnist_dvc.model import build_mlp
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError
from stages import evaluate as evaluate_stage
from stages import fit as fit_stage
from stages import train as train_stage


class CodeOnLoad:
    """A pickle that would run a shell command when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("tampered", ["models/mlp.pt", "models/skorch_params.pt"])
def test_tampered_model_file_is_refused_and_its_code_never_runs(prepared, tampered):
    models = prepared / "models"
    models.mkdir()
    state = build_mlp(load_section("model"), seed=0).state_dict()  # the shape params.yaml asks for
    for name in ("mlp.pt", "skorch_params.pt"):
        torch.save(state, models / name)
    marker = prepared / "code-ran"
    torch.save({"layers.1.weight": CodeOnLoad(marker)}, prepared / tampered)

    # In this process: a StageError is the stage's one-line exit 1 (run_stage; test_params runs one).
    with pytest.raises(StageError, match=rf"^{re.escape(tampered)}: refused to load"):
        evaluate_stage.main([])

    assert not marker.exists()
    assert not (prepared / "metrics/evaluate.json").exists()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def epochs_logged(folder: Path, stage: str = "train") -> int:
    """Epochs a running stage has logged: DVCLive writes into a new folder beside metrics/<stage>."""
    logged = [len(tsv.read_text().splitlines()) - 1
              for tsv in (folder / "metrics").glob(f".{stage}.*.tmp/plots/metrics/train/loss.tsv")]
    return max([0, *logged])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


STAGES = {"train": (train_stage, "models/mlp.pt"), "fit": (fit_stage, "models/skorch_params.pt")}


@pytest.mark.parametrize("stage", ["train", "fit"])
def test_an_interrupted_training_keeps_the_previous_model_and_metrics_and_leaves_no_partial_file(
        prepared, mirror, stage):
    # skorch's fit catches KeyboardInterrupt, stops early and returns normally: a Ctrl-C
    # there once saved a half-trained model and exited 0. DVCLive writes as it goes.
    module, model_path = STAGES[stage]
    module.main([])  # a good model first (in-process: only the interrupted runs need their own process)
    good_model, good_metrics = (prepared / model_path).read_bytes(), tree(prepared / "metrics" / stage)
    assert good_metrics
    folder, md5 = mirror
    write_params(prepared, folder.as_uri() + "/", md5, train__epochs=1000)
    for sig, reason in ((signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")):
        process = subprocess.Popen(stage_command(stage), cwd=prepared, env=checkout_env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: epochs_logged(prepared, stage) >= 2, 60, "two epochs of the long run")
            process.send_signal(sig)
            _, stderr = process.communicate(timeout=30)
        finally:
            process.kill()
        assert process.returncode == 130, (reason, stderr)
        assert stderr.strip().splitlines()[-1] == f"interrupted ({reason}): no output was replaced", stderr
        assert "Traceback" not in stderr
        assert (prepared / model_path).read_bytes() == good_model, reason
        assert tree(prepared / "metrics" / stage) == good_metrics, reason
        assert not [p.name for p in (prepared / "models").iterdir() if p.name.startswith(".")]
        assert not [p.name for p in (prepared / "metrics").iterdir() if p.name.startswith(".")]


def test_a_training_that_fails_keeps_the_previous_model_and_metrics(prepared, mirror):
    train_stage.main([])
    good_model, good_metrics = (prepared / "models/mlp.pt").read_bytes(), tree(prepared / "metrics/train")
    folder, md5 = mirror
    # Refused inside train(), once DVCLive has started, on any machine (the CPU forced).
    write_params(prepared, folder.as_uri() + "/", md5, train__cuda_graph="on", train__device="cpu")
    result = run_stage_script("train", cwd=prepared, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: train.cuda_graph = 'on' cannot be used with no CUDA device (train.device); set it to 'auto' or 'off'"]
    assert (prepared / "models/mlp.pt").read_bytes() == good_model
    assert tree(prepared / "metrics/train") == good_metrics
    assert not [p.name for p in (prepared / "metrics").iterdir() if p.name.startswith(".")]


@pytest.mark.e2e
def test_interrupted_dvc_repro_leaves_the_last_good_model_recoverable_with_dvc_checkout(copy_project, mirror):
    repo = copy_project()
    good = (repo / "models/mlp.pt").read_bytes()
    folder, md5 = mirror
    write_params(repo, folder.as_uri() + "/", md5, train__epochs=1000)
    process = subprocess.Popen([DVC, "repro", "train"], cwd=repo,
                               env=tool_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        wait_for(lambda: epochs_logged(repo) >= 2, 120, "the train stage to log two epochs")
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole process group
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0, output
    model = repo / "models/mlp.pt"
    assert not model.exists() or model.read_bytes() == good, "no half-written model"
    assert not list((repo / "models").glob(".*.tmp"))

    dvc("checkout", "models/mlp.pt", cwd=repo)
    assert model.read_bytes() == good

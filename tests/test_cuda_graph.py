"""train.cuda_graph: the option and its choice on any machine; the captured step itself on a GPU.

The GPU tests need CUDA and are skipped without it, saying so; CI has no GPU,
so they ran on a device machine (docs/performance.md has the figures).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from helpers import committed_params_file, edit_params, sections_with
from mnist_dvc.data import load_split
from mnist_dvc.model import build_mlp, build_optimizer, loss_and_accuracy, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.stage import StageError
from stages import fit as fit_stage
from stages import train as train_stage
from stages import tune
from mnist_dvc.cuda_graph import CudaGraphStep, cuda_graph_obstacle, use_cuda_graph

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def sections(model=None, **train):
    """The project's model and train sections, ``train`` keys changed."""
    return sections_with({"model": model or {}, "train": train}, committed_params_file())


def test_the_defaults_can_be_captured():
    assert load_section("train", committed_params_file()).cuda_graph == "auto"
    assert cuda_graph_obstacle(*sections()) is None


@pytest.mark.parametrize("changes, named", [
    ({"optimizer": "sgd"}, "train.optimizer"),
    ({"schedule": "cosine"}, "schedule"),
    ({"warmup": 0.1}, "warm-up"),
    ({"augment": {"shift": 2}}, "train.augment"),
    ({"augment": {"rotate": 5.0}}, "train.augment"),
    ({"model": {"dropout": 0.2}}, "model.dropout"),
])
def test_settings_the_graph_cannot_capture_are_named(changes, named):
    assert named in cuda_graph_obstacle(*sections(**changes))


def test_on_a_cpu_auto_and_off_use_the_eager_loop_silently(capsys):
    for value in ("auto", "off"):
        assert use_cuda_graph(*sections(cuda_graph=value), CPU) is False
    assert capsys.readouterr().out == ""


def test_on_without_a_gpu_or_with_an_uncapturable_setting_is_an_error_naming_the_key():
    with pytest.raises(StageError, match=r"train.cuda_graph = 'on' cannot be used with no CUDA device"):
        use_cuda_graph(*sections(cuda_graph="on"), CPU)
    with pytest.raises(StageError, match=r"train.cuda_graph = 'on' cannot be used with train.augment"):
        use_cuda_graph(*sections(cuda_graph="on", augment={"shift": 1}), CUDA)


# --- on a GPU ---------------------------------------------------------------

def random_data(n: int = 1000, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 28, 28, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return images.to(CUDA), labels.to(CUDA)


@needs_cuda
def test_graph_replays_learn_bit_for_bit_what_the_eager_loop_learns_including_the_last_partial_batch():
    model_params, train_params = sections(batch_size=64)
    images, labels = random_data(1000)  # 15 full batches of 64 and one of 40
    eager = build_mlp(model_params, 0).to(CUDA)
    eager_optimizer = build_optimizer(eager.parameters(), train_params)
    graphed = build_mlp(model_params, 0).to(CUDA)
    step = CudaGraphStep(graphed, build_optimizer(graphed.parameters(), train_params, capturable=True),
                         images, labels, 64)
    # The warm-up's updates were undone: the graph starts from the same weights.
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(a, b)
    eager_generators, graph_generators = train_stage.seeded_generators(0), train_stage.seeded_generators(0)
    for _ in range(3):
        eager_loss = train_stage.train_epoch(eager, eager_optimizer, images, labels, train_params, eager_generators)
        graph_loss = step.epoch(train_stage.batch_order(len(images), graph_generators["batches"], CUDA))
        assert graph_loss == eager_loss
    # The same kernels on the same data in the same order: bit for bit (on an
    # H100, also after 5 epochs of full MNIST).
    for a, b in zip(eager.parameters(), graphed.parameters()):
        assert torch.equal(a, b)


@needs_cuda
def test_train_and_fit_on_the_gpu_learn_the_fixture_digits(prepared, capsys):
    model_params, train_params = load_section("model"), load_section("train").model_copy(update={"device": "cuda"})
    train_split = load_split(prepared / "data/processed", "train")
    val_split = load_split(prepared / "data/processed", "val")
    test_images, test_labels = load_split(prepared / "data/processed", "test")
    assert use_cuda_graph(model_params, train_params, CUDA) is True
    model = train_stage.train(model_params, train_params, train_split, val_split)
    assert next(model.parameters()).device.type == "cuda"
    _, graph_accuracy = loss_and_accuracy(predict_logits(model, test_images.to(CUDA), 1000).cpu(), test_labels)
    net = fit_stage.fit(model_params, train_params, train_split, val_split)
    _, fit_accuracy = loss_and_accuracy(predict_logits(net.module_, test_images.to(CUDA), 1000).cpu(), test_labels)
    assert graph_accuracy > 0.8 and fit_accuracy > 0.8  # load_digits is easy; chance is 0.1
    assert abs(graph_accuracy - fit_accuracy) < 0.05
    # With a setting the graph cannot capture, auto trains eagerly and says why.
    train_stage.train(model_params.model_copy(update={"dropout": 0.1}), train_params, train_split, val_split)
    assert "train.cuda_graph: the eager loop, because of model.dropout" in capsys.readouterr().out


@needs_cuda
def test_an_epoch_of_graph_replays_syncs_with_the_host_once_at_its_end():
    model_params, train_params = sections(batch_size=64)
    images, labels = random_data(64 * 20 + 40)  # 20 replays and an eager partial batch
    model = build_mlp(model_params, 0).to(CUDA)
    step = CudaGraphStep(model, build_optimizer(model.parameters(), train_params, capturable=True), images, labels, 64)
    order = torch.randperm(len(images)).to(CUDA)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # every host sync warns
        try:
            loss = step.epoch(order)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the mean loss's .item(), at the end
    assert 0 < loss < 10


@needs_cuda
def test_tune_runs_its_fits_on_the_gpu_in_two_worker_processes(prepared):
    edit_params(prepared / "params.yaml", {"train.device": "cuda", "tune.n_jobs": 2})
    tune.main([f"--metrics={prepared}/tune.json", f"--results={prepared}/tune.csv", f"--plot={prepared}/tune.png"])
    assert json.loads((prepared / "tune.json").read_text())["best_score"] > 0.5

"""The train stage's step as one CUDA graph on a GPU (``train.cuda_graph``: auto | on | off).

The fast variant of stages/train.py's loop (the reference), bit-identical to it
(tests/test_cuda_graph.py), never used on the CPU. Why and how, and the
figures: docs/performance.md, "The GPU path".
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mnist_dvc.model import needs_scheduler
from mnist_dvc.stage import StageError


class CudaGraphStep:
    """The whole training step on one full batch, captured once as a CUDA graph and replayed.

    torch.cuda.graphs' documented pattern, the warm-up's updates undone. An epoch's last, partial
    batch runs eagerly through the same model and optimizer, so the batches are the eager loop's.
    """

    WARMUP_STEPS = 3

    def __init__(self, model, optimizer, images, labels, batch_size: int):
        self.model, self.optimizer, self.images, self.labels = model, optimizer, images, labels
        self.index = torch.zeros(batch_size, dtype=torch.long, device=images.device)
        self.loss_sum = torch.zeros((), device=images.device)  # summed over the epoch, on the device
        initial = [p.detach().clone() for p in model.parameters()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), eager_capturable_steps():
            for _ in range(self.WARMUP_STEPS):
                optimizer.zero_grad(set_to_none=True)
                self._step(self.index)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for param, value in zip(model.parameters(), initial):
                param.copy_(value)
            for state in optimizer.state.values():
                assert set(state) <= {"step", "exp_avg", "exp_avg_sq"}, set(state)  # a fresh Adam's: all zero
                for tensor in state.values():
                    tensor.zero_()
        # Gradients set to None before capture: backward then allocates them
        # from the graph's memory pool, and each replay overwrites them.
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(self.index)

    def _step(self, batch: torch.Tensor) -> None:
        loss = F.cross_entropy(self.model(self.images[batch]), self.labels[batch])
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.detach() * len(batch)

    def epoch(self, order: torch.Tensor, desc: str = "") -> float:
        """One pass over ``images[order]``; returns the mean training loss."""
        self.model.train()
        batch_size = len(self.index)
        full = len(order) // batch_size * batch_size
        self.loss_sum.zero_()
        for start in tqdm(range(0, full, batch_size), desc=desc, leave=False, mininterval=0.5, disable=None):
            self.index.copy_(order[start : start + batch_size])
            self.graph.replay()
        if full < len(order):  # the last, partial batch: eagerly
            self.optimizer.zero_grad(set_to_none=True)
            with eager_capturable_steps():
                self._step(order[full:])
        return self.loss_sum.item() / len(order)


@contextlib.contextmanager
def eager_capturable_steps():
    """Silence torch's warning that a capturable optimizer also steps outside a graph: here it is meant to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="This instance was constructed with capturable=True")
        yield


def cuda_graph_obstacle(model_params, train_params) -> str | None:
    """Why the step cannot be captured with these settings, or None when it can."""
    if train_params.optimizer not in ("adam", "adamw"):
        return f"train.optimizer = {train_params.optimizer!r} (the graph captures Adam and AdamW)"
    if needs_scheduler(train_params):
        return "a learning-rate schedule or warm-up (the graph captures a constant learning rate)"
    if train_params.augment.shift or train_params.augment.rotate:
        return "train.augment (drawn on the CPU for every batch)"
    if model_params.dropout:
        return "model.dropout (its masks come from the model's own generator)"
    return None


def use_cuda_graph(model_params, train_params, device: torch.device) -> bool:
    """Whether ``train.cuda_graph`` (auto | on | off) captures the step on ``device``."""
    if train_params.cuda_graph == "off":
        return False
    obstacle = "no CUDA device (train.device)" if device.type != "cuda" else cuda_graph_obstacle(
        model_params, train_params)
    if obstacle is None:
        return True
    if train_params.cuda_graph == "on":
        raise StageError(f"train.cuda_graph = 'on' cannot be used with {obstacle}; set it to 'auto' or 'off'")
    if device.type == "cuda":
        print(f"train.cuda_graph: the eager loop, because of {obstacle}")
    return False

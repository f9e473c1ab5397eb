"""The MLP both trainings share, and the few torch settings around it.

``MLP`` returns raw logits (the loss everywhere is ``CrossEntropyLoss``). Every
random draw of a training comes from an explicit generator seeded by
``train.seed``, so the explicit loop and skorch learn the same weights
(docs/design.md, "Both trainings, bit for bit").
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_dvc import numerics
from mnist_dvc.data import IMAGE_SIDE, N_CLASSES
from mnist_dvc.stage import StageError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
IN_FEATURES = IMAGE_SIDE * IMAGE_SIDE
# Dropout masks draw from their own stream, apart from the init's.
DROPOUT_SEED_OFFSET = 2_000_003


class SeededDropout(nn.Module):
    """``nn.Dropout``'s arithmetic, with masks from a generator of its own, seeded by ``seed``.

    ``nn.Dropout`` draws from torch's global RNG, which anything may have moved
    (skorch, ``nn.Linear``'s constructor): these masks depend only on the seed
    and the order of the forward passes.
    """

    def __init__(self, p: float, seed: int):
        super().__init__()
        self.p, self.seed = p, seed
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=x.dtype) >= self.p
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, seed={self.seed}"


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation [-> SeededDropout]`` per hidden size, then ``Linear`` to 10 logits."""

    def __init__(self, hidden=(128,), activation="relu", dropout=0.0, seed=0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = IN_FEATURES
        for i, size in enumerate(hidden):
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(SeededDropout(dropout, seed + DROPOUT_SEED_OFFSET + i))
            width = size
        layers.append(nn.Linear(width, N_CLASSES))
        self.layers = nn.Sequential(*layers)
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """nn.Linear's default init (Kaiming-uniform, a=sqrt(5)), from a generator seeded by ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                bound = 1 / math.sqrt(layer.in_features)
                nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def build_mlp(model_params, seed: int) -> MLP:
    """An MLP from the ``model:`` section of params.yaml."""
    return MLP(model_params.hidden, model_params.activation, model_params.dropout, seed)


def optimizer_kwargs(train_params) -> dict:
    """Keyword arguments of the chosen optimizer beyond ``lr``; ``fused``: one kernel for the whole
    update (docs/performance.md), in both trainings, so they stay bit-identical to each other."""
    # weight_decay is always given: AdamW's own default (0.01) never applies silently.
    kwargs = {"fused": True, "weight_decay": train_params.weight_decay}
    if train_params.optimizer == "sgd":
        kwargs["momentum"] = train_params.momentum
    return kwargs


def build_optimizer(parameters, train_params, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``, with ``train.lr``; ``capturable`` for a CUDA graph."""
    kwargs = optimizer_kwargs(train_params)
    if capturable:
        kwargs["capturable"] = True
    return OPTIMIZERS[train_params.optimizer](parameters, lr=train_params.lr, **kwargs)


def needs_scheduler(train_params) -> bool:
    """Whether the learning rate changes during training (the tutorial's stays constant)."""
    return train_params.schedule != "constant" or train_params.warmup > 0


def schedule_steps(train_params, n_train: int, epochs: int | None = None) -> int:
    """Optimizer steps over ``epochs`` (default ``train.epochs``) passes of ``n_train`` images."""
    return (epochs or train_params.epochs) * math.ceil(n_train / train_params.batch_size)


class LRFactor:
    """The multiplier of ``train.lr`` at each step (``LambdaLR``): a linear warm-up, then constant or a
    cosine down to 0 at ``total_steps``. A class, not a closure, so that a net holding it pickles."""

    def __init__(self, schedule: str, warmup_steps: int, total_steps: int):
        self.schedule, self.warmup_steps, self.total_steps = schedule, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_scheduler(optimizer, schedule: str, warmup: float, total_steps: int, last_epoch: int = -1):
    """The per-batch learning-rate scheduler of ``train.schedule``, for both trainings
    (skorch: the ``policy`` of its ``LRScheduler`` callback, ``step_every="batch"``)."""
    from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

    if schedule == "onecycle":
        # Up from train.lr / 25 to train.lr over the first `warmup` of the steps, then down (cosine).
        return OneCycleLR(optimizer, max_lr=[group["lr"] for group in optimizer.param_groups],
                          total_steps=total_steps, pct_start=warmup, last_epoch=last_epoch)
    return LambdaLR(optimizer, LRFactor(schedule, round(warmup * total_steps), total_steps), last_epoch=last_epoch)


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def configure_torch(threads: int, device: torch.device | str = "cpu", cpu_numerics: str | None = None) -> None:
    """Pin the CPU thread count (the same count, the same bits); with ``cpu_numerics`` (``numerics.cpu``),
    a StageError unless torch was loaded with that mode's kernels (mnist_dvc/numerics.py)."""
    if cpu_numerics is not None:
        try:
            numerics.check(cpu_numerics)
        except RuntimeError as exc:
            raise StageError(str(exc)) from None
    torch.set_num_threads(threads)
    # As training converges, gradients and Adam moments turn denormal: many times slower on x86
    # (docs/performance.md). Results are unchanged.
    torch.set_flush_denormal(True)
    # Only CUDA has non-deterministic kernels for these ops; the call imports torch's compiler stack (1 s).
    if torch.device(device).type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)


# The two trained models, by their keys in metrics/evaluate.json, and the stage that trains each.
TRAINED_BY = {"manual": "train", "skorch": "fit"}


def load_mlp(model_params, path) -> MLP:
    """The ``model:`` section's MLP with a state_dict file's weights (``weights_only=True``), in eval mode;
    ``pickle.UnpicklingError`` or ``ValueError`` for another file, ``RuntimeError`` for another ``model:``'s."""
    model = build_mlp(model_params, seed=0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    check_state_dict(state)
    model.load_state_dict(state)
    return model.eval()


def check_finite_loss(loss: float, epoch: int) -> None:
    """A StageError once an epoch's training loss is NaN or infinite: the stage must not save the model."""
    if not math.isfinite(loss):
        raise StageError(f"training diverged: train/loss is {loss} after epoch {epoch}; lower train.lr "
                         f"(or warm up: train.warmup); no output was replaced")


def check_state_dict(state) -> None:
    """Raise ValueError unless ``state`` is a dict of finite floating-point tensors: ``weights_only=True`` lets
    through None, a list, integer tensors (silently truncated by ``load_state_dict``) and NaN weights."""
    if not isinstance(state, dict):
        found = "None" if state is None else type(state).__name__
        raise ValueError(f"the file does not hold a state dict but {found}")
    for key, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"the file does not hold a state dict: {key!r} is {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise ValueError(f"{key} is {tensor.dtype}, not floating point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{key} holds NaN or infinite values")


def load_trained(name: str, model_params, path: Path) -> MLP:
    """``load_mlp`` for the model ``name`` ("manual" or "skorch"), or a StageError that names the file."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: model not found (run the {TRAINED_BY[name]} stage)")
    try:
        return load_mlp(model_params, path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        # weights_only=True refuses anything but tensors; a size mismatch
        # means the model section changed since the model was trained.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        # load_state_dict's error is a header, then one line per problem: keep the first problem too.
        reason = " ".join(lines[:2]) if lines[0].startswith("Error(s) in loading state_dict") else lines[0]
        raise StageError(f"{path}: refused to load as {name} model weights: {reason.rstrip('.')} "
                         f"(rerun the {TRAINED_BY[name]} stage)") from None


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits for ``images`` in eval mode, ``batch_size`` at a time."""
    model.eval()
    return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``logits`` against ``labels``."""
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(dim=1) == labels).float().mean().item()
    return loss, accuracy

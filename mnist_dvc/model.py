"""The MLP both trainings share, and the few torch settings around it.

``MLP`` returns raw logits; the loss everywhere is ``CrossEntropyLoss``
(log-softmax + NLL in one numerically stable step). Its weights are drawn
from an explicit ``torch.Generator`` seeded by ``seed``, with the same
distributions as ``nn.Linear``'s default, so two builds with the same seed
are identical whatever the global RNG has done.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_dvc.data import IMAGE_SIDE, N_CLASSES
from mnist_dvc.stage import StageError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
IN_FEATURES = IMAGE_SIDE * IMAGE_SIDE


class MLP(nn.Module):
    """Flatten, then ``Linear -> activation [-> Dropout]`` per hidden size, then ``Linear`` to 10 logits."""

    def __init__(self, hidden=(128,), activation="relu", dropout=0.0, seed=0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = IN_FEATURES
        for size in hidden:
            layers += [nn.Linear(width, size), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
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
    """Keyword arguments of the chosen optimizer beyond ``lr``.

    ``fused``: one kernel updates every parameter, instead of a handful of
    ops per tensor; at batch 64, per-step overhead dominates, and epochs on a
    2-core CPU went from 1.4 s to 1.0 s. Both trainings use it, so they stay
    bit-identical to each other.
    """
    kwargs = {"fused": True}
    if train_params.optimizer == "sgd":
        kwargs["momentum"] = train_params.momentum
    return kwargs


def build_optimizer(parameters, train_params) -> torch.optim.Optimizer:
    """The optimizer named by ``train.optimizer``, with ``train.lr``."""
    return OPTIMIZERS[train_params.optimizer](parameters, lr=train_params.lr, **optimizer_kwargs(train_params))


def resolve_device(name: str) -> torch.device:
    """'auto' means CUDA when available, else CPU; 'cuda' without a GPU is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("train.device = 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


def configure_torch(threads: int, device: torch.device | str = "cpu") -> None:
    """Pin the CPU thread count: with the same count, CPU results are bit-identical."""
    torch.set_num_threads(threads)
    # As training converges, some gradients and Adam moments become denormal
    # floats, which x86 CPUs process many times slower: without this, epochs
    # slowed from 1.35 s to 2.2 s on a 2-core CPU. Results were unchanged.
    torch.set_flush_denormal(True)
    # Only CUDA has non-deterministic kernels for the ops used here. The call
    # imports torch's compiler stack (1 s of every stage's start-up), so CPU
    # runs, bit-identical without it, skip it.
    if torch.device(device).type == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)


# The two trained models, by their keys in metrics/evaluate.json, and the stage that trains each.
TRAINED_BY = {"manual": "train", "skorch": "fit"}


def load_mlp(model_params, path) -> MLP:
    """The MLP of the ``model:`` section with the weights of a state_dict file, in eval mode.

    Both trainings save a plain state_dict (skorch's ``save_params`` writes
    ``module_.state_dict()``). ``weights_only=True``: tensors only, never
    pickled code. A file that is not such a state_dict, or one trained with
    another ``model:`` section, raises ``pickle.UnpicklingError`` or ``RuntimeError``.
    """
    model = build_mlp(model_params, seed=0)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_trained(name: str, model_params, path: Path) -> MLP:
    """``load_mlp`` for the model ``name`` ("manual" or "skorch"), or a StageError that names the file."""
    import pickle

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: model not found (run the {TRAINED_BY[name]} stage)")
    try:
        return load_mlp(model_params, path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        # weights_only=True refuses anything but tensors; a size mismatch
        # means the model section changed since the model was trained.
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"{path}: refused to load as {name} model weights: {reason}") from None


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

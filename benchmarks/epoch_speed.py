"""Seconds per epoch: the tutorial's DataLoader style vs the train and fit stages.

All three train the same MLP (params.yaml ``model``) with the same
``train:`` settings on the same MNIST files, in one process, with the same
number of torch threads, and report seconds per epoch and test accuracy:

- tutorial: ``torchvision.datasets.MNIST`` + ``transforms.ToTensor()`` +
  ``DataLoader(shuffle=True)``, the classic loop: per-sample Python work;
- train:    the train stage's loop (``stages/train.py``), in-memory tensors;
- fit:      the fit stage's skorch net (``mnist_dvc/skorch_net.py``);
- on CUDA also the train loop with its step captured as a CUDA graph
  (``train.cuda_graph``, ``CudaGraphStep`` in mnist_dvc/cuda_graph.py).

With ``--memory`` it also runs the preprocess, train, fit and evaluate
stages as subprocesses (outputs to a temporary folder) and reports each
one's peak resident memory.

Usage (after `make repro`, or point --raw at any folder with the four .gz files):
    .venv/bin/python benchmarks/epoch_speed.py [--raw data/raw] [--epochs 5] [--memory]
    .venv/bin/python benchmarks/epoch_speed.py --device cuda --batch-sizes 64 256 1024
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "stages")]

from mnist_dvc.data import RAW_FILES, read_raw_pair  # noqa: E402
from mnist_dvc.model import (  # noqa: E402
    build_mlp, build_optimizer, configure_torch, loss_and_accuracy, lr_scheduler, needs_scheduler, predict_logits,
    resolve_device, schedule_steps,
)
from mnist_dvc.params import load_section  # noqa: E402
from mnist_dvc.skorch_net import build_net  # noqa: E402
from mnist_dvc.cuda_graph import CudaGraphStep, cuda_graph_obstacle  # noqa: E402
from stages.train import batch_order, seeded_generators, train_epoch  # noqa: E402


def tensors(raw: Path, split: str):
    images, labels = read_raw_pair(raw, split)
    return torch.from_numpy(images).float().div_(255), torch.from_numpy(labels).long()


def tutorial(raw: Path, model_params, train_params, epochs: int, test, device):
    """The classic loop: a torchvision dataset decoded per sample, batched by a DataLoader."""
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "MNIST" / "raw"
        folder.mkdir(parents=True)
        for name in RAW_FILES.values():  # torchvision reads the unpacked files
            with gzip.open(raw / name) as src, open(folder / name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        dataset = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
        loader = DataLoader(dataset, batch_size=train_params.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(train_params.seed))
        model = build_mlp(model_params, train_params.seed).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=train_params.lr)
        times = []
        for _ in range(epochs):
            start = time.perf_counter()
            model.train()
            for images, labels in loader:
                images, labels = images.to(device), labels.to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
            loss.item()  # wait for the device to finish the epoch
            times.append(time.perf_counter() - start)
    return times, accuracy(model, test)


def train_loop(train, model_params, train_params, epochs: int, test, device):
    model = build_mlp(model_params, train_params.seed).to(device)
    optimizer = build_optimizer(model.parameters(), train_params)
    train = tuple(t.to(device) for t in train)  # once, as the train stage does
    # The generators and schedule exactly as the train stage builds them.
    generators = seeded_generators(train_params.seed)
    scheduler = None
    if needs_scheduler(train_params):
        scheduler = lr_scheduler(optimizer, train_params.schedule, train_params.warmup,
                                 schedule_steps(train_params, len(train[0]), epochs))
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(model, optimizer, *train, train_params, generators, scheduler)
        times.append(time.perf_counter() - start)
    return times, accuracy(model, test)


def graph_loop(train, model_params, train_params, epochs: int, test, device):
    """The train stage's loop with ``train.cuda_graph``: each full batch's step replayed as one CUDA graph."""
    model = build_mlp(model_params, train_params.seed).to(device)
    optimizer = build_optimizer(model.parameters(), train_params, capturable=True)
    images, labels = (t.to(device) for t in train)
    generator = seeded_generators(train_params.seed)["batches"]  # as the train stage draws the order
    started = time.perf_counter()
    step = CudaGraphStep(model, optimizer, images, labels, train_params.batch_size)
    torch.cuda.synchronize()
    print(f"  (warm-up and capture of the CUDA graph: {time.perf_counter() - started:.2f} s, once)", flush=True)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        step.epoch(batch_order(len(images), generator, device))  # ends with .item(): synced
        times.append(time.perf_counter() - start)
    return times, accuracy(model, test)


def skorch_fit(train, model_params, train_params, epochs: int, test, device):
    net = build_net(model_params, train_params, seed=train_params.seed, device=str(device),
                    max_epochs=epochs, verbose=0)
    net.fit(*(t.to(device) for t in train))
    return list(net.history[:, "dur"]), accuracy(net.module_, test)


def accuracy(model, test) -> float:
    device = next(model.parameters()).device
    logits = predict_logits(model, test[0].to(device), 1000)
    return loss_and_accuracy(logits.cpu(), test[1])[1]


# Runs one stage and prints its peak RSS. A small launcher process, because a
# child forked straight from this (large) process would report this process's
# memory as its own peak.
MEASURE = """
import resource, subprocess, sys
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_memory(raw: Path) -> dict[str, float]:
    """Peak RSS (MB) of each data-heavy stage, run as DVC would run it."""
    peaks = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = {
            "preprocess": ["--raw", str(raw), "--out", f"{tmp}/processed", "--metrics", f"{tmp}/data.json"],
            "train": ["--data", f"{tmp}/processed", "--model", f"{tmp}/mlp.pt", "--live", f"{tmp}/train"],
            "fit": ["--data", f"{tmp}/processed", "--model", f"{tmp}/skorch.pt", "--live", f"{tmp}/fit"],
            "evaluate": ["--data", f"{tmp}/processed", "--manual", f"{tmp}/mlp.pt", "--skorch", f"{tmp}/skorch.pt",
                         "--metrics", f"{tmp}/evaluate.json", "--report", f"{tmp}/report.json",
                         "--predictions", f"{tmp}/predictions"],
        }
        for stage, args in commands.items():
            command = [sys.executable, "-c", MEASURE, sys.executable, "-m", f"stages.{stage}", *args]
            peaks[stage] = int(subprocess.check_output(command, cwd=ROOT)) / 1024
        command = [sys.executable, "-c", MEASURE, sys.executable, "-c", "import torch"]
        peaks["(import torch alone)"] = int(subprocess.check_output(command, cwd=ROOT)) / 1024
    return peaks


def compare(raw, train, test, model_params, train_params, epochs, device, default_threads) -> None:
    """Print one table: the tutorial style, the train loop and the skorch fit at one batch size."""
    # The tutorial as written leaves torch's thread count at its default (one
    # per core); the stages pin train.threads. Both are shown for the tutorial.
    runs = [
        ("tutorial (torchvision + ToTensor + DataLoader)", default_threads, tutorial),
        ("tutorial, threads pinned like the stages", train_params.threads, tutorial),
        ("train stage (explicit loop, in-memory tensors)", train_params.threads, train_loop),
        ("fit stage (skorch, TensorBatches)", train_params.threads, skorch_fit),
    ]
    if device.type == "cuda":
        del runs[1]  # the CPU thread count hardly matters to a GPU's run
        if cuda_graph_obstacle(model_params, train_params) is None:
            runs.insert(2, ("train stage, step as a CUDA graph", train_params.threads, graph_loop))
    print(f"\nbatch {train_params.batch_size} on {device}")
    print(f"{'method':48} {'threads':>7} {'s/epoch':>8} {'speed-up':>9} {'test acc':>9}")
    baseline = None
    for name, threads, run in runs:
        configure_torch(threads)
        data = raw if run is tutorial else train
        times, acc = run(data, model_params, train_params, epochs, test, device)
        per_epoch = sorted(times)[len(times) // 2]  # the median epoch
        baseline = baseline or per_epoch
        print(f"{name:48} {threads:7d} {per_epoch:8.2f} {baseline / per_epoch:8.1f}x {acc:9.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", type=Path, default=ROOT / "data/raw")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml",
                        help="the params file whose model and train sections to use (default: the project's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: train.epochs")
    parser.add_argument("--memory", action="store_true", help="also measure each stage's peak memory")
    parser.add_argument("--device", default=None, help="cpu | cuda | auto (default: train.device)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: train.batch_size")
    args = parser.parse_args()
    os.chdir(ROOT)
    model_params, train_params = load_section("model", args.params), load_section("train", args.params)
    device = resolve_device(args.device or train_params.device)
    epochs = args.epochs or train_params.epochs
    train, test = tensors(args.raw, "train"), tensors(args.raw, "test")
    default_threads = torch.get_num_threads()
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"{len(train[0])} training images, {epochs} epochs, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}")
    for batch_size in args.batch_sizes or [train_params.batch_size]:
        compare(args.raw, train, test, model_params, train_params.model_copy(update={"batch_size": batch_size}),
                epochs, device, default_threads)
    if args.memory:
        print(f"\n{'stage':22} {'peak RSS (MB)':>14}")
        for stage, mb in peak_memory(args.raw).items():
            print(f"{stage:22} {mb:14.0f}")


if __name__ == "__main__":
    main()

"""What each CPU-numerics setting costs the train and fit stages, and which weights it gives.

    .venv/bin/python benchmarks/numerics_cost.py [--data data/processed] [--epochs 1] [--repeats 2]
    .venv/bin/python benchmarks/numerics_cost.py --emulate Haswell Skylake-Client EPYC --images 1000

For each candidate environment (mnist_dvc/numerics.py pins ``portable``;
``native`` sets nothing), a fresh process with that environment imports
torch, then trains the tutorial's MLP with the train stage's loop and with
the fit stage's skorch net on the processed data (``--epochs`` epochs, the
params.yaml ``model`` and ``train`` settings otherwise), and prints seconds
per epoch and a hash of the learnt weights. The candidates run in turn,
``--repeats`` rounds, so that a change in the machine's load hits them all.
Same hash on two CPU kinds: the setting is portable between them
(docs/reproducibility.md has the figures).

``--emulate MODEL ...`` runs ``native`` and ``portable`` on this CPU and then
under QEMU's user-mode emulator as each CPU model (``qemu-x86_64 -cpu MODEL``,
Debian's qemu-user: the CPUID that MKL and ATen read is the model's, vendor
included), on the first ``--images`` training images, and prints each
model's weight hashes: another CPU kind without another machine. QEMU 7.2
emulates AVX2 but not AVX-512.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mnist_dvc import numerics  # noqa: E402

CANDIDATES = {
    "native": numerics.environment("native"),
    "ATen and oneDNN capped at AVX2": {**numerics.environment("native"), "ATEN_CPU_CAPABILITY": "avx2",
                                       "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "MKL_CBWR=COMPATIBLE only": {**numerics.environment("native"), "MKL_CBWR": "COMPATIBLE"},
    "portable (AVX2 cap + MKL COMPATIBLE,STRICT)": numerics.environment("portable"),
    "ATen default kernels + MKL COMPATIBLE": {**numerics.environment("portable"), "ATEN_CPU_CAPABILITY": "default"},
}

# Run in the child, after its environment is set and before anything imports torch.
CHILD = r"""
import hashlib, json, sys, time
import torch
sys.path.insert(0, sys.argv[1])
from mnist_dvc.data import load_split
from mnist_dvc.model import configure_torch
from mnist_dvc.params import load_section
from stages.fit import fit
from stages.train import train

data, epochs, images = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model_params = load_section("model")
train_params = load_section("train").model_copy(update={"epochs": epochs, "device": "cpu"})
configure_torch(train_params.threads)
train_split = tuple(t[:images] for t in load_split(data, "train"))
val_split = load_split(data, "val")
result = {"capability": torch.backends.cpu.get_cpu_capability()}
for name, run in (("train", lambda: train(model_params, train_params, train_split, val_split)),
                  ("fit", lambda: fit(model_params, train_params, train_split, val_split).module_)):
    started = time.perf_counter()
    model = run()
    seconds = time.perf_counter() - started
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()
    result[name] = {"seconds_per_epoch": seconds / epochs, "weights": digest[:12]}
print(json.dumps(result))
"""


def run_candidate(environment: dict, data: Path, epochs: int, images: int = 60_000, cpu: str | None = None) -> dict:
    """One fresh process with ``environment`` (emulating ``cpu`` if given): seconds per epoch and
    weight hashes of train and fit."""
    env = {key: value for key, value in os.environ.items() if key not in environment}
    env.update({key: value for key, value in environment.items() if value is not None})
    emulator = ["qemu-x86_64", "-cpu", cpu] if cpu else []
    out = subprocess.run([*emulator, sys.executable, "-c", CHILD, str(ROOT), str(data), str(epochs), str(images)],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def emulated(models: list[str], data: Path, images: int) -> None:
    """Weight hashes of native and portable on this CPU and on each emulated CPU model."""
    print(f"| CPU | ATen kernels | native (train, fit) | portable (train, fit) |")
    print("|---|---|---|---|")
    for cpu in [None, *models]:
        runs = {mode: run_candidate(numerics.environment(mode), data, 1, images, cpu) for mode in numerics.MODES}
        hashes = {mode: f"{run['train']['weights']}, {run['fit']['weights']}" for mode, run in runs.items()}
        print(f"| {cpu or 'this machine'} | {runs['portable']['capability']} | {hashes['native']} | "
              f"{hashes['portable']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "processed")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--emulate", nargs="+", metavar="MODEL", help="QEMU CPU models (qemu-x86_64 -cpu help)")
    parser.add_argument("--images", type=int, default=1000, help="with --emulate: training images (default 1000)")
    args = parser.parse_args()
    cpu = numerics.describe_cpu()
    print(f"CPU: {cpu.get('vendor')} {cpu.get('model')} ({cpu.get('isa')}); {args.epochs} epoch(s), "
          f"{args.repeats} round(s)")
    if args.emulate:
        return emulated(args.emulate, args.data, args.images)
    results: dict[str, list[dict]] = {name: [] for name in CANDIDATES}
    for _ in range(args.repeats):
        for name, environment in CANDIDATES.items():
            results[name].append(run_candidate(environment, args.data, args.epochs))
    print(f"| setting | ATen kernels | train s/epoch | fit s/epoch | weights (train, fit) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        best = {stage: min(run[stage]["seconds_per_epoch"] for run in runs) for stage in ("train", "fit")}
        weights = {run["train"]["weights"] + ", " + run["fit"]["weights"] for run in runs}
        print(f"| {name} | {runs[0]['capability']} | {best['train']:.2f} | {best['fit']:.2f} | {' / '.join(weights)} |")


if __name__ == "__main__":
    main()

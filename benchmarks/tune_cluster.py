"""Wall time of the tune stage's grid search: locally (n_jobs 1 and 2) vs on a loopback Dask cluster.

The same GridSearchCV (``stages.tune.build_search`` with params.yaml's
``model``, ``train`` and ``tune`` sections, or the overrides below) on the
same stratified subset of the training images, four ways, in this order:

- local, n_jobs=1:  every fit in this process (after one short warm-up fit);
- local, n_jobs=2:  two forked joblib workers, as the tune stage runs locally;
- cluster, cold:    ``mnist_dvc.cluster.fit_on_cluster`` (a task per fit) on a `dask scheduler`
  and two `dask worker --nthreads 1 --no-nanny` that this script starts on
  127.0.0.1 (from an empty folder, no PYTHONPATH: the workers import torch
  and skorch on their first fit, 3-4 s);
- cluster, warm:    the same again on the same workers (``--repeat`` times).

Each run's cv_results_ scores must be identical to the first; the script
says so. Then it times trivial tasks through the cluster's scheduler, to set
its per-task overhead next to the mean duration of one fit.

Usage (real MNIST as the preprocess stage writes it; run from anywhere):
    .venv/bin/python benchmarks/tune_cluster.py --data data/processed
    .venv/bin/python benchmarks/tune_cluster.py --data /tmp/base/data/processed --epochs 5 10
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from mnist_dvc.cluster import fit_on_cluster  # noqa: E402
from mnist_dvc.data import load_stored_split  # noqa: E402
from mnist_dvc.model import configure_torch, resolve_device  # noqa: E402
from mnist_dvc.params import load_section  # noqa: E402
from mnist_dvc.tuning import stratified_subset  # noqa: E402
from stages.tune import build_search, local_workers  # noqa: E402

DASK = Path(sys.executable).parent / "dask"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """A `dask scheduler` and ``workers`` single-thread `dask worker`s on 127.0.0.1, each its own process group."""

    def __init__(self, workers: int, folder: Path):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DASK_SCHEDULER_ADDRESS")}
        env["DASK_TEMPORARY_DIRECTORY"] = str(folder)
        commands = [["scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1]]] + [
            ["worker", self.address, "--nthreads", "1", "--no-nanny", "--host", "127.0.0.1"]] * workers
        self.processes = [subprocess.Popen([str(DASK), *args, "--no-dashboard"], cwd=folder, env=env,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True) for args in commands]
        from distributed import Client

        try:
            with Client(self.address, timeout="30s", set_as_default=False) as client:
                client.wait_for_workers(workers, timeout=60)
        except BaseException:  # the processes are in their own sessions: nobody else would stop them
            self.stop()
            raise

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time used so far by the scheduler and by this process (the client)."""
        import psutil

        return tuple(sum(psutil.Process(pid).cpu_times()[:2]) for pid in (self.processes[0].pid, os.getpid()))

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def scores(results: dict) -> np.ndarray:
    return np.array([results[key] for key in sorted(results) if key.startswith("split") or key == "mean_test_score"])


def scheduler_overhead(address: str, n: int) -> tuple[float, float]:
    """Seconds per trivial task: n at once (throughput), and one after another (round trip)."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        client.gather(client.map(abs, range(-50, 0), pure=False))  # warm up the connections
        start = time.perf_counter()
        client.gather(client.map(abs, range(n), pure=False))
        throughput = (time.perf_counter() - start) / n
        start = time.perf_counter()
        for i in range(50):
            client.submit(abs, i, pure=False).result()
        round_trip = (time.perf_counter() - start) / 50
    return throughput, round_trip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data/processed",
                        help="a folder with train_images.npy and train_labels.npy (the preprocess stage's output)")
    parser.add_argument("--subset", type=int, help="training images to search on (default: tune.subset_size)")
    parser.add_argument("--cv", type=int, help="folds (default: tune.cv)")
    parser.add_argument("--lr", type=float, nargs="+", help="grid learning rates (default: tune.grid.lr)")
    parser.add_argument("--hidden", type=int, nargs="+", action="append",
                        help="one grid point's hidden sizes; repeat for more (default: tune.grid.hidden)")
    parser.add_argument("--epochs", type=int, nargs="+", help="grid max_epochs (default: tune.grid.max_epochs)")
    parser.add_argument("--repeat", type=int, default=1, help="warm cluster runs (the best is reported)")
    parser.add_argument("--tasks", type=int, default=1000, help="trivial tasks for the scheduler's overhead")
    args = parser.parse_args()

    params = ROOT / "params.yaml"
    model_params, train_params, tune_params = (load_section(s, params) for s in ("model", "train", "tune"))
    grid = tune_params.grid.model_copy(update={k: v for k, v in {
        "lr": args.lr, "hidden": args.hidden, "max_epochs": args.epochs}.items() if v})
    tune_params = tune_params.model_copy(update={k: v for k, v in {
        "subset_size": args.subset, "cv": args.cv, "grid": grid}.items() if v})
    device = resolve_device(train_params.device)
    configure_torch(train_params.threads, device)
    images, labels = load_stored_split(args.data, "train")
    images, labels = stratified_subset(images, labels, tune_params.subset_size, tune_params.seed)
    n_fits = len(grid.lr) * len(grid.hidden) * len(grid.max_epochs) * tune_params.cv
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"{len(labels)} images from {args.data}, {tune_params.cv} folds, grid {grid.model_dump()}: "
          f"{n_fits} fits of {train_params.threads} torch thread(s); {os.cpu_count()} CPUs ({cpu})")

    # One short fit first: this process's first fit pays one-time costs
    # (torch's lazy initialisations) that the forked workers then inherit.
    from sklearn.base import clone

    clone(build_search(model_params, train_params, tune_params).estimator).set_params(
        net__max_epochs=1).fit(images[:1024], labels[:1024])
    runs: list[tuple[str, float, dict]] = []  # name, wall time, cv_results_

    def timed(name: str, fit, cluster: LoopbackCluster | None = None) -> None:
        search = build_search(model_params, train_params, tune_params)
        before = cluster.cpu_seconds() if cluster else None
        start = time.perf_counter()
        results = fit(search)
        runs.append((name, time.perf_counter() - start, results))
        extra = ""
        if cluster:  # what shares the cores with the two workers
            (scheduler, client), (scheduler0, client0) = cluster.cpu_seconds(), before
            extra = f" (CPU: scheduler {scheduler - scheduler0:.1f} s, this client {client - client0:.1f} s)"
        print(f"  {name}: {runs[-1][1]:.1f} s{extra}", flush=True)

    timed("local, n_jobs=1", lambda s: s.set_params(n_jobs=1).fit(images, labels).cv_results_)

    def forked(search):
        with local_workers(device):
            return search.set_params(n_jobs=2).fit(images, labels).cv_results_

    timed("local, n_jobs=2 (forked workers)", forked)
    with tempfile.TemporaryDirectory() as folder:
        cluster = LoopbackCluster(2, Path(folder))
        try:
            timed("cluster, 2 workers x 1 thread, cold",
                  lambda s: fit_on_cluster(s, images, labels, cluster.address), cluster)
            for _ in range(args.repeat):
                timed("cluster, 2 workers x 1 thread, warm",
                      lambda s: fit_on_cluster(s, images, labels, cluster.address), cluster)
            throughput, round_trip = scheduler_overhead(cluster.address, args.tasks)
        finally:
            cluster.stop()

    warm = [run for run in runs if run[0].endswith("warm")]
    if len(warm) > 1:
        best = min(warm, key=lambda run: run[1])
        runs = [run for run in runs if not run[0].endswith("warm")] + [
            (f"{best[0]} (best of {len(warm)})", best[1], best[2])]
    reference = runs[0]
    identical = all(np.array_equal(scores(results), scores(reference[2])) for _, _, results in runs)
    fit_time = float(np.mean(reference[2]["mean_fit_time"]))  # as GridSearchCV timed it
    print()
    print("| run | wall time (s) | speed-up over n_jobs=1 | one fit, mean (s) |")
    print("|---|---|---|---|")
    for name, seconds, results in runs:
        print(f"| {name} | {seconds:.1f} | {reference[1] / seconds:.2f}x | "
              f"{np.mean(results['mean_fit_time']):.2f} |")
    print()
    top = int(np.argmin(reference[2]["rank_test_score"]))
    print(f"CV scores identical in every run: {identical}; best {reference[2]['mean_test_score'][top]:.4f} "
          f"at {reference[2]['params'][top]}")
    print(f"one fit (mean, n_jobs=1): {fit_time:.2f} s; scheduler, per trivial task: "
          f"{throughput * 1e3:.2f} ms ({args.tasks} at once), {round_trip * 1e3:.2f} ms (one at a time, round trip): "
          f"{round_trip / fit_time:.2%} of a fit")
    if not identical:
        sys.exit("the runs' CV scores differ")


if __name__ == "__main__":
    main()

"""tune: grid search over the skorch MLP inside a scikit-learn Pipeline.

In:  data/processed/train_*.npy; params.yaml ``tune``, ``model`` (activation,
     dropout) and ``train`` (optimizer, momentum, weight_decay, threads, device).
Out: metrics/tune.json             best_score, best_params (lr, hidden,
                                   max_epochs, as in tune.grid), n_candidates, cv, subset_size
     metrics/tune_results.csv      one row per grid point: its parameters and CV scores
     metrics/tune_cv_accuracy.png  mean CV accuracy per grid point, std as error bars

The Pipeline scales the uint8 images, then trains build_net's net; GridSearchCV only reports
(refit=False), timings are printed, not written. The fits run in ``tune.n_jobs`` local processes,
or on the Dask cluster given by ``--scheduler`` or ``DASK_SCHEDULER_ADDRESS`` (docs/cluster.md;
not a DVC param), with byte-identical outputs either way.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import signal
import sys
from pathlib import Path

import joblib
import numpy as np
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer

from mnist_dvc.cluster import fit_on_cluster, scheduler_address
from mnist_dvc.data import load_stored_split
from mnist_dvc.model import configure_torch, resolve_device
from mnist_dvc.params import load_section
from mnist_dvc.skorch_net import build_net
from mnist_dvc.stage import run_stage, write_csv, write_json
from mnist_dvc.tuning import ReproducibleFit, scale_and_flatten, stratified_subset

# params.yaml's tune.grid keys -> the Pipeline's parameter names.
GRID_KEYS = {"lr": "net__lr", "hidden": "net__module__hidden", "max_epochs": "net__max_epochs"}


def build_search(model_params, train_params, tune_params, cpu_numerics: str | None = None) -> GridSearchCV:
    """The Pipeline and the GridSearchCV over ``tune.grid``, unfitted; each fit checks ``cpu_numerics``."""
    # Every fit uses train.threads threads wherever it runs (n_jobs x threads should not exceed the
    # cores), and the tutorial's plain training: train.schedule, warmup and augment are train's and fit's.
    augment = train_params.augment.model_copy(update={"shift": 0, "rotate": 0.0})
    plain = train_params.model_copy(update={"schedule": "constant", "warmup": 0.0, "augment": augment})
    net = build_net(
        model_params, plain, seed=tune_params.seed, device=str(resolve_device(train_params.device)),
        batch_size=tune_params.batch_size, verbose=0,  # train_split stays None: the folds validate
        callbacks=[ReproducibleFit(train_params.threads, tune_params.seed, cpu_numerics)],
    )
    pipeline = Pipeline([("scale", FunctionTransformer(scale_and_flatten)), ("net", net)])
    grid = {GRID_KEYS[key]: values for key, values in tune_params.grid.model_dump().items()}
    cv = StratifiedKFold(tune_params.cv, shuffle=True, random_state=tune_params.seed)
    return GridSearchCV(pipeline, grid, scoring="accuracy", cv=cv, n_jobs=tune_params.n_jobs,
                        refit=False, error_score="raise")


def default_signals() -> None:
    """In a forked worker: Python's default SIGTERM and SIGINT handlers. The stage's turn SIGTERM into an
    exception, which a task may catch: the pool, which ends its workers with SIGTERM, waited forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def local_workers(device):
    """Where tune.n_jobs > 1 fits run: forked processes on Linux's CPU, which start with torch, skorch and the
    data in memory (loky imports them again: docs/performance.md); elsewhere, and on a GPU, joblib's default."""
    if sys.platform != "linux" or device.type == "cuda":
        return contextlib.nullcontext()
    return joblib.parallel_config(backend="multiprocessing", context=multiprocessing.get_context("fork"),
                                  initializer=default_signals)


def results_table(cv_results: dict, n_splits: int) -> list[dict]:
    """One row per grid point with plain values, ``hidden`` as "128-64"; no timing columns."""
    scores = ["mean_test_score", "std_test_score", "rank_test_score"] + [
        f"split{k}_test_score" for k in range(n_splits)]
    return [{"candidate": i, "lr": float(params["net__lr"]),
             "hidden": "-".join(str(h) for h in params["net__module__hidden"]),
             "max_epochs": int(params["net__max_epochs"]),
             **{key: cv_results[key][i].item() for key in scores}}
            for i, params in enumerate(cv_results["params"])]


def plot_scores(path: Path, rows: list[dict], best: int, title: str) -> None:
    """Save mean CV accuracy per grid point, std as error bars, the ``best``-th in orange."""
    from mnist_dvc.figures import plt, save_png  # matplotlib: imported once the search is done

    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 1.5), 4.5))
    x = np.arange(len(rows))
    means, stds = [r["mean_test_score"] for r in rows], [r["std_test_score"] for r in rows]
    ax.errorbar(x, means, yerr=stds, fmt="o", capsize=4, color="tab:blue")
    ax.errorbar([best], [means[best]], yerr=[stds[best]], fmt="o", capsize=4, color="tab:orange", label="best")
    ax.set_xticks(x, [f"lr={r['lr']:g}\nhidden={r['hidden']}\nepochs={r['max_epochs']}" for r in rows])
    ax.set(title=title, ylabel="CV accuracy (mean ± std over folds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/processed"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/tune.json"))
    parser.add_argument("--results", type=Path, default=Path("metrics/tune_results.csv"))
    parser.add_argument("--plot", type=Path, default=Path("metrics/tune_cv_accuracy.png"))
    parser.add_argument("--scheduler", metavar="ADDRESS",
                        help="a Dask scheduler, e.g. tcp://host:8786, to run the fits on "
                             "(default: $DASK_SCHEDULER_ADDRESS; unset: this machine, tune.n_jobs processes)")
    args = parser.parse_args(argv)
    model_params, train_params, tune_params = load_section("model"), load_section("train"), load_section("tune")
    device = resolve_device(train_params.device)
    cpu_numerics = load_section("numerics").cpu
    configure_torch(train_params.threads, device, cpu_numerics)
    # The images as stored (uint8): scaling them is the Pipeline's own first step.
    images, labels = load_stored_split(args.data, "train")
    images, labels = stratified_subset(images, labels, tune_params.subset_size, tune_params.seed)
    search = build_search(model_params, train_params, tune_params, cpu_numerics)
    address = scheduler_address(args.scheduler)
    if address:  # Dask is imported on this path only
        results = fit_on_cluster(search, images, labels, address, cpu_numerics)
    else:
        with local_workers(device):
            results = search.fit(images, labels).cv_results_

    rows = results_table(results, tune_params.cv)
    for row, fit_time in zip(rows, results["mean_fit_time"]):
        print(f"lr={row['lr']:g} hidden={row['hidden']} max_epochs={row['max_epochs']}: "
              f"{row['mean_test_score']:.4f} +- {row['std_test_score']:.4f} (fit {fit_time:.1f} s)")
    top = int(np.argmin(results["rank_test_score"]))  # GridSearchCV's best_index_
    best = results["params"][top]  # saved under tune.grid's names, to copy back into params.yaml
    write_json(args.metrics, {
        "best_score": float(results["mean_test_score"][top]),
        "best_params": {"lr": float(best["net__lr"]), "hidden": [int(h) for h in best["net__module__hidden"]],
                        "max_epochs": int(best["net__max_epochs"])},
        "n_candidates": len(rows), "cv": tune_params.cv, "subset_size": len(labels),
    })
    write_csv(args.results, list(rows[0]), [list(row.values()) for row in rows])
    plot_scores(args.plot, rows, top, f"{tune_params.cv}-fold CV accuracy on {len(labels)} training images")


if __name__ == "__main__":
    run_stage(main)

"""The tune stage: GridSearchCV over the skorch net inside a scikit-learn Pipeline.

Runs in-process on the fixture data (``prepared``) with conftest's FAST_PARAMS:
300 images, 2 folds, grid lr [0.001, 0.01] x hidden [[32]] x max_epochs [2].
"""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import joblib
import numpy as np
import torch
import yaml
from sklearn.base import BaseEstimator, clone

from helpers import edit_params, run_stage_script
from mnist_dvc import cluster
from mnist_dvc.data import load_stored_split
from mnist_dvc.params import load_section
from mnist_dvc.tuning import scale_and_flatten, stratified_subset
from stages import tune

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_tune(folder: Path, name: str = "tune", n_jobs: int = 1) -> dict[str, Path]:
    """Run the stage in the cwd with ``tune.n_jobs``, writing its three outputs under
    ``folder/metrics`` as ``name``*.

    One job runs in this process. More run the stage's command, as dvc does: its
    workers are forked, and PyTorch refuses autograd in a child forked from a
    process that has already run autograd after an ONNX export (as a test in
    this one may have: https://github.com/pytorch/pytorch/wiki/Autograd-and-Fork).
    """
    outputs = {
        "metrics": folder / f"metrics/{name}.json",
        "results": folder / f"metrics/{name}_results.csv",
        "plot": folder / f"metrics/{name}_cv_accuracy.png",
    }
    edit_params("params.yaml", {"tune.n_jobs": n_jobs})
    arguments = [f"--{option}={path}" for option, path in outputs.items()]
    if n_jobs == 1:
        tune.main(arguments)
    else:
        run_stage_script("tune", *arguments, cwd=Path.cwd())
    return outputs


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tune_writes_best_params_from_the_grid_as_plain_json(prepared):
    outputs = run_tune(prepared)
    grid = yaml.safe_load(Path("params.yaml").read_text())["tune"]["grid"]
    result = json.loads(outputs["metrics"].read_text())

    assert set(result) == {"best_score", "best_params", "n_candidates", "cv", "subset_size"}
    assert type(result["best_score"]) is float and 0 <= result["best_score"] <= 1
    best = result["best_params"]
    assert set(best) == {"lr", "hidden", "max_epochs"}
    assert type(best["lr"]) is float and best["lr"] in grid["lr"]
    assert all(type(h) is int for h in best["hidden"]) and best["hidden"] in grid["hidden"]
    assert type(best["max_epochs"]) is int and best["max_epochs"] in grid["max_epochs"]
    assert (result["n_candidates"], result["cv"], result["subset_size"]) == (2, 2, 300)

    rows = read_rows(outputs["results"])
    assert [(float(r["lr"]), r["hidden"], int(r["max_epochs"])) for r in rows] == [(0.001, "32", 2), (0.01, "32", 2)]
    assert {"mean_test_score", "std_test_score", "rank_test_score", "split0_test_score",
            "split1_test_score"} <= set(rows[0])
    assert not any("time" in column for column in rows[0])
    best_row = min(rows, key=lambda r: int(r["rank_test_score"]))
    assert float(best_row["mean_test_score"]) == result["best_score"]
    assert outputs["plot"].read_bytes().startswith(PNG_MAGIC)


def test_same_seed_gives_byte_identical_outputs_whatever_n_jobs(prepared):
    first, second = run_tune(prepared, "first"), run_tune(prepared, "second")
    for key in first:
        assert first[key].read_bytes() == second[key].read_bytes(), key
    # Two forked worker processes (the default): the Pipeline is pickled to them,
    # and each fit pins its threads and seeds dropout itself (ReproducibleFit).
    parallel = run_tune(prepared, "parallel", n_jobs=2)
    for key in first:
        assert first[key].read_bytes() == parallel[key].read_bytes(), key


def test_configured_search_clones_and_the_clone_fits(workdir):
    search = tune.build_search(load_section("model"), load_section("train"), load_section("tune"))
    copy = clone(search)
    original_net, copied_net = search.estimator.named_steps["net"], copy.estimator.named_steps["net"]
    assert copied_net.iterator_train__generator is not original_net.iterator_train__generator

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 4)
    copy.fit(images, labels)
    assert len(copy.cv_results_["params"]) == 2
    pipeline = clone(search.estimator).set_params(net__max_epochs=1).fit(images, labels)
    assert pipeline.predict(images).shape == (40,)


def test_subset_size_beyond_the_training_set_uses_all_images(capsys):
    images, labels = np.zeros((50, 28, 28), np.uint8), np.arange(50) % 10
    kept_images, kept_labels = stratified_subset(images, labels, 100, seed=0)
    assert len(kept_labels) == 50 and "using all of them" in capsys.readouterr().out
    _, subset = stratified_subset(images, labels, 20, seed=0)
    assert np.bincount(subset).tolist() == [2] * 10


def test_scaling_step_matches_load_split_bit_for_bit():
    # The same arithmetic as load_split (float32 / 255), so tuned
    # hyperparameters carry over to the trainings, which use load_split.
    images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    features = scale_and_flatten(images)
    assert features.dtype == np.float32 and features.shape == (1, 256)
    expected = torch.from_numpy(images).float().div_(255).reshape(1, -1).numpy()
    assert np.array_equal(features, expected)
    assert features.min() == 0 and features.max() == 1


def test_local_workers_are_forked_on_the_cpu_only():
    # A forked child cannot use CUDA once its parent has: on a GPU, fresh processes.
    with tune.local_workers(torch.device("cpu")):
        assert type(joblib.parallel.get_active_backend()[0]).__name__ == "MultiprocessingBackend"
    with tune.local_workers(torch.device("cuda")):
        assert type(joblib.parallel.get_active_backend()[0]).__name__ != "MultiprocessingBackend"


def test_local_workers_get_the_default_signal_handlers_whatever_the_stage_has():
    # run_stage turns SIGTERM and SIGINT into an exception; the forked workers, which
    # the pool ends with SIGTERM, must not inherit that (a worker that caught
    # it lived on, and the stage waited for it forever).
    previous = {sig: signal.signal(sig, a_stage_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with tune.local_workers(torch.device("cpu")):
            handlers = joblib.Parallel(n_jobs=2)(joblib.delayed(signal_handlers)() for _ in range(4))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert handlers == [(signal.SIG_DFL, signal.default_int_handler)] * 4


def a_stage_handler(signum, frame):
    raise KeyboardInterrupt


def signal_handlers():
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


def test_the_cluster_paths_fits_and_results_equal_grid_search_cvs(prepared):
    # What mnist_dvc/cluster.py runs on the Dask workers, run here: the same
    # fits, scores and cv_results_ as GridSearchCV's, to the bit.
    images, labels = load_stored_split(Path("data/processed"), "train")
    search = tune.build_search(load_section("model"), load_section("train"), load_section("tune"))
    expected = clone(search).fit(images, labels).cv_results_
    candidates, folds = cluster.grid_fits(search, images, labels)
    fits = [[cluster.fit_task(search.estimator, params, images, labels, train, test, search.scoring)
             for train, test in folds] for params in candidates]
    assert all(failure is None for row in fits for _, failure in row)
    scores = [[result[0] for result, _ in row] for row in fits]
    results = cluster.search_results(candidates, scores, [[result[1] for result, _ in row] for row in fits])
    assert results["params"] == expected["params"]
    for key in set(results) - {"params", "mean_fit_time"}:
        assert results[key].dtype == expected[key].dtype and results[key].tobytes() == expected[key].tobytes(), key
    assert results["mean_fit_time"].shape == expected["mean_fit_time"].shape


def test_the_cluster_paths_ranks_and_stds_are_grid_search_cvs_on_ties():
    # Tied and unequal scores: the rank (ties share the lower rank) and the
    # std of GridSearchCV's cv_results_, from the same split scores.
    from sklearn.dummy import DummyClassifier
    from sklearn.model_selection import GridSearchCV, KFold

    images = np.zeros((12, 1))
    labels = np.array([0, 0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    strategies = ["most_frequent", "prior", "constant", "stratified", "uniform"]
    search = GridSearchCV(DummyClassifier(random_state=0, constant=1), {"strategy": strategies},
                          cv=KFold(3), scoring="accuracy").fit(images, labels)
    expected = search.cv_results_
    scores = np.stack([expected[f"split{k}_test_score"] for k in range(3)], axis=1)
    results = cluster.search_results(expected["params"], scores, np.zeros_like(scores))
    assert 1 < len(set(expected["mean_test_score"])) < len(strategies)  # ties, and a ranking
    for key in ("mean_test_score", "std_test_score", "rank_test_score"):
        assert results[key].dtype == expected[key].dtype and results[key].tobytes() == expected[key].tobytes(), key


def test_a_fit_that_fails_on_a_worker_comes_back_as_its_exception_and_traceback():
    images, labels = np.zeros((4, 28, 28), np.uint8), np.array([0, 1, 0, 1])
    train, test = np.array([0, 1]), np.array([2, 3])
    result, (exc, text) = cluster.fit_task(DivideByZeroFit(), {}, images, labels, train, test, "accuracy")
    assert result is None and isinstance(exc, ZeroDivisionError)
    assert "1 / 0" in text and text.startswith("Traceback")


class DivideByZeroFit(BaseEstimator):
    def fit(self, images, labels):
        return 1 / 0


def test_a_lost_scheduler_reads_the_same_however_dask_reports_it():
    from distributed.client import FutureCancelledError
    from distributed.comm import CommClosedError

    address = "tcp://10.0.0.1:8786"
    lost = f"lost the connection to the Dask cluster at {address} mid-search ("
    for exc in (FutureCancelledError("tune-fit-0-0-abc", "scheduler-connection-lost"),
                ConnectionResetError(104, "Connection reset by peer"), CommClosedError("in <TCP>: closed")):
        assert cluster.cluster_failure(exc, address).startswith(lost), exc
    for exc in (FutureCancelledError("tune-fit-0-0-abc", "lost dependencies"), RuntimeError("deserialization"),
                ImportError("No module named 'skorch'")):
        assert cluster.cluster_failure(exc, address).startswith(
            f"a grid-search task failed on the Dask cluster at {address} ("), exc

"""Run the tune stage's grid search on a Dask cluster: one ``Client.submit`` task per fit.

Without a scheduler's address tune uses only ``scheduler_address`` here, and never imports Dask
(an optional extra). Each task is one of GridSearchCV's fits (``fit_and_score``), and their scores
make its ``cv_results_`` (``search_results``): the outputs are byte-identical to a local run. Why
tasks, not joblib's ``dask`` backend, how code and data travel, each failure's line: docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
import uuid
import warnings
import zipfile
from pathlib import Path

from mnist_dvc.stage import StageError

ENV_VAR = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT = "10s"  # an unreachable scheduler is reported within this, unless Dask's config says otherwise
WORKERS_TIMEOUT = 30  # seconds without any worker before tune gives up, unless Dask's config says otherwise
POLL = 0.1  # seconds between two looks at the finished fits (as_completed's own iterator polls as often)
PACKAGE = Path(__file__).resolve().parent
PLUGIN = "mnist_dvc-package"  # the name the package's upload plugins are registered under


def scheduler_address(option: str | None) -> str | None:
    """The scheduler to use: ``--scheduler``, else ``$DASK_SCHEDULER_ADDRESS``, else None (run locally)."""
    return option or os.environ.get(ENV_VAR) or None


def _forget_package() -> None:
    """On a worker or the scheduler: drop modules of this package imported from an earlier upload."""
    for name in [n for n in sys.modules if n == "mnist_dvc" or n.startswith("mnist_dvc.")]:
        del sys.modules[name]


def prepare_workers(client, cpu_numerics: str) -> None:
    """Make this package importable on the scheduler (it unpickles the tasks) and every worker, present
    and future: ``Client.upload_file``'s plugins, under one fixed name (``PLUGIN``) so that each run
    replaces the last run's instead of adding one for future workers to replay. Then pin the workers'
    CPU numerics before torch loads there (mnist_dvc/numerics.py): a worker that loaded it otherwise
    is refused by each fit (``ReproducibleFit``)."""
    import cloudpickle
    from distributed.diagnostics.plugin import SchedulerUploadFile, UploadFile, WorkerPlugin

    # _forget_package runs where mnist_dvc may not be importable yet: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(PACKAGE.glob("*.py")):
            info = zipfile.ZipInfo(f"{PACKAGE.name}/{path.name}", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, path.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    # A name unique to the content: a worker keeps an earlier upload on its sys.path, the new one goes first.
    name = f"{PACKAGE.name}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}.zip"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(buffer.getvalue())
        client.run(_forget_package)
        client.run_on_scheduler(_forget_package)
        client.register_plugin(SchedulerUploadFile(str(path), load=True), name=PLUGIN)
        client.register_plugin(UploadFile(str(path), load=True), name=PLUGIN)

    class PinNumerics(WorkerPlugin):
        def setup(self, worker):
            from mnist_dvc import numerics  # importable: the package's plugin was registered first

            numerics.pin(cpu_numerics)

    client.register_plugin(PinNumerics(), name=f"{PLUGIN}-numerics")


@contextlib.contextmanager
def quiet_distributed():
    """No log lines of distributed, tornado or asyncio (retries, a lost scheduler's traceback) in the
    stage's output. Some of their loggers have handlers of their own, so logging is off as a whole."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def connect(address: str):
    """A ``distributed.Client`` for ``address``, or a one-line StageError. The connect timeout is
    Dask's ``distributed.comm.timeouts.connect``, defaulting to CONNECT_TIMEOUT here, not 30 s."""
    try:
        import dask
        from distributed import Client
        from distributed.comm import get_address_host_port, parse_address
        from distributed.comm.registry import get_backend
    except ImportError:
        raise StageError(f"tune was given a Dask scheduler ({address}) but Dask is not installed here; "
                         f"unset {ENV_VAR} to run tune on this machine, or install the cluster extra: "
                         "pip install -e '.[cluster]'") from None

    dask.config.update_defaults({"distributed": {"comm": {"timeouts": {"connect": CONNECT_TIMEOUT}}}})
    with quiet_distributed():
        try:
            # A malformed address first: a Client that fails on one lingers,
            # and prints a traceback 30 s later, as the interpreter exits.
            get_backend(parse_address(address, strict=False)[0])
            get_address_host_port(address)
            return Client(address, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(
                f"could not reach the Dask scheduler at {address} ({reason}); "
                f"check the address and that `dask scheduler` runs there, or unset {ENV_VAR} "
                f"to run tune on this machine") from None


def _cause_chain(exc: BaseException) -> str:
    """One line for ``exc``: its root cause first, then the first sentence of each wrapper."""
    chain = []
    while exc is not None and len(chain) < 4:
        text = " ".join(str(exc).split())
        chain.append(f"{type(exc).__name__}: {text.split('. ')[0]}" if text else type(exc).__name__)
        exc = exc.__cause__
    return chain[-1] + "".join(f", in {outer}" for outer in reversed(chain[:-1]))


def cluster_failure(exc: Exception, address: str) -> str:
    """The stage's line for a fit's task that Dask failed (``exc``, raised by its future). A lost
    scheduler cancels the futures, or resets the connection while a finished fit's result is fetched."""
    if isinstance(exc, OSError) or getattr(exc, "reason", None) == "scheduler-connection-lost":
        return (f"lost the connection to the Dask cluster at {address} mid-search ({_cause_chain(exc)}); "
                f"check that its scheduler still runs, then rerun tune")
    return (f"a grid-search task failed on the Dask cluster at {address} ({_cause_chain(exc)}); "
            f"see the scheduler's and workers' logs")


class WorkersWatch(threading.Thread):
    """As a context manager: ``failure`` becomes a StageError once the cluster has had no worker for
    ``timeout`` s (Dask would wait for one forever). A thread, because asking the scheduler may block
    while the connection is lost: the search's own loop never waits on it."""

    def __init__(self, client, address: str, timeout: float):
        super().__init__(name="tune-watch-workers", daemon=True)
        self.client, self.address, self.timeout = client, address, timeout
        self.failure: StageError | None = None
        self.done = threading.Event()

    def run(self) -> None:
        since = None
        while not self.done.wait(1.0):
            try:
                workers = len(self.client.nthreads())
            except Exception:  # the client is closing, or lost the scheduler (the fits fail then)
                continue
            now = time.monotonic()
            since = None if workers else (since or now)
            if since is not None and now - since >= self.timeout:
                self.failure = StageError(
                    f"the Dask cluster at {self.address} has had no workers for {self.timeout:g} s, "
                    f"with grid-search fits left to run; see the workers' logs")
                return

    def __enter__(self) -> WorkersWatch:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.join(timeout=5)


def grid_fits(search, images, labels) -> tuple[list[dict], list[tuple]]:
    """GridSearchCV's grid points and folds for ``search.fit(images, labels)``, in its order."""
    from sklearn.base import is_classifier
    from sklearn.model_selection import ParameterGrid, check_cv

    candidates = list(ParameterGrid(search.param_grid))
    folds = list(check_cv(search.cv, labels, classifier=is_classifier(search.estimator)).split(images, labels))
    return candidates, folds


def fit_and_score(estimator, params: dict, images, labels, train, test, scoring: str) -> tuple[float, float]:
    """One of GridSearchCV's fits, as its ``_fit_and_score`` makes it: (score, fit time in s)."""
    from sklearn.base import clone
    from sklearn.metrics import get_scorer

    model = clone(estimator).set_params(**clone(params, safe=False))
    start = time.perf_counter()
    model.fit(images[train], labels[train])
    fit_time = time.perf_counter() - start
    return float(get_scorer(scoring)(model, images[test], labels[test])), fit_time


def fit_task(*args):
    """On a worker: ``(fit_and_score(*args), None)``, or ``(None, (exception, its traceback))``:
    a fit's own exception comes back as a result, so a future raises only what Dask failed."""
    try:
        return fit_and_score(*args), None
    except Exception as exc:
        return None, (exc, traceback.format_exc())


class FitTraceback(Exception):
    """The traceback of a fit that failed on a Dask worker, as the cause of its exception."""

    def __str__(self) -> str:
        return f"\n\"\"\"\n{self.args[0]}\"\"\""


def search_results(candidates: list[dict], scores, fit_times) -> dict:
    """The ``cv_results_`` keys tune reads, from the fits' scores and fit times
    (grid points x folds), computed as GridSearchCV computes them (its ``_store``)."""
    import numpy as np
    from scipy.stats import rankdata

    scores = np.array(scores, dtype=np.float64)
    means = np.average(scores, axis=1)
    results = {"params": candidates,
               "mean_fit_time": np.average(np.array(fit_times, dtype=np.float64), axis=1),
               "mean_test_score": means,
               "std_test_score": np.sqrt(np.average((scores - means[:, np.newaxis]) ** 2, axis=1)),
               # accuracy is never NaN: GridSearchCV's NaN handling has nothing to do here
               "rank_test_score": rankdata(-means, method="min").astype(np.int32, copy=False)}
    results.update({f"split{k}_test_score": scores[:, k] for k in range(scores.shape[1])})
    return results


def fit_on_cluster(search, images, labels, address: str, cpu_numerics: str = "portable") -> dict:
    """``search.fit(images, labels).cv_results_`` (the keys ``search_results`` gives),
    with every fit a task on the cluster at ``address``, computing with ``cpu_numerics``."""
    import numpy as np

    client = connect(address)
    import dask
    from dask.utils import parse_timedelta
    from distributed import as_completed

    # How the search ended is the stage's one line: distributed's own log lines stay out.
    with quiet_distributed():
        try:
            timeout = dask.config.get("distributed.scheduler.no-workers-timeout", None)
            timeout = WORKERS_TIMEOUT if timeout is None else parse_timedelta(timeout, default="s")
            try:
                client.wait_for_workers(1, timeout=timeout)
            except TimeoutError:
                raise StageError(f"the Dask scheduler at {address} has no workers (waited {timeout:g} s); "
                                 f"start some with `dask worker {address}`") from None
            workers = len(client.scheduler_info(n_workers=-1)["workers"])
            print(f"tune: running the grid search on {address} ({workers} worker{'s' * (workers != 1)})")
            prepare_workers(client, cpu_numerics)
            candidates, folds = grid_fits(search, images, labels)
            run = uuid.uuid4().hex[:12]
            # The data goes as the results of small tasks that the fits depend on: Dask can recompute them.
            inputs = {"images": images, "labels": labels}
            for k, (train, test) in enumerate(folds):
                inputs.update({f"fold{k}-train": train, f"fold{k}-test": test})
            with warnings.catch_warnings():  # "Sending large graph ...": on purpose, once per array
                warnings.filterwarnings("ignore", message="Sending large graph")
                data = {name: client.submit(np.asarray, array, key=f"tune-{name}-{run}")
                        for name, array in inputs.items()}
            fits = {client.submit(fit_task, search.estimator, params, data["images"], data["labels"],
                                  data[f"fold{k}-train"], data[f"fold{k}-test"], search.scoring,
                                  key=f"tune-fit-{c}-{k}-{run}"): (c, k)
                    for c, params in enumerate(candidates) for k in range(len(folds))}
            scores, fit_times = np.zeros((len(candidates), len(folds))), np.zeros((len(candidates), len(folds)))
            finished = as_completed(list(fits), loop=client.loop)
            with WorkersWatch(client, address, timeout) as watch:
                while not finished.is_empty():
                    ready = finished.next_batch(block=False)
                    if not ready:
                        if watch.failure is not None:
                            raise watch.failure
                        time.sleep(POLL)
                    for future in ready:
                        c, k = fits.pop(future)  # its result is released once read: nothing to recompute
                        try:
                            result, failure = future.result()
                        except Exception as exc:  # Dask failed the task: KilledWorker, unpicklable, cancelled
                            raise StageError(cluster_failure(exc, address)) from None
                        if failure is not None:
                            raise failure[0] from FitTraceback(failure[1])
                        scores[c, k], fit_times[c, k] = result
            return search_results(candidates, scores, fit_times)
        finally:
            client.close()

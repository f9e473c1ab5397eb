"""Run the tune stage's grid search on a Dask cluster: one ``Client.submit`` task per fit.

The scheduler's address comes the way Dask users give it: the
``DASK_SCHEDULER_ADDRESS`` environment variable (Dask's own config key
``scheduler-address``), or the tune stage's ``--scheduler`` option. Without
one, tune uses nothing here but ``scheduler_address`` and never imports Dask,
which is an optional extra: ``pip install -e '.[cluster]'``.

With one, ``fit_on_cluster`` connects a ``distributed.Client``, ships this
package to the scheduler and workers (they have the project's dependencies,
not this checkout) through Dask's upload plugins, and submits one task per
grid point and fold: what GridSearchCV's fits would be, cloned, parametrised,
fitted and scored the same way (``fit_and_score``). Their scores make the
``cv_results_`` that GridSearchCV would compute (``search_results``), so the
outputs are byte-identical to a local run. Every fit seeds and pins itself
(``ReproducibleFit``).

The training data and the folds' indices go to the cluster once, as the
results of small tasks that the fits depend on: workers fetch them from each
other, and Dask can recompute them (scattered data it could not), so a worker
that dies loses nothing; Dask reruns its fits on the others.

Why not joblib's ``dask`` backend under GridSearchCV: joblib 1.6's backend
waits forever for a task that Dask itself fails (``KilledWorker``, a task the
scheduler cannot unpickle). A future from ``Client.submit`` raises that
failure instead; here it ends the stage with one line, as does a cluster left
without workers (``watch_workers``). An exception raised by a fit itself is
raised as it would be locally.
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
WORKERS_TIMEOUT = 30  # seconds without any worker before tune gives up (see workers_timeout)
POLL = 0.1  # seconds between two looks at the finished fits (as_completed's own iterator polls as often)
PACKAGE = Path(__file__).resolve().parent
PLUGIN = "mnist_dvc-package"  # the name the package's upload plugins are registered under
INSTALL = "pip install -e '.[cluster]'"


def scheduler_address(option: str | None) -> str | None:
    """The scheduler to use: ``--scheduler``, else ``$DASK_SCHEDULER_ADDRESS``, else None (run locally)."""
    return option or os.environ.get(ENV_VAR) or None


def package_zip() -> tuple[str, bytes]:
    """This package's source as a zip, and a file name unique to its content.

    A unique name: a worker that ran an earlier version keeps that zip on
    its ``sys.path``; the new one goes in front of it.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(PACKAGE.glob("*.py")):
            info = zipfile.ZipInfo(f"{PACKAGE.name}/{path.name}", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, path.read_bytes(), compress_type=zipfile.ZIP_DEFLATED)
    data = buffer.getvalue()
    return f"{PACKAGE.name}-{hashlib.sha256(data).hexdigest()[:12]}.zip", data


def _forget_package() -> None:
    """On a worker or the scheduler: drop modules of this package imported from an earlier upload."""
    for name in [n for n in sys.modules if n == "mnist_dvc" or n.startswith("mnist_dvc.")]:
        del sys.modules[name]


def ship_package(client) -> None:
    """Make this package importable on the scheduler and every worker, present and future:
    what ``Client.upload_file`` does, with the plugins under one fixed name (``PLUGIN``) so
    that each run replaces the last run's, where ``upload_file`` would add one more per run
    for every future worker to replay. The scheduler unpickles the tasks too."""
    import cloudpickle
    from distributed.diagnostics.plugin import SchedulerUploadFile, UploadFile

    # _forget_package runs where mnist_dvc may not be importable yet: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    name, data = package_zip()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.run(_forget_package)
        client.run_on_scheduler(_forget_package)
        client.register_plugin(SchedulerUploadFile(str(path), load=True), name=PLUGIN)
        client.register_plugin(UploadFile(str(path), load=True), name=PLUGIN)


def pin_numerics(client, mode: str) -> None:
    """On every worker, present and future, pin ``mode``'s CPU numerics before torch loads there
    (mnist_dvc/numerics.py): a worker started elsewhere has no stage to do it. Registered after
    ``ship_package``, so the plugin's ``setup`` can import this package. A worker that already
    loaded torch with other settings is refused by each fit's check (``ReproducibleFit``)."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class PinNumerics(WorkerPlugin):
        def setup(self, worker):
            from mnist_dvc import numerics

            numerics.pin(mode)

    client.register_plugin(PinNumerics(), name=f"{PLUGIN}-numerics")


@contextlib.contextmanager
def quiet_distributed():
    """Keep the log lines of distributed (and of tornado and asyncio under it) out of the
    stage's output: connection retries, the traceback of a lost scheduler. Some of its
    loggers have a level and a handler of their own, so logging is turned off as a whole
    (``logging.disable``) while the stage talks to the cluster: the stage logs nothing itself."""
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def connect(address: str):
    """A ``distributed.Client`` for ``address``, or a one-line StageError within the connect timeout
    (or at once, when Dask is not installed).

    The timeout is Dask's ``distributed.comm.timeouts.connect``, with CONNECT_TIMEOUT
    (a LAN connects in far less) as this library's default in place of Dask's 30 s:
    a value set in Dask's config (``DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=1m``) wins.
    """
    try:
        import dask
        from distributed import Client
        from distributed.comm import get_address_host_port, parse_address
        from distributed.comm.registry import get_backend
    except ImportError:
        raise StageError(f"tune was given a Dask scheduler ({address}) but Dask is not installed here; "
                         f"unset {ENV_VAR} to run tune on this machine, or install the cluster extra: "
                         f"{INSTALL}") from None

    dask.config.update_defaults({"distributed": {"comm": {"timeouts": {"connect": CONNECT_TIMEOUT}}}})
    with quiet_distributed():
        try:
            # A malformed address first: a Client that fails on one lingers,
            # and prints a traceback 30 s later, as the interpreter exits.
            get_backend(parse_address(address, strict=False)[0])
            get_address_host_port(address)
            return Client(address, set_as_default=False)  # timeout: distributed.comm.timeouts.connect
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
    """The stage's line for a fit's task that Dask failed (``exc``, raised by its future).

    A lost scheduler comes two ways, depending on the moment: the futures
    cancelled for ``scheduler-connection-lost``, or, for a fit that had just
    finished, the connection reset while its result was being fetched.
    """
    if isinstance(exc, OSError) or getattr(exc, "reason", None) == "scheduler-connection-lost":
        return (f"lost the connection to the Dask cluster at {address} mid-search ({_cause_chain(exc)}); "
                f"check that its scheduler still runs, then rerun tune")
    return (f"a grid-search task failed on the Dask cluster at {address} ({_cause_chain(exc)}); "
            f"see the scheduler's and workers' logs")


def workers_timeout() -> float:
    """Seconds without a worker before tune gives up: Dask's ``distributed.scheduler.no-workers-timeout``
    (e.g. ``DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT=2m``) if set, else WORKERS_TIMEOUT."""
    import dask
    from dask.utils import parse_timedelta

    value = dask.config.get("distributed.scheduler.no-workers-timeout", None)
    return WORKERS_TIMEOUT if value is None else parse_timedelta(value, default="s")


def wait_for_workers(client, address: str, timeout: float) -> int:
    """The number of workers of the cluster, once it has one; a StageError after ``timeout`` s without."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise StageError(f"the Dask scheduler at {address} has no workers (waited {timeout:g} s); "
                         f"start some with `dask worker {address}`") from None
    return len(client.scheduler_info(n_workers=-1)["workers"])


class WorkersWatch:
    """``failure``: a StageError once the cluster has had no worker for ``timeout`` s, else None.

    Dask keeps a task that no worker is left to run waiting for one (a
    worker may join), and the search with it; ``distributed.scheduler.no-workers-timeout``
    would fail it, but it is the scheduler's setting, not the client's. A
    thread asks the scheduler once a second (a call that may block while the
    connection is lost), so that the search's own loop never waits on it.
    """

    def __init__(self, client, address: str, timeout: float):
        self.client, self.address, self.timeout = client, address, timeout
        self.failure: StageError | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watch, name="tune-watch-workers", daemon=True)

    def watch(self) -> None:
        since = None
        while not self.stop.wait(1.0):
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


@contextlib.contextmanager
def watch_workers(client, address: str, timeout: float):
    """A running WorkersWatch for the block."""
    watch = WorkersWatch(client, address, timeout)
    watch.thread.start()
    try:
        yield watch
    finally:
        watch.stop.set()
        watch.thread.join(timeout=5)


def grid_fits(search, images, labels) -> tuple[list[dict], list[tuple]]:
    """GridSearchCV's grid points and folds for ``search.fit(images, labels)``, in its order."""
    from sklearn.base import is_classifier
    from sklearn.model_selection import ParameterGrid, check_cv

    candidates = list(ParameterGrid(search.param_grid))
    folds = list(check_cv(search.cv, labels, classifier=is_classifier(search.estimator)).split(images, labels))
    return candidates, folds


def fit_and_score(estimator, params: dict, images, labels, train, test, scoring: str) -> tuple[float, float]:
    """One of GridSearchCV's fits, as its ``_fit_and_score`` makes it: a clone of ``estimator``
    with ``params``, fitted on the ``train`` rows and scored on the ``test`` rows.
    Returns (score, fit time in seconds)."""
    from sklearn.base import clone
    from sklearn.metrics import get_scorer

    model = clone(estimator).set_params(**clone(params, safe=False))
    start = time.perf_counter()
    model.fit(images[train], labels[train])
    fit_time = time.perf_counter() - start
    return float(get_scorer(scoring)(model, images[test], labels[test])), fit_time


def fit_task(*args):
    """On a worker: ``(fit_and_score(*args), None)``, or ``(None, (exception, its traceback))``.

    A fit's own exception comes back as a result, so that what the future
    raises is only what Dask itself failed: the two are told apart.
    """
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
    from distributed import as_completed

    # distributed's own log lines (a lost scheduler, a lost worker) stay out
    # of the stage's output: how the search ended is the stage's one line.
    with quiet_distributed():
        try:
            timeout = workers_timeout()
            workers = wait_for_workers(client, address, timeout)
            print(f"tune: running the grid search on {address} ({workers} worker{'s' * (workers != 1)})")
            ship_package(client)
            pin_numerics(client, cpu_numerics)
            candidates, folds = grid_fits(search, images, labels)
            run = uuid.uuid4().hex[:12]
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
            with watch_workers(client, address, timeout) as watch:
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

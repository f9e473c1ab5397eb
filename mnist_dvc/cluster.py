"""Run the tune stage's grid search on a Dask cluster, through joblib's ``dask`` backend.

The scheduler's address comes the way Dask users give it: the
``DASK_SCHEDULER_ADDRESS`` environment variable (Dask's own config key
``scheduler-address``), or the tune stage's ``--scheduler`` option. Without
one, tune uses nothing here but ``scheduler_address`` and never imports Dask.

With one, ``fit_on_cluster`` connects a ``distributed.Client``, ships this
package to the scheduler and workers (they have the project's dependencies,
not this checkout), and runs ``search.fit`` on joblib's ``dask`` backend:
GridSearchCV's fits become Dask tasks. The training data and the folds'
indices go to the cluster once, as the results of tasks that the fits
depend on: workers fetch them from each other, and Dask can recompute them, so a
worker that dies loses nothing; Dask reruns its fits on the others. Each fit
seeds and pins itself (``ReproducibleFit``), so the results are
byte-identical to a local run.

A task that fails on the cluster rather than in the fit (the scheduler or a
worker cannot unpickle it, a worker dies on it ``allowed-failures`` times,
the cluster cancels it) ends the stage with a StageError, and so does a
cluster left without workers (``watch_workers``). With joblib's own dask
backend the search waited for such a task forever: ``_backend`` hands the
failure to joblib like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from mnist_dvc.stage import StageError

ENV_VAR = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT = "10s"  # an unreachable scheduler is reported within this (a LAN connects in far less)
WORKERS_TIMEOUT = 30  # seconds without any worker before tune gives up (see workers_timeout)
PACKAGE = Path(__file__).resolve().parent
PLUGIN = "mnist_dvc-package"  # the name the package's upload plugins are registered under


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


@contextlib.contextmanager
def quiet_distributed():
    """Keep the log lines of distributed (and of tornado and asyncio under it) out of the
    stage's output: connection retries, the traceback of a lost scheduler. Some of its
    loggers have a level and a handler of their own, so each is silenced."""
    names = [name for name in ["distributed", "tornado", "asyncio", *logging.root.manager.loggerDict]
             if name.split(".")[0] in ("distributed", "tornado", "asyncio")]
    loggers = [logging.getLogger(name) for name in dict.fromkeys(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def connect(address: str):
    """A ``distributed.Client`` for ``address``, or a one-line StageError within CONNECT_TIMEOUT."""
    from distributed import Client
    from distributed.comm import get_address_host_port, parse_address
    from distributed.comm.registry import get_backend

    with quiet_distributed():
        try:
            # A malformed address first: a Client that fails on one lingers,
            # and prints a traceback 30 s later, as the interpreter exits.
            get_backend(parse_address(address, strict=False)[0])
            get_address_host_port(address)
            return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(
                f"could not reach the Dask scheduler at {address} ({reason}); "
                f"check the address and that `dask scheduler` runs there, or unset {ENV_VAR} "
                f"to run tune on this machine") from None


class ClusterTaskError(Exception):
    """A grid-search task failed on the cluster itself, not in the code it runs."""


def _backend(client, inputs: dict):
    """joblib's dask backend for ``client``, with ``inputs`` (name -> array) sent
    to the cluster once, and a task that fails on the cluster raising ClusterTaskError.

    The inputs: joblib replaces an argument of a call by the future it finds
    for it (by identity) in ``data_futures``; arguments it finds none for, it
    scatters itself, once per ``Parallel`` call. Scattered data that dies
    with its worker is lost for good (the tasks that need it are cancelled),
    and the scheduler's Active Memory Manager keeps only as many replicas of
    it as there are workers waiting for it. So each input here is instead the
    result of a small task holding the array (``np.asarray``): Dask recomputes
    a lost result on another worker. The client sends each array once; a
    worker fetches it from a peer for a fit that needs it (again, if the
    Active Memory Manager dropped its copy between two fits).

    The failures: joblib's backend turns an exception raised by a fit into a
    result that it raises in the search, as a local run would. A task that
    Dask itself fails (``Future.status == "error"``: an unpicklable task, a
    ``KilledWorker``) only set the exception of the future that ``submit``
    returned, without the callback through which joblib learns that a task
    is done: ``Parallel`` waited forever. Here that future's done-callback
    passes the failure to the callback, and ``retrieve_result_callback``
    raises it, as it does a task that Dask cancelled. ``fail_waiting`` fails
    every call still running (the cluster has lost all its workers).
    """
    import asyncio
    import concurrent.futures
    import threading
    import uuid
    import warnings

    import numpy as np
    from joblib._dask import DaskDistributedBackend  # the class behind backend="dask"

    class Backend(DaskDistributedBackend):
        def __init__(self):
            super().__init__(client=client)
            run = uuid.uuid4().hex[:12]
            with warnings.catch_warnings():  # "Sending large graph ...": on purpose, once per array
                warnings.filterwarnings("ignore", message="Sending large graph")
                self.data_futures = {id(array): client.submit(np.asarray, array, key=f"tune-{name}-{run}")
                                     for name, array in inputs.items()}
            self.inputs = inputs  # alive, so that their ids stay theirs
            self.waiting, self.lock = {}, threading.Lock()  # call future -> joblib's callback

        def effective_n_jobs(self, n_jobs):
            # joblib runs the calls in this process when this is 1: a
            # cluster of one single-thread worker would never be used.
            return max(super().effective_n_jobs(n_jobs), 2)

        def submit(self, func, callback=None):
            future = super().submit(func, callback)
            with self.lock:
                self.waiting[future] = callback

            def on_done(done):
                with self.lock:
                    self.waiting.pop(done, None)
                if callback is not None and not done.cancelled() and done.exception() is not None:
                    callback(ClusterTaskError(done.exception()))

            future.add_done_callback(on_done)
            return future

        def retrieve_result_callback(self, out):
            # A task Dask cancelled (lost scheduler, lost data) comes as a
            # result: distributed's FutureCancelledError, or asyncio's.
            if isinstance(out, (concurrent.futures.CancelledError, asyncio.CancelledError)):
                raise ClusterTaskError(out)
            return super().retrieve_result_callback(out)

        def fail_waiting(self, error: BaseException) -> None:
            with self.lock:
                callbacks = [callback for callback in self.waiting.values() if callback is not None]
            for callback in callbacks:
                callback(error)

    return Backend()


def _describe(exc: BaseException) -> str:
    """One line for ``exc``: its root cause first, then the first sentence of each wrapper."""
    chain = []
    while exc is not None and len(chain) < 4:
        text = " ".join(str(exc).split())
        chain.append(f"{type(exc).__name__}: {text.split('. ')[0]}" if text else type(exc).__name__)
        exc = exc.__cause__
    return chain[-1] + "".join(f", in {outer}" for outer in reversed(chain[:-1]))


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


@contextlib.contextmanager
def watch_workers(client, address: str, backend, timeout: float):
    """While the block runs, fail the search once the cluster has had no worker for ``timeout`` s.

    Dask keeps a task that no worker is left to run waiting for one (a
    worker may join), and the search with it: when every worker died, on
    the fits or otherwise, this ends it instead.
    """
    import threading
    import time

    stop = threading.Event()

    def watch():
        since = None
        while not stop.wait(1.0):
            try:
                workers = len(client.nthreads())
            except Exception:  # the client is closing, or lost the scheduler (the search fails then)
                continue
            now = time.monotonic()
            since = None if workers else (since or now)
            if since is not None and now - since >= timeout:
                backend.fail_waiting(StageError(
                    f"the Dask cluster at {address} has had no workers for {timeout:g} s, "
                    f"with grid-search tasks left to run; see the workers' logs"))
                return

    thread = threading.Thread(target=watch, name="tune-watch-workers", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def fit_on_cluster(search, images, labels, address: str):
    """``search.fit(images, labels)`` with every fit a task on the cluster at ``address``."""
    import joblib
    from sklearn.model_selection import check_cv

    client = connect(address)
    # distributed's own log lines (a lost scheduler, a lost worker) stay out
    # of the stage's output: how the search ended is the stage's one line.
    with quiet_distributed():
        try:
            timeout = workers_timeout()
            workers = wait_for_workers(client, address, timeout)
            print(f"tune: running the grid search on {address} ({workers} worker{'s' * (workers != 1)})")
            ship_package(client)
            # The folds' indices as arrays, the very objects GridSearchCV then
            # passes to the fits with the data (the same folds as its own split).
            folds = list(check_cv(search.cv, labels, classifier=True).split(images, labels))
            inputs = {"images": images, "labels": labels}
            for k, (train, test) in enumerate(folds):
                inputs.update({f"fold{k}-train": train, f"fold{k}-test": test})
            # n_jobs=-1: as many fits at a time as the cluster has worker threads.
            search.set_params(cv=folds, n_jobs=-1)
            backend = _backend(client, inputs)
            with joblib.parallel_config(backend=backend), watch_workers(client, address, backend, timeout):
                return search.fit(images, labels)
        except ClusterTaskError as exc:
            raise StageError(f"a grid-search task failed on the Dask cluster at {address} "
                             f"({_describe(exc.args[0])}); see the scheduler's and workers' logs") from None
        finally:
            client.close()

"""Run the tune stage's grid search on a Dask cluster, through joblib's ``dask`` backend.

The scheduler's address comes the way Dask users give it: the
``DASK_SCHEDULER_ADDRESS`` environment variable (Dask's own config key
``scheduler-address``), or the tune stage's ``--scheduler`` option. Without
one, tune never imports this module, nor Dask.

With one, ``fit_on_cluster`` connects a ``distributed.Client``, ships this
package to the workers (they have the project's dependencies, not this
checkout), and runs ``search.fit`` under ``joblib.parallel_config(backend="dask")``:
GridSearchCV's fits become Dask tasks, joblib scatters the training data to
the cluster once (not once per task), and Dask reruns the tasks of a worker
that dies on the others. Each fit seeds and pins itself (``ReproducibleFit``),
so the results are byte-identical to a local run.
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
CONNECT_TIMEOUT = "15s"  # an unreachable scheduler is reported within this
PACKAGE = Path(__file__).resolve().parent


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
            archive.writestr(info, path.read_bytes())
    data = buffer.getvalue()
    return f"{PACKAGE.name}-{hashlib.sha256(data).hexdigest()[:12]}.zip", data


def _forget_package(dask_worker=None) -> None:
    """On a worker: drop modules of this package imported from an earlier upload."""
    for name in [n for n in sys.modules if n == "mnist_dvc" or n.startswith("mnist_dvc.")]:
        del sys.modules[name]


def ship_package(client) -> None:
    """Make this package importable on every worker, present and future (``Client.upload_file``)."""
    import cloudpickle

    # _forget_package runs where mnist_dvc may not be importable yet: send it by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    name, data = package_zip()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        client.run(_forget_package)
        client.upload_file(str(path), load=True)


@contextlib.contextmanager
def quiet_distributed():
    """Keep distributed's own log lines (connection retries, tracebacks) out of the stage's output."""
    logger = logging.getLogger("distributed")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def connect(address: str):
    """A ``distributed.Client`` for ``address``, or a one-line StageError within CONNECT_TIMEOUT."""
    from distributed import Client

    with quiet_distributed():
        try:
            return Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StageError(
                f"could not reach the Dask scheduler at {address} ({reason}); "
                f"check the address and that `dask scheduler` runs there, or unset {ENV_VAR} "
                f"to run tune on this machine") from None


def fit_on_cluster(search, images, labels, address: str):
    """``search.fit(images, labels)`` with every fit a task on the cluster at ``address``."""
    import joblib

    client = connect(address)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        print(f"tune: running the grid search on {address} ({len(workers)} workers)")
        ship_package(client)
        # n_jobs=-1: as many fits at a time as the cluster has worker threads.
        search.set_params(n_jobs=-1)
        with joblib.parallel_config(backend="dask", client=client):
            return search.fit(images, labels)
    finally:
        with quiet_distributed():
            client.close()

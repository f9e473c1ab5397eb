"""The tune stage's grid search on a real Dask cluster (mnist_dvc/cluster.py), end to end.

A test that needs a cluster starts its own, on the loopback: a `dask scheduler` and `dask
worker` processes (one thread each, no nanny), each in its own process group,
on free ports, from an empty folder outside the repository and with no
PYTHONPATH: the workers have the project's dependencies, not its checkout, as
on other machines. The stage runs against them through `dvc repro` or `dvc
exp run` with DASK_SCHEDULER_ADDRESS set, or as a process of its own; the
tests that only read its error message run its ``main`` in this process
(``tune_in_process``). The ``reproduced`` project ran tune
locally (forked workers) with the committed params: its committed outputs are
the local reference the cluster's must equal byte for byte.

What happened on the cluster is read from it, not from the stage's output:
a scheduler plugin (``TaskLog``) records which worker completed each
grid-search task and which data keys the task depended on, a worker plugin
(``DataLog``) records every piece of data that arrived on its worker.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cloudpickle
import dask
import numpy as np
import pytest
import yaml
from distributed import Client
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import GridSearchCV

from helpers import DVC, dvc, edit_params, free_ports, ran_stages, sh, stage_command, tool_env
from mnist_dvc.cluster import CONNECT_TIMEOUT, ENV_VAR, FitTraceback, connect, fit_on_cluster
from mnist_dvc.stage import StageError
from stages import tune

pytestmark = pytest.mark.e2e

# The plugins and the functions run on the cluster are defined here: the
# scheduler and workers cannot import this module, so they travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

DASK = Path(sys.executable).parent / "dask"
OUTPUTS = ["metrics/tune.json", "metrics/tune_results.csv", "metrics/tune_cv_accuracy.png"]
TUNE_ERROR = "a grid-search task failed on the Dask cluster at"
NO_WORKERS_TIMEOUT = "distributed.scheduler.no-workers-timeout"


# --- what the cluster records --------------------------------------------------

class TaskLog(SchedulerPlugin):
    """On the scheduler: each completed grid-search task, its worker and the keys it depended on."""

    name = "test-task-log"

    def __init__(self):
        self.completed = []  # (key, worker address, {dependency keys})

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory" and is_fit(key):
            deps = {dep.key for dep in self.scheduler.tasks[key].dependencies}
            self.completed.append((key, kwargs.get("worker"), deps))


class DataLog(WorkerPlugin):
    """On a worker: every key whose value came into its memory, computed there or received."""

    name = "test-data-log"

    def setup(self, worker):
        self.arrived = []

    def transition(self, key, start, finish, **kwargs):
        if finish == "memory":
            self.arrived.append((key, start))


def scheduler_state(dask_scheduler):
    """Run on the scheduler: the TaskLog so far and the grid-search tasks assigned to each worker now."""
    return {"completed": list(dask_scheduler.plugins[TaskLog.name].completed),
            "processing": {ws.address: [ts.key for ts in ws.processing if is_fit(ts.key)]
                           for ws in dask_scheduler.workers.values()}}


def arrived_data(dask_worker):
    return list(dask_worker.plugins[DataLog.name].arrived)


def torch_threads(client: Client, worker: str) -> int:
    """torch's thread count on ``worker``, read by a task: in its only executor thread, where the fits ran."""
    def get():  # nested: plain pickle cannot send it by reference, so Dask sends it by value
        import torch

        return torch.get_num_threads()

    return client.submit(get, workers=[worker], pure=False).result()


def is_fit(key) -> bool:
    """tune names each fit's task tune-fit-<grid point>-<fold>-<run>."""
    return re.fullmatch(r"tune-fit-\d+-\d+-[0-9a-f]+", str(key)) is not None


def fit_of(key: str) -> str:
    """The grid point and fold of a fit's task: tune-fit-<c>-<k>-<run> -> "<c>-<k>"."""
    return str(key).rsplit("-", 1)[0].removeprefix("tune-fit-")


# --- a loopback cluster ------------------------------------------------------

@dataclass
class Cluster:
    address: str
    folder: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self) -> Client:
        return Client(self.address, timeout="30s", set_as_default=False)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        for name in self.processes:
            self.kill(name)

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{(self.folder / f'{name}.log').read_text(errors='replace')[-3000:]}"
                         for name in self.processes)


@pytest.fixture
def start_cluster(tmp_path):
    """``start_cluster(workers=2, broken=None, env={})``: a running, registered cluster; stopped after the test.

    ``broken="scheduler"`` or ``"worker"`` starts that process (all workers)
    with a stand-in ``skorch`` that cannot be imported: an environment that
    lacks the project's dependencies. ``env``: more environment variables
    for every process (Dask settings).
    """
    clusters = []

    def start(workers: int = 2, broken: str | None = None, env: dict[str, str] | None = None) -> Cluster:
        extra = env or {}
        folder = tmp_path / f"cluster{len(clusters)}"
        empty = folder / "cwd"  # the processes' working directory: nothing of the repository
        empty.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_VAR)}
        env["DASK_TEMPORARY_DIRECTORY"] = str(folder / "tmp")  # scratch space, uploaded zips: all in here
        env.update(extra)
        broken_env = dict(env)
        if broken:
            fake = folder / "no-skorch" / "skorch"
            fake.mkdir(parents=True)
            fake.joinpath("__init__.py").write_text(
                'raise ImportError("skorch is not installed here (a test stand-in)")\n')
            broken_env["PYTHONPATH"] = str(fake.parent)
        port = free_ports(1)[0]
        cluster = Cluster(f"tcp://127.0.0.1:{port}", folder)
        clusters.append(cluster)

        def launch(name, *args, env):
            with open(folder / f"{name}.log", "wb") as log:
                cluster.processes[name] = subprocess.Popen(
                    [str(DASK), *args], cwd=empty, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True)

        launch("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
               env=broken_env if broken == "scheduler" else env)
        for i in range(workers):
            launch(f"w{i}", "worker", cluster.address, "--name", f"w{i}", "--nthreads", "1", "--no-nanny",
                   "--no-dashboard", "--host", "127.0.0.1",
                   env=broken_env if broken == "worker" else env)
        try:
            with cluster.client() as client:
                if workers:
                    client.wait_for_workers(workers, timeout=60)
                client.register_plugin(TaskLog())
                client.register_plugin(DataLog())
        except Exception:
            raise AssertionError(f"the cluster did not start:\n{cluster.logs()}") from None
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()


def cluster_env(address: str) -> dict[str, str]:
    return {**tool_env(), ENV_VAR: address}


def committed(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo, capture_output=True, check=True).stdout


# --- the tests -----------------------------------------------------------------

def test_without_an_address_tune_runs_locally_and_never_imports_dask(copy_project, tmp_path):
    repo = copy_project()
    env = {k: v for k, v in tool_env().items() if k != ENV_VAR}
    outputs = [f"--metrics={tmp_path}/tune.json", f"--results={tmp_path}/tune.csv", f"--plot={tmp_path}/tune.png"]
    result = sh(sys.executable, "-X", "importtime", *stage_command("tune")[1:], *outputs, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = [line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line]
    assert "torch" in imported and "skorch" in imported  # -X importtime did report the imports
    assert not [name for name in imported if name.split(".")[0] in ("dask", "distributed")]
    assert "running the grid search on" not in result.stdout
    assert (tmp_path / "tune.json").read_bytes() == committed(repo, "metrics/tune.json")


# Workers started elsewhere, by someone else's environment: tune pins the stage's numerics and
# torch threads on each of them before torch loads there (mnist_dvc/cluster.py, prepare_workers).
FOREIGN = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "SSE41",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "MKL_DYNAMIC": "TRUE"}


def test_on_a_cluster_of_foreign_settings_tune_reruns_nothing_and_reproduces_the_local_bytes(
        copy_project, start_cluster):
    repo = copy_project()
    cluster = start_cluster(workers=2, env=FOREIGN)
    env = cluster_env(cluster.address)

    # The address is not a DVC param: with it set, an up-to-date project stays so.
    status = dvc("status", "--json", cwd=repo, env=env, check=False)
    assert json.loads(status.stdout) == {}, status.stdout + status.stderr
    repro = dvc("repro", cwd=repo, env=env, check=False)
    assert repro.returncode == 0 and ran_stages(repro.stdout) == set(), repro.stdout + repro.stderr

    forced = dvc("repro", "--force", "--single-item", "tune", cwd=repo, env=env, check=False)
    assert forced.returncode == 0, forced.stdout + forced.stderr + cluster.logs()
    assert ran_stages(forced.stdout) == {"tune"}
    assert f"running the grid search on {cluster.address} (2 workers)" in forced.stdout
    for path in OUTPUTS:  # the local run's bytes
        assert (repo / path).read_bytes() == committed(repo, path), path
    assert sh("git", "status", "--porcelain", cwd=repo).stdout == ""  # dvc.lock too

    with cluster.client() as client:
        state = client.run_on_scheduler(scheduler_state)
        arrived = client.run(arrived_data)
        threads_after = {w: torch_threads(client, w) for w in arrived}
    # The fits ran on the workers, both of them: 2 grid points x 2 folds.
    completed = state["completed"]
    assert sorted(fit_of(key) for key, _, _ in completed) == ["0-0", "0-1", "1-0", "1-1"], completed
    per_worker = {w: sum(1 for _, worker, _ in completed if worker == w) for w in arrived}
    assert sum(per_worker.values()) == 4 and all(per_worker.values()), per_worker
    # The client sent the training images once, as a task (tune-images-...)
    # that every fit depended on: one worker computed it; every other arrival
    # is a fetch from a peer ("flight"), one at most per fit run there
    # (Dask's Active Memory Manager may drop a worker's extra copy between
    # two of its fits; the next one fetches it again).
    images = {key for _, _, deps in completed for key in deps if key.startswith("tune-images-")}
    assert len(images) == 1 and all(images <= deps for _, _, deps in completed), completed
    (images,) = images
    starts = {w: [start for key, start in keys if key == images] for w, keys in arrived.items()}
    assert sorted(start for w in starts for start in starts[w] if start != "flight") == ["executing"], starts
    for w, received in starts.items():
        assert 1 <= len(received) <= per_worker[w] + received.count("executing"), (w, starts, per_worker)
    # Each fit pinned its worker's torch threads to train.threads (1), where OMP_NUM_THREADS said 2.
    assert set(threads_after.values()) == {1}, threads_after


# A search long enough on the fixture data to kill a worker in the middle of
# it: 8 grid points x 2 folds, about 0.15 s per fit on one core.
LONG_SEARCH = ["tune.subset_size=1500", "tune.grid.lr=[0.001,0.003,0.01,0.03]", "tune.grid.hidden=[[32],[64]]",
               "tune.grid.max_epochs=[20]"]


def warm_up(client: Client, worker: str):
    """Import torch and skorch on ``worker`` (3-4 s), while dvc starts: a shorter test."""
    def imports():
        import skorch  # noqa: F401

    return client.submit(imports, workers=[worker], pure=False)


def test_a_worker_killed_mid_search_loses_nothing(copy_project, start_cluster, tmp_path):
    repo = copy_project()
    cluster = start_cluster(workers=2)
    set_params = [arg for param in LONG_SEARCH for arg in ("-S", param)]
    run_ = subprocess.Popen([DVC, "exp", "run", *set_params], cwd=repo, env=cluster_env(cluster.address),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with cluster.client() as client:
            names = {w: info["name"] for w, info in client.scheduler_info(n_workers=-1)["workers"].items()}
            warm = [warm_up(client, w) for w in names]  # noqa: F841 (kept until done)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and run_.poll() is None:
                state = client.run_on_scheduler(scheduler_state)
                busy = [w for w, keys in state["processing"].items() if keys]
                if state["completed"] and busy:  # the first fits are done, more are under way
                    victim, assigned = busy[0], state["processing"][busy[0]]
                    cluster.kill(names[victim])
                    break
                time.sleep(0.02)
            else:
                pytest.fail("no moment with a completed and a running fit: the search is too short")
            output, _ = run_.communicate(timeout=240)
            state = client.run_on_scheduler(scheduler_state)
    finally:
        if run_.poll() is None:
            run_.kill()
    assert run_.returncode == 0, output + cluster.logs()
    assert ran_stages(output) == {"tune"}
    # Every fit completed. Dask reran the killed worker's tasks on the other
    # one: those it was running, and any whose result died with it before
    # the stage had it (those complete twice).
    survivor = next(w for w in names if w != victim)
    done_on: dict[str, list[str]] = {}
    for key, worker, _ in state["completed"]:
        done_on.setdefault(key, []).append(worker)
    assert sorted(map(fit_of, done_on)) == sorted(f"{c}-{k}" for c in range(8) for k in range(2)), done_on
    assert any(done_on.get(key, [])[-1:] == [survivor] for key in assigned), (assigned, done_on)
    assert all(workers == [victim, survivor] for workers in done_on.values() if len(workers) > 1), done_on

    # Byte-identical to a local run (GridSearchCV, forked joblib workers) of the same params.
    local = [f"--metrics={tmp_path}/tune.json", f"--results={tmp_path}/tune_results.csv",
             f"--plot={tmp_path}/tune_cv_accuracy.png"]
    env = {k: v for k, v in tool_env().items() if k != ENV_VAR}
    result = sh(*stage_command("tune"), *local, cwd=repo, env=env)
    assert result.returncode == 0, result.stderr
    for path in OUTPUTS:
        assert (repo / path).read_bytes() == (tmp_path / Path(path).name).read_bytes(), path


def test_a_scheduler_lost_mid_search_ends_the_stage_in_one_line(copy_project, start_cluster):
    repo = copy_project()
    edit_params(repo / "params.yaml", {key: yaml.safe_load(value)
                                       for key, value in (setting.split("=") for setting in LONG_SEARCH)})
    cluster = start_cluster(workers=2)
    stage = subprocess.Popen([*stage_command("tune")], cwd=repo, env=cluster_env(cluster.address),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with cluster.client() as client:
            warm = [warm_up(client, w) for w in client.scheduler_info(n_workers=-1)["workers"]]  # noqa: F841 (kept)
            deadline = time.monotonic() + 120
            while not client.run_on_scheduler(scheduler_state)["completed"]:
                assert time.monotonic() < deadline and stage.poll() is None, "no fit completed"
                time.sleep(0.05)
            cluster.kill("scheduler")
        out, err = stage.communicate(timeout=60)  # a stage that waits for the lost scheduler fails here
    finally:
        if stage.poll() is None:
            stage.kill()
    assert stage.returncode == 1, out + err
    # Dask says it two ways, depending on the moment: the futures cancelled
    # for scheduler-connection-lost, or the connection reset while the result
    # of a fit that had just finished was fetched.
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(f"error: lost the connection to the Dask cluster at {cluster.address} mid-search ("), err
    assert "scheduler-connection-lost" in err or "ConnectionResetError" in err or "CommClosedError" in err, err
    assert sh("git", "status", "--porcelain", "--ignored", "metrics", cwd=repo).stdout == ""


def test_an_unreachable_scheduler_fails_in_one_line_and_replaces_nothing(copy_project):
    repo = copy_project()
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    # Dask's connect timeout ends it, set in Dask's config (tune's own default is 10 s);
    # a stage that kept retrying would fail the 60 s timeout.
    env = {**cluster_env(address), "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "2s"}
    result = sh(*stage_command("tune"), cwd=repo, env=env, timeout=60, check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: could not reach the Dask scheduler at {address} "
                               f"(Timed out trying to connect to {address} after 2 s)"), lines[0]
    assert ENV_VAR in lines[0]
    assert sh("git", "status", "--porcelain", "--ignored", "metrics", cwd=repo).stdout == ""


# A stage that waited for good on a failed task fails its test, not the run; the
# fixtures' time (the shared project may be building) does not count.
stage_may_hang = pytest.mark.timeout(120, func_only=True)


def tune_in_process(repo: Path, monkeypatch, address: str, **config) -> str:
    """The tune stage's ``main`` run in this process against ``address``, with Dask ``config``
    (dotted keys); the message of the StageError it must end with, its one line on stderr.

    The stage's own code without a new interpreter's 5 s start; its command's
    exit 1 and one-line stderr are checked by the real processes above. A test
    that calls it is marked ``stage_may_hang``.
    """
    monkeypatch.chdir(repo)
    with dask.config.set(config), pytest.raises(StageError) as raised:
        tune.main(["--scheduler", address])
    assert sh("git", "status", "--porcelain", "--ignored", "metrics", cwd=repo).stdout == ""  # nothing replaced
    return str(raised.value)


@stage_may_hang
def test_a_scheduler_without_workers_fails_in_one_line_after_the_no_workers_timeout(
        copy_project, start_cluster, monkeypatch):
    repo = copy_project()
    cluster = start_cluster(workers=0)
    message = tune_in_process(repo, monkeypatch, cluster.address, **{NO_WORKERS_TIMEOUT: "2s"})
    assert message == (f"the Dask scheduler at {cluster.address} has no workers (waited 2 s); "
                       f"start some with `dask worker {cluster.address}`")


@pytest.mark.parametrize("address", ["bogus://127.0.0.1:8786", "tcp://127.0.0.1:port", "127.0.0.1"])
def test_a_malformed_address_is_reported_at_once(address):
    with pytest.raises(StageError, match=f"could not reach the Dask scheduler at {re.escape(address)} .*{ENV_VAR}"):
        connect(address)
    # tune's default connect timeout, where Dask's config sets none (Dask's own default is 30 s)
    assert dask.config.get("distributed.comm.timeouts.connect") == CONNECT_TIMEOUT == "10s"


@stage_may_hang
@pytest.mark.parametrize("broken", ["scheduler", "worker"])
def test_a_task_failing_on_the_cluster_ends_the_stage_in_one_line(copy_project, start_cluster, broken,
                                                                  monkeypatch):
    # The scheduler unpickles each task (to schedule it), the worker to run
    # it: where skorch is missing, the task fails there. A scheduler that
    # cannot unpickle a task fails it. A worker that cannot leaves the
    # cluster; with no worker left, the stage gives up after Dask's
    # no-workers-timeout (30 s unless set; 3 s here).
    repo = copy_project()
    cluster = start_cluster(workers=1, broken=broken)
    message = tune_in_process(repo, monkeypatch, cluster.address, **{NO_WORKERS_TIMEOUT: "3s"})
    assert "\n" not in message, message
    if broken == "scheduler":
        assert message.startswith(f"{TUNE_ERROR} {cluster.address} "
                                  f"(ImportError: skorch is not installed here"), message
    else:
        assert message.startswith(f"the Dask cluster at {cluster.address} has had no workers for 3 s"), message


@stage_may_hang
def test_without_dask_installed_a_cluster_run_says_how_to_install_it(copy_project, monkeypatch):
    # Dask is the optional [cluster] extra: modules that cannot be imported play its absence.
    repo = copy_project()
    for name in ("dask", "distributed"):
        monkeypatch.setitem(sys.modules, name, None)  # `import dask` raises ImportError
    address = f"tcp://127.0.0.1:{free_ports(1)[0]}"
    message = tune_in_process(repo, monkeypatch, address)
    assert "\n" not in message and address in message and ENV_VAR in message, message
    assert message.endswith("pip install -e '.[cluster]'"), message


def failing_search(how: str) -> GridSearchCV:
    """A search whose fits fail: ``how="raise"`` raises, ``how="kill"`` kills the fit's process.

    Its classifier is defined in here: Dask pickles a task with plain pickle
    first, which would send a module-level class by reference (this module,
    which the cluster cannot import); plain pickle cannot send a local class,
    so Dask sends the task by value, with cloudpickle.
    """
    class FailingFit(ClassifierMixin, BaseEstimator):
        def __init__(self, how: str = "raise"):
            self.how = how

        def fit(self, images, labels):
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("this fit fails on purpose")

    return GridSearchCV(FailingFit(), {"how": [how]}, cv=2, scoring="accuracy", refit=False, error_score="raise")


def test_a_task_dask_fails_ends_the_search_in_one_line(start_cluster):
    # The reason the cluster path submits its own fits: joblib 1.6's dask
    # backend waited forever for a task that Dask failed. allowed-failures=0:
    # the first worker that dies on a fit makes it a KilledWorker.
    cluster = start_cluster(workers=1, env={"DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 2
    with pytest.raises(StageError, match=rf"^a grid-search task failed on the Dask cluster at "
                                         rf"{re.escape(cluster.address)} \(KilledWorker: "):
        fit_on_cluster(failing_search("kill"), images, labels, cluster.address)


def test_an_exception_in_a_fit_on_the_cluster_is_raised_as_locally_with_its_traceback(start_cluster):
    cluster = start_cluster(workers=1)
    images, labels = np.zeros((20, 28, 28), np.uint8), np.arange(20) % 2
    with pytest.raises(ValueError, match="this fit fails on purpose"):  # locally
        failing_search("raise").fit(images, labels)
    with pytest.raises(ValueError, match="this fit fails on purpose") as raised:
        fit_on_cluster(failing_search("raise"), images, labels, cluster.address)
    assert isinstance(raised.value.__cause__, FitTraceback)
    # The worker's frames (sent by value here, so without their source lines).
    assert re.search(r", in fit_and_score\n.*, in fit\nValueError: this fit fails on purpose\n",
                     str(raised.value.__cause__)), raised.value.__cause__

"""``serve --stage``: the web app serves what the registry names and follows it live; the collection token.

Versions are made on a copy of the ``reproduced`` project without training:
the models' weights scaled (so that each version answers a picture with its
own probabilities) and recorded with `dvc commit`, then registered and assigned
through mnist_dvc/apps/registry.py, as promote does once its gate has passed.
One test runs the real server (uvicorn, a subprocess) under a burst of requests
while its stage moves forward and back; the others run the app in process.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from helpers import ask, dvc, scanned_digits, sh, shared_once, start_server

from mnist_dvc.apps import registry, serve
from mnist_dvc.apps.feedback import FeedbackStore
from mnist_dvc.apps.images import to_mnist
from mnist_dvc.apps.inference import Predictor, load_release
from mnist_dvc.apps.serve import Follower, create_app

pytestmark = pytest.mark.e2e

POLL = 0.2  # s: the server's --poll under test
SWAP_DEADLINE = 60  # s: ample for a fetch and a load on a busy 2-core machine; a swap takes about 1 s


def commit_scaled_models(repo: Path, scale: float, message: str) -> str:
    """Both state_dicts' weights times ``scale``, recorded by `dvc commit` and committed; the commit."""
    import torch

    for path in ("models/mlp.pt", "models/skorch_params.pt"):
        state = torch.load(repo / path, weights_only=True)
        (repo / path).unlink()  # never write through a link into the DVC cache
        torch.save({key: value * scale for key, value in state.items()}, repo / path)
    dvc("commit", "-f", "train", "fit", cwd=repo)
    sh("git", "commit", "-qam", message, cwd=repo)
    return sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()


def release(repo: Path, commit: str) -> str:
    """Register the four files at ``commit`` as the next version (recording their sha256); the version."""
    hashes = {path: registry.sha256_of(repo / path) for path in registry.ARTIFACTS.values()}
    return registry.register_group(repo, commit, hashes)


def expected(repo: Path, version: str, picture: bytes) -> dict[str, list[float]]:
    """What ``version``'s two models answer for ``picture``: {name: probabilities}."""
    served = load_release(repo, registry.release_of(repo, version), "prod")
    return {name: rows[0].tolist() for name, rows in served.predictor.probabilities(to_mnist(picture)[None]).items()}


@pytest.fixture(scope="session")
def shared_staged(tmp_path_factory, reproduced) -> tuple[Path, str, str]:
    """A copy of ``reproduced`` with its models as the first version, in prod, and scaled weights as
    the second, registered; beside it first/models, the first version's files. Made once per test
    run and shared: read it only (tests that change it use ``staged``)."""
    def build(folder: Path) -> None:
        repo = folder / "repo"
        shutil.copytree(reproduced, repo, symlinks=True)
        shutil.copytree(repo / "models", folder / "first" / "models")
        first = release(repo, sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip())
        registry.assign_group(repo, first, "prod", "test: first")
        second = release(repo, commit_scaled_models(repo, 0.5, "scaled"))
        (folder / "versions.json").write_text(json.dumps([first, second]))

    folder = shared_once(tmp_path_factory, "staged", build)
    first, second = json.loads((folder / "versions.json").read_text())
    return folder / "repo", first, second


@pytest.fixture
def staged(shared_staged, tmp_path) -> tuple[Path, str, str]:
    """A copy of ``shared_staged`` of this test's own, to change."""
    repo, first, second = shared_staged
    shutil.copytree(repo.parent, tmp_path / "staged", symlinks=True)
    return tmp_path / "staged" / "repo", first, second


def wait_for_version(url: str, version: str) -> float:
    """Poll /api/model until it names ``version``; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < SWAP_DEADLINE:
        if httpx.get(f"{url}/api/model", timeout=30).json()["version"] == version:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"/api/model did not name {version} within {SWAP_DEADLINE} s")


def test_a_burst_of_requests_across_a_swap_and_a_rollback_has_no_error_and_no_mixed_answer(staged):
    repo, first, second = staged
    picture = scanned_digits(1)[0]
    answers = {first: expected(repo, first, picture), second: expected(repo, second, picture)}
    assert answers[first]["manual"] != answers[second]["manual"]  # the versions can be told apart

    server = start_server(repo, "--stage", "prod", "--poll", str(POLL))
    results: list[tuple[int, dict | str]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                response = http.post("/api/predict", content=picture, headers={"Content-Type": "image/png"})
                results.append((response.status_code, response.json() if response.status_code == 200
                                else response.text))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        assert httpx.get(f"{server.url}/api/model", timeout=30).json()["version"] == first
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        registry.assign_group(repo, second, "prod", "test: forward")
        forward = wait_for_version(server.url, second)
        time.sleep(0.5)
        registry.assign_group(repo, first, "prod", "test: back")  # a rollback, as promote --rollback makes it
        back = wait_for_version(server.url, first)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        log = "".join(server.stderr)
        server.stop()

    assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
    seen = {answer["model_version"] for _, answer in results}
    assert seen == {first, second}, seen
    for _, answer in results:
        for name in ("manual", "skorch"):  # both models of one answer from the version it names
            assert np.allclose(answer[name]["probabilities"], answers[answer["model_version"]][name], atol=1e-6)
    assert f"serving {second}" in log and f"serving {first}" in log and "Traceback" not in log
    print(f"{len(results)} answers; /api/model named the new version after {forward:.2f} s and "
          f"{back:.2f} s (poll {POLL} s)")


def test_a_version_whose_files_are_in_no_cache_or_fail_their_sha256_is_not_swapped_in(staged):
    repo, first, second = staged
    lines: list[str] = []
    follower = Follower(repo, "prod", log=lines.append)
    assert follower.check() and follower.current.release.version == first
    app = create_app(None, None, follower)
    # The second version's models leave the cache (a `dvc gc`, a lost disk); there is no remote.
    lock_md5 = {entry["path"]: entry["md5"] for entry in
                yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]["outs"]}
    cached = repo / ".dvc/cache/files/md5" / lock_md5["models/mlp.pt"][:2] / lock_md5["models/mlp.pt"][2:]
    cached.unlink()
    (repo / "models/mlp.pt").unlink()
    registry.assign_group(repo, second, "prod", "test: files gone")

    assert follower.check() is False
    assert follower.check() is False  # polled again: the same refusal is not logged again
    assert len(lines) == 2 and lines[1].startswith(f"mnist-dvc: not serving {second} (")
    assert "models/mlp.pt" in lines[1] and lines[1].endswith(f"still serving {first}")
    state, answer = ask(app, [{"method": "GET", "url": "/api/model"},
                              {"method": "POST", "url": "/api/predict", "content": scanned_digits(1)[0],
                               "headers": {"Content-Type": "image/png"}}])
    assert state.json()["version"] == first and second in state.json()["last_error"]
    assert answer.status_code == 200 and answer.json()["model_version"] == first

    # A third version registered with a sha256 its file does not have (the file replaced afterwards).
    shutil.copyfile(repo.parent / "first/models/mlp.pt", repo / "models/mlp.pt")
    third_commit = commit_scaled_models(repo, 0.25, "scaled again")
    hashes = {path: registry.sha256_of(repo / path) for path in registry.ARTIFACTS.values()}
    hashes["models/skorch_params.pt"] = "0" * 64
    third = registry.register_group(repo, third_commit, hashes)
    registry.assign_group(repo, third, "prod", "test: tampered")
    assert follower.check() is False
    assert len(lines) == 3 and lines[2].startswith(f"mnist-dvc: not serving {third} (")
    assert "models/skorch_params.pt: sha256 differs" in lines[2] and follower.current.release.version == first


@pytest.mark.xdist_group("shared_staged")  # one at a time: they read one project
def test_api_model_names_each_artifact_and_the_page_shows_the_version(shared_staged):
    repo, first, _ = shared_staged
    follower = Follower(repo, "prod", log=lambda line: None)
    follower.check()
    app = create_app(None, None, follower)
    state, health, page = ask(app, [{"method": "GET", "url": "/api/model"}, {"method": "GET", "url": "/api/health"},
                                    {"method": "GET", "url": "/"}])
    commit = registry.release_of(repo, first).commit
    artifacts = {a["name"]: a for a in state.json()["artifacts"]}
    assert set(artifacts) == set(registry.ARTIFACTS)
    for name, path in registry.ARTIFACTS.items():
        assert artifacts[name] | {"sha256": None} == {"name": name, "version": first, "stage": "prod",
                                                      "commit": commit, "path": path, "sha256": None,
                                                      "in_use": path.endswith(".pt")}
        assert artifacts[name]["sha256"] == registry.release_of(repo, first).sha256[path] == \
            registry.sha256_of(repo.parent / "first" / path)
    assert health.json()["model_version"] == first
    assert 'id="model-version"' in page.text


def test_without_stage_api_model_names_the_workspace_files_and_no_version(reproduced):
    app = create_app(Predictor(reproduced))
    state = ask(app, [{"method": "GET", "url": "/api/model"}])[0].json()
    assert state["version"] is None and state["stage"] is None and state["last_error"] is None
    assert {a["path"]: a["sha256"] for a in state["artifacts"]} == {
        path: registry.sha256_of(reproduced / path) for path in registry.ARTIFACTS.values()}


# --- the collection token ---------------------------------------------------------------------

def feedback(picture: bytes, authorization: str | None) -> dict:
    headers = {"Content-Type": "image/png", **({"Authorization": authorization} if authorization else {})}
    return {"method": "POST", "url": "/api/feedback?label=3", "content": picture, "headers": headers}


def test_with_a_token_feedback_needs_it_and_a_wrong_or_missing_one_stores_nothing(reproduced, tmp_path):
    store = FeedbackStore(tmp_path / "feedback")
    app = create_app(Predictor(reproduced), store, collect_token="s3cret-token")
    picture = scanned_digits(1)[0]
    health, missing, wrong, basic, right = ask(app, [
        {"method": "GET", "url": "/api/health"}, feedback(picture, None), feedback(picture, "Bearer nope"),
        feedback(picture, "Basic s3cret-token"), feedback(picture, "Bearer s3cret-token")])
    assert health.json()["collect"]["token_required"] is True
    for response in (missing, wrong, basic):
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in response.json()["error"]
    assert right.status_code == 201 and store.count() == 1


def test_on_loopback_without_a_token_feedback_works_as_before(reproduced, tmp_path):
    store = FeedbackStore(tmp_path / "feedback")
    health, stored = ask(create_app(Predictor(reproduced), store),
                         [{"method": "GET", "url": "/api/health"}, feedback(scanned_digits(1)[0], None)])
    assert "token_required" not in health.json()["collect"]
    assert stored.status_code == 201 and store.count() == 1


def test_collecting_on_another_address_without_a_token_refuses_to_start(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(serve.TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        serve.main(["--host", "0.0.0.0", "--collect", str(tmp_path / "fb"), "--root", str(tmp_path)])
    assert exit_.value.code == 2
    assert "--collect on 0.0.0.0 lets anyone" in capsys.readouterr().err
    assert not (tmp_path / "fb").exists()


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("::1", True), ("localhost", True),
                                            ("0.0.0.0", False), ("192.0.2.7", False), ("::", False)])
def test_only_loopback_addresses_count_as_loopback(host, loopback):
    assert serve.is_loopback(host) is loopback


@pytest.mark.xdist_group("shared_staged")  # one at a time: they read one project
def test_predict_with_stage_uses_the_stage_version_not_the_workspace(shared_staged, capsys, tmp_path):
    from mnist_dvc.apps import predict

    repo, first, second = shared_staged  # the workspace holds the second version's models; prod the first's
    picture = tmp_path / "digit.png"
    picture.write_bytes(scanned_digits(1)[0])
    assert predict.main([str(picture), "--json", "--stage", "prod", "--models-root", str(repo)]) == 0
    out = capsys.readouterr()
    answer = json.loads(out.out)[0]
    assert answer["model_version"] == first and out.err.startswith(f"models: {first} (")
    assert np.allclose(answer["manual"]["probabilities"], expected(repo, first, picture.read_bytes())["manual"])
    assert not np.allclose(answer["manual"]["probabilities"], expected(repo, second, picture.read_bytes())["manual"])


@pytest.mark.xdist_group("shared_staged")  # one at a time: they read one project
def test_the_page_shows_the_version_and_asks_for_the_token_once(shared_staged, tmp_path, monkeypatch):
    """Headless Chromium: the footer names the version; the first correction asks for the token, the next not."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from helpers import chromium, missing_browser
    from mnist_dvc.data import read_feedback_labels

    reason = missing_browser()
    if reason:
        pytest.skip(reason)
    repo, first, _ = shared_staged
    folder, picture = tmp_path / "feedback", tmp_path / "digit.png"
    monkeypatch.setenv(serve.TOKEN_ENV, "page-token")
    server = start_server(repo, "--stage", "prod", "--collect", str(folder))
    browser = chromium(tmp_path)
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 20).until(lambda d: d.find_element(By.ID, "model-version").text == f"Model {first}")
        for index, label in ((0, 7), (1, 2)):  # two different pictures, two corrections
            picture.write_bytes(scanned_digits(2)[index])
            browser.find_element(By.ID, "file").send_keys(str(picture))
            WebDriverWait(browser, 20).until(
                lambda d: not d.find_element(By.CSS_SELECTOR, "#feedback-digits button").get_property("disabled"))
            browser.find_element(By.CSS_SELECTOR, f"#feedback-digits button:nth-child({label + 1})").click()
            if index == 0:  # asked once...
                alert = WebDriverWait(browser, 20).until(lambda d: d.switch_to.alert)
                alert.send_keys("page-token")
                alert.accept()
            WebDriverWait(browser, 20).until(
                lambda d: f"Saved as {label}" in d.find_element(By.ID, "feedback-status").text)
        assert sorted(read_feedback_labels(folder).values()) == [2, 7]  # ...and kept for the second
    finally:
        browser.quit()
        server.stop()


def test_serve_stage_with_no_version_in_the_stage_stops_before_listening(reproduced, capsys):
    assert serve.main(["--stage", "prod", "--root", str(reproduced), "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: stage 'prod': no version is in stage 'prod' (promote one first)"

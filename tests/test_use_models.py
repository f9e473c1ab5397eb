"""Using the trained models outside the pipeline: predict, the ONNX files, dvc artifacts.

Everything runs against the ``reproduced`` project (a real `dvc repro` on the
fixture MNIST), read-only, or a copy of it: the models, ONNX files and
metrics a user has after `make repro`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

from helpers import REPO, checkout_env, committed, dvc, encode, sh, tiny_mnist_arrays, tool_env
from mnist_dvc.apps.images import load_image, to_png
from mnist_dvc.apps.inference import Predictor
from mnist_dvc.model import load_mlp
from mnist_dvc.params import load_section
from stages import export

pytestmark = pytest.mark.e2e
N_PICTURES = 30


def predict_process(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mnist_dvc.apps.predict`` of this checkout, run in ``cwd`` (a project folder)."""
    env = checkout_env(tool_env())
    return subprocess.run([sys.executable, "-m", "mnist_dvc.apps.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def predict(monkeypatch, capsys):
    """The predict command's ``main`` in this process (no start-up to pay), run in ``cwd``: its exit
    status (argparse's SystemExit included), stdout and stderr. The tests of what only a process
    shows (its exit, its output encoding, a closed pipe, its imports) run ``predict_process``."""
    from mnist_dvc.apps.predict import main

    def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            try:
                status = main(list(args))
            except SystemExit as exit_:
                status = exit_.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(["predict", *args], status, out, err)
    return run


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """Fixture test digits as pictures a user might have: dark ink on white, 6x larger, off-centre; JPEG too."""
    folder = tmp_path_factory.mktemp("pictures")
    arrays = tiny_mnist_arrays()
    images, labels = arrays["test_images"][:N_PICTURES], arrays["test_labels"][:N_PICTURES]
    paths = []
    for i, digit in enumerate(images):
        canvas = np.full((240, 260), 255, np.uint8)
        big = np.asarray(Image.fromarray(digit).resize((168, 168), Image.BICUBIC))
        canvas[20:188, 60:228] = 255 - big
        path = folder / f"digit{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(canvas).save(path, quality=90)
        paths.append(path)
    return paths, images, labels


def test_predict_prints_one_line_per_picture_with_both_models(reproduced, pictures):
    paths, _, _ = pictures
    result = predict_process(*map(str, paths[:3]), cwd=reproduced)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for path, line in zip(paths, lines):
        # my7.jpg: 7  (manual 0.98, skorch 0.98): both trainings learnt the same weights.
        assert re.fullmatch(rf"{re.escape(str(path))}: \d  \(manual \d\.\d\d, skorch \d\.\d\d\)", line), line


def test_predict_json_agrees_with_the_models_on_the_stored_test_tensors(predict, reproduced, pictures):
    paths, images, labels = pictures
    result = predict("--json", *map(str, paths), cwd=reproduced)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    assert [a["path"] for a in answers] == [str(p) for p in paths]
    for answer in answers:
        assert set(answer) == {"path", "manual", "skorch"}
        for name in ("manual", "skorch"):
            probabilities = answer[name]["probabilities"]
            assert len(probabilities) == 10 and abs(sum(probabilities) - 1) < 1e-9
            assert answer[name]["digit"] == int(np.argmax(probabilities))
    # The same digits as the model on the test tensors themselves, for nearly all pictures.
    model = load_mlp(load_section("model", reproduced / "params.yaml"), reproduced / "models/mlp.pt")
    with torch.no_grad():
        stored = model(torch.from_numpy(images).float().div(255)).argmax(1).numpy()
    from_pictures = np.array([a["manual"]["digit"] for a in answers])
    assert (from_pictures == stored).mean() >= 0.8, (from_pictures, stored)
    assert (from_pictures == labels).mean() >= 0.8


def test_one_bad_picture_is_reported_and_the_others_still_classified(predict, reproduced, pictures, tmp_path):
    paths, _, _ = pictures
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    missing = tmp_path / "missing.jpg"
    result = predict("--json", str(paths[0]), str(bad), str(missing), str(paths[1]), cwd=reproduced)
    assert result.returncode == 1
    answers = json.loads(result.stdout)
    assert [set(a) for a in answers] == [{"path", "manual", "skorch"}, {"path", "error"}, {"path", "error"},
                                        {"path", "manual", "skorch"}]
    assert "not an image" in answers[1]["error"] and "does not exist" in answers[2]["error"]
    plain = predict(str(paths[0]), str(bad), cwd=reproduced)
    assert plain.returncode == 1
    assert plain.stdout.startswith(f"{paths[0]}: ")
    assert plain.stderr.strip() == f"{bad}: error: {answers[1]['error']}"


def test_usage_errors_exit_2_and_missing_models_say_what_to_run(predict, reproduced, pictures, tmp_path):
    assert predict(cwd=reproduced).returncode == 2  # no picture given
    assert predict("--no-such-option", "a.png", cwd=reproduced).returncode == 2
    result = predict(str(pictures[0][0]), cwd=tmp_path)  # a folder without models/
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "models/mlp.pt" in lines[0] and "dvc repro" in lines[0] and "dvc pull" in lines[0]


def test_save_input_writes_the_28x28_each_picture_became(predict, reproduced, pictures, tmp_path):
    paths, _, _ = pictures
    out = tmp_path / "inputs"
    assert predict("--save-input", str(out), *map(str, paths[:2]), cwd=reproduced).returncode == 0
    saved = sorted(out.iterdir())
    assert [p.name for p in saved] == ["1-digit00.png", "2-digit01.png"]
    for path, picture in zip(saved, paths):
        with Image.open(path) as img:
            assert img.size == (28, 28) and img.mode == "L"
        assert path.read_bytes() == to_png(load_image(picture))


def test_save_input_refuses_an_unusable_folder_before_any_work(predict, reproduced, pictures, tmp_path):
    paths, _, _ = pictures
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for folder, reason in [(a_file, "exists and is not a folder"), (a_file / "sub", "cannot create the folder")]:
        result = predict("--save-input", str(folder), str(paths[0]), cwd=reproduced)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert "Traceback" not in result.stderr and "--save-input: " in result.stderr
        assert reason in result.stderr.strip().splitlines()[-1]


def test_save_input_shortens_a_long_picture_name(predict, reproduced, pictures, tmp_path):
    paths, _, _ = pictures
    long = tmp_path / ("x" * 240 + ".png")  # a legal name; with the number and temp suffix it was not
    long.write_bytes(paths[1].read_bytes())
    out = tmp_path / "inputs"
    result = predict("--save-input", str(out), str(long), cwd=reproduced)
    assert result.returncode == 0, result.stderr
    (saved,) = out.iterdir()
    assert saved.name == "1-" + "x" * 120 + ".png"
    assert saved.read_bytes() == to_png(load_image(long))


def test_a_file_name_that_is_not_utf8_is_printed_escaped(reproduced, pictures, tmp_path):
    paths, _, _ = pictures
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/seven-\xff.png"))
    odd.write_bytes(paths[1].read_bytes())
    env = {**checkout_env(tool_env()), "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run([sys.executable, "-m", "mnist_dvc.apps.predict", str(paths[0]), str(odd)], cwd=reproduced,
                            env=env, capture_output=True, timeout=120)
    assert result.returncode == 0 and result.stderr == b"", result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{tmp_path}/seven-\\udcff.png: "), lines


def test_a_reader_that_stops_early_gets_no_traceback(reproduced, pictures):
    paths, _, _ = pictures
    read, write = os.pipe()
    os.close(read)  # the reader is gone before predict prints (as `predict ... | head -0`)
    try:
        result = subprocess.run([sys.executable, "-m", "mnist_dvc.apps.predict", "--json", *map(str, paths[:3])],
                                cwd=reproduced, env=checkout_env(tool_env()), stdout=write,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == "", result.stderr


def test_onnx_backend_gives_the_same_answers_as_pytorch(predict, reproduced, pictures):
    paths, _, _ = pictures
    torch_answers = json.loads(predict("--json", *map(str, paths), cwd=reproduced).stdout)
    onnx_answers = json.loads(predict("--json", "--onnx", *map(str, paths), cwd=reproduced).stdout)
    for a, b in zip(torch_answers, onnx_answers):
        for name in ("manual", "skorch"):
            assert a[name]["digit"] == b[name]["digit"]
            assert np.allclose(a[name]["probabilities"], b[name]["probabilities"], atol=1e-5)


def test_onnx_path_never_imports_torch(reproduced, pictures):
    code = ("import sys; from mnist_dvc.apps.predict import main; code = main(['--onnx', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(pictures[0][0])], cwd=reproduced,
                            env=checkout_env(tool_env()), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- the ONNX files and their contract ----------------------------------------------------

def test_onnx_files_follow_the_contract_and_were_checked_against_pytorch(reproduced):
    metrics = json.loads((reproduced / "metrics/export.json").read_text())
    for name, file in (("manual", "mlp.onnx"), ("skorch", "skorch.onnx")):
        path = reproduced / "models" / file
        assert not list(path.parent.glob(f"{file}.data")), "one self-contained file"
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        (inp,), (out,) = model.graph.input, model.graph.output
        assert inp.name == "images" and out.name == "logits"
        assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
        assert isinstance(in_dims[0], str) and in_dims[1:] == [28, 28]  # N is dynamic
        assert out_dims == [in_dims[0], 10]
        entry = metrics[name]
        # The check that passed, nothing ONNX Runtime's kernels or the machine's load decide.
        assert entry == {"onnx_bytes": path.stat().st_size, "test_images": 297,
                         "max_abs_diff_allowed": export.MAX_ABS_DIFF, "argmax_agreement": 1.0}


def test_export_that_disagrees_with_pytorch_fails_and_keeps_no_output(reproduced, tmp_path, monkeypatch):
    monkeypatch.chdir(reproduced)
    monkeypatch.setattr(export, "MAX_ABS_DIFF", 0.0)  # no export can be exactly equal in every logit
    out = {"--manual-onnx": tmp_path / "mlp.onnx", "--skorch-onnx": tmp_path / "skorch.onnx",
           "--metrics": tmp_path / "export.json"}
    with pytest.raises(export.StageError, match=r"ONNX Runtime and PyTorch disagree .*no ONNX file was written"):
        export.main([arg for option, path in out.items() for arg in (option, str(path))])
    assert list(tmp_path.iterdir()) == []


README = (REPO / "README.md").read_text()


def readme_snippet(marker: str) -> str:
    """The code block after ``<!-- marker -->`` in the README."""
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", README, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


def test_readme_onnx_snippet_classifies_a_picture_with_onnxruntime_numpy_and_pillow_only(reproduced, tmp_path):
    snippet = readme_snippet("onnx-snippet")
    imports = set(re.findall(r"^(?:from|import) (\w+)", snippet, re.M))
    assert imports <= {"numpy", "onnxruntime", "PIL"}, imports
    digit = tiny_mnist_arrays()["test_images"][0]
    (tmp_path / "digit.png").write_bytes(encode(digit))  # a 28x28 white-on-black digit
    (tmp_path / "models").mkdir()
    (tmp_path / "models/mlp.onnx").write_bytes((reproduced / "models/mlp.onnx").read_bytes())
    env = {key: value for key, value in tool_env().items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model = load_mlp(load_section("model", reproduced / "params.yaml"), reproduced / "models/mlp.pt")
    with torch.no_grad():
        expected = int(model(torch.from_numpy(digit).float().div(255)[None]).argmax())
    assert result.stdout.strip() == str(expected)


# --- the models as DVC artifacts -----------------------------------------------------------

ARTIFACTS = yaml.safe_load((REPO / "dvc.yaml").read_text())["artifacts"]


def test_artifacts_declare_every_model_file_with_its_contract_and_accuracy():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    model_outs = {out for stage in stages.values() for out in stage.get("outs", []) if str(out).startswith("models/")}
    assert {a["path"] for a in ARTIFACTS.values()} == model_outs
    for artifact in ARTIFACTS.values():
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"]
        meta = artifact["meta"]
        assert "float32 (N, 28, 28), values in [0, 1], white digit on black" in meta["input"]
        assert "(N, 10)" in meta["output"]
    # The committed results, not an experiment's in the workspace: each declared accuracy is that of HEAD's metrics.
    accuracy = json.loads(committed("metrics/evaluate.json"))
    for name, artifact in yaml.safe_load(committed("dvc.yaml"))["artifacts"].items():
        which = "skorch" if "skorch" in name else "manual"
        assert artifact["meta"]["test_accuracy"] == round(accuracy[which]["accuracy"], 4), name


def test_the_readme_shows_the_committed_test_metrics():
    evaluation = json.loads(committed("metrics/evaluate.json"))
    for name, label in (("manual", "explicit loop (`train`)"), ("skorch", "skorch (`fit`)")):
        scores = evaluation[name]
        row = f"| {label} | {scores['accuracy']:.4f} | {scores['loss']:.4f} | {scores['macro_f1']:.4f} |"
        assert row in README, row


def test_dvc_artifacts_get_fetches_a_registered_model_from_the_dvc_remote(copy_project, tmp_path):
    repo = copy_project()
    storage = tmp_path / "dvc-storage"
    dvc("remote", "add", "-d", "storage", str(storage), cwd=repo)
    sh("git", "add", ".dvc/config", cwd=repo)
    sh("git", "commit", "-q", "-m", "DVC remote", cwd=repo)
    dvc("push", cwd=repo)
    # A version of the artifact is a git tag in GTO's format (what `gto register` writes).
    sh("git", "tag", "-a", "mlp-onnx@v1.0.0", "-m", "Registering artifact mlp-onnx version v1.0.0", cwd=repo)
    # Fetched through a clone that has no DVC cache: the bytes can only come from the remote.
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = dvc("artifacts", "get", str(clone), "mlp-onnx", cwd=elsewhere)
    assert "Downloaded 1 file(s)" in result.stdout, result.stdout
    assert (elsewhere / "mlp.onnx").read_bytes() == (repo / "models/mlp.onnx").read_bytes()
    assert not (clone / ".dvc/cache").exists()


def test_predictor_reports_the_test_accuracy_of_each_model(reproduced):
    predictor = Predictor(reproduced)  # each model file's sha256: /api/health (tests/test_serve.py)
    accuracy = json.loads((reproduced / "metrics/evaluate.json").read_text())
    assert predictor.test_accuracy() == {name: accuracy[name]["accuracy"] for name in ("manual", "skorch")}

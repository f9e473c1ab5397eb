"""params.yaml validation: every bad value is one line naming the key, the value and what is allowed.

``mnist_dvc.params.load_section`` is the first thing every stage calls, so
these messages are what a user sees after a typo in params.yaml or in
``dvc exp run -S``.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from helpers import committed_params, committed_params_file, edit_params, run_stage_script, set_key
from mnist_dvc.params import SECTIONS, load_section
from mnist_dvc.stage import StageError

REPO_PARAMS = committed_params()
GOOD_MD5 = "f68b3c2dcbeaaa9fbdd348bbdeb94873"

# (dotted key, bad value, substrings the one-line message must contain besides
# "<key> = <value!r>" [, what the message names instead when one item of a list
# is wrong: "<key>[i] = <item!r>"]). Every key of every section appears at
# least once; see test_every_key_of_every_section_has_a_bad_value_case.
BAD_VALUES = [
    # download
    ("download.mirrors", [], ["at least 1 item"]),
    ("download.mirrors", ["ftp://example.com/mnist/"], ["'ftp://example.com/mnist/' is not an http://, https:// or file:// URL"]),
    ("download.mirrors", ["https://ok.example/", "no-scheme/path"], ["'no-scheme/path' is not an http://"]),
    ("download.mirrors", ["http://"], ["is not an http://"]),
    ("download.mirrors", ["http:/mirror/mnist/"], ["'http:/mirror/mnist/' is not an http://"]),  # no host
    ("download.mirrors", ["https:///mnist/"], ["is not an http://"]),
    ("download.mirrors", ["file:"], ["is not an http://"]),
    ("download.mirrors", "http://example.com/", ["valid list"]),
    ("download.md5", "f68b3c2dcbeaaa9fbdd348bbdeb94873", ["valid dictionary"]),
    ("download.md5.train_images", GOOD_MD5[:31], ["^[0-9a-f]{32}$"]),
    ("download.md5.train_labels", GOOD_MD5 + "0", ["^[0-9a-f]{32}$"]),
    ("download.md5.test_images", GOOD_MD5.upper(), ["^[0-9a-f]{32}$"]),
    ("download.md5.test_labels", "g" * 32, ["^[0-9a-f]{32}$"]),
    ("download.retries", 0, ["greater than or equal to 1"]),
    ("download.retries", 21, ["less than or equal to 20"]),
    ("download.retries", True, ["valid integer"]),
    ("download.timeout", 0, ["greater than 0"]),
    ("download.timeout", 601, ["less than or equal to 600"]),
    ("download.timeout", "30", ["valid number"]),
    ("download.backoff", -1, ["greater than or equal to 0"]),
    ("download.backoff", 61, ["less than or equal to 60"]),
    # preprocess
    ("preprocess.val_size", 1.5, ["a fraction must be in [0, 1)"]),
    ("preprocess.val_size", 1.0, ["a fraction must be in [0, 1)"]),
    ("preprocess.val_size", 60000, ["a count must be below 60000"]),
    ("preprocess.val_size", -1, ["greater than or equal to 0"]),
    ("preprocess.val_size", -0.1, ["greater than or equal to 0"]),
    ("preprocess.val_size", "0.1", ["valid number"]),
    ("preprocess.seed", -1, ["greater than or equal to 0"]),
    ("preprocess.seed", 1.5, ["valid integer"]),
    ("preprocess.seed", 2**32, ["less than or equal to 4294967295"]),
    ("preprocess.feedback", 10, ["valid dictionary"]),
    ("preprocess.feedback.repeat", 0, ["greater than or equal to 1"]),
    ("preprocess.feedback.repeat", 1001, ["less than or equal to 1000"]),
    ("preprocess.feedback.repeat", 2.5, ["valid integer"]),
    ("preprocess.feedback.holdout", 1.0, ["less than 1"]),
    ("preprocess.feedback.holdout", -0.1, ["greater than or equal to 0"]),
    ("preprocess.feedback.holdout", "0.2", ["valid number"]),
    # model
    ("model.hidden", [], ["at least 1 item"]),
    ("model.hidden", [128, 0], ["greater than or equal to 1"], "model.hidden[1] = 0"),
    ("model.hidden", [128, 1.5], ["valid integer"], "model.hidden[1] = 1.5"),
    ("model.hidden", [128, 100_000_000], ["less than or equal to 65536"], "model.hidden[1] = 100000000"),
    ("model.hidden", 128, ["valid list"]),
    ("model.activation", "softmax", ["'relu', 'tanh', 'gelu' or 'sigmoid'"]),
    ("model.dropout", 1.0, ["less than 1"]),
    ("model.dropout", -0.1, ["greater than or equal to 0"]),
    # train
    ("train.epochs", 0, ["greater than or equal to 1"]),
    ("train.epochs", True, ["valid integer"]),
    ("train.batch_size", 0, ["greater than or equal to 1"]),
    ("train.lr", -0.1, ["greater than 0"]),
    ("train.lr", 0, ["greater than 0"]),
    ("train.lr", 11, ["less than or equal to 10"]),
    ("train.lr", "0.001", ["valid number"]),
    ("train.lr", float("nan"), ["finite number"]),
    ("train.optimizer", "rmsprop", ["'adam', 'adamw' or 'sgd'"]),
    ("train.momentum", 1.0, ["less than 1"]),
    ("train.weight_decay", -0.01, ["greater than or equal to 0"]),
    ("train.weight_decay", 2, ["less than or equal to 1"]),
    ("train.schedule", "step", ["'constant', 'onecycle' or 'cosine'"]),
    ("train.warmup", 1.0, ["less than 1"]),
    ("train.warmup", -0.1, ["greater than or equal to 0"]),
    ("train.augment", 2, ["valid dictionary"]),
    ("train.augment.shift", 9, ["less than or equal to 8"]),
    ("train.augment.shift", 1.5, ["valid integer"]),
    ("train.augment.rotate", 90, ["less than or equal to 45"]),
    ("train.augment.rotate", -5, ["greater than or equal to 0"]),
    ("train.feedback", 3, ["valid dictionary"]),
    ("train.feedback.epochs", -1, ["greater than or equal to 0"]),
    ("train.feedback.epochs", 1.5, ["valid integer"]),
    ("train.feedback.lr_scale", 0, ["greater than 0"]),
    ("train.feedback.lr_scale", 11, ["less than or equal to 10"]),
    ("train.seed", -1, ["greater than or equal to 0"]),
    ("train.seed", 2**64, ["less than or equal to 4294967295"]),  # torch: "Overflow when unpacking long long"
    ("train.threads", 0, ["greater than or equal to 1"]),
    ("train.threads", 257, ["less than or equal to 256"]),
    ("train.device", "tpu", ["'auto', 'cpu' or 'cuda'"]),
    ("train.cuda_graph", "yes", ["'auto', 'on' or 'off'"]),
    ("train.cuda_graph", True, ["'auto', 'on' or 'off'"]),
    # evaluate
    ("evaluate.batch_size", 0, ["greater than or equal to 1"]),
    # plot
    ("plot.dpi", 10, ["greater than or equal to 30"]),
    ("plot.dpi", 700, ["less than or equal to 600"]),
    ("plot.misclassified", 0, ["greater than or equal to 1"]),
    ("plot.misclassified", 101, ["less than or equal to 100"]),
    ("numerics.cpu", "fast", ["Input should be 'portable' or 'native'"]),
    ("promote.max_drop", -0.01, ["greater than or equal to 0"]),
    ("promote.max_drop", 2, ["less than or equal to 1"]),
    # tune
    ("tune.subset_size", 50, ["greater than or equal to 100"]),
    ("tune.subset_size", 60001, ["less than or equal to 60000"]),
    ("tune.cv", 1, ["greater than or equal to 2"]),
    ("tune.n_jobs", 0, ["greater than or equal to 1"]),
    ("tune.batch_size", 0, ["greater than or equal to 1"]),
    ("tune.seed", -1, ["greater than or equal to 0"]),
    ("tune.seed", 2**32, ["less than or equal to 4294967295"]),
    ("tune.grid", [0.001], ["valid dictionary"]),
    ("tune.grid.lr", [], ["at least 1 item"]),
    # Each item is checked with the bounds of the key it stands for, and named by its index.
    ("tune.grid.lr", [0.001, -0.1], ["greater than 0"], "tune.grid.lr[1] = -0.1"),
    ("tune.grid.lr", [0.001, 0], ["greater than 0"], "tune.grid.lr[1] = 0"),
    ("tune.grid.lr", [0.001, 11.0], ["less than or equal to 10"], "tune.grid.lr[1] = 11.0"),  # train.lr's bounds
    ("tune.grid.lr", [float("nan")], ["finite number"], "tune.grid.lr[0] = nan"),
    ("tune.grid.lr", [float("inf")], ["finite number"], "tune.grid.lr[0] = inf"),
    ("tune.grid.hidden", [], ["at least 1 item"]),
    ("tune.grid.hidden", [[128], []], ["at least 1 item"], "tune.grid.hidden[1] = []"),
    ("tune.grid.hidden", [[128, 0]], ["greater than or equal to 1"], "tune.grid.hidden[0][1] = 0"),
    ("tune.grid.hidden", [[65537]], ["less than or equal to 65536"], "tune.grid.hidden[0][0] = 65537"),
    ("tune.grid.max_epochs", [5, 0], ["greater than or equal to 1"], "tune.grid.max_epochs[1] = 0"),
    ("tune.grid.max_epochs", [], ["at least 1 item"]),
]


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def with_value(tmp_path: Path, dotted: str, value) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copyfile(committed_params_file(), path)
    edit_params(path, {dotted: value})
    return path


def load_error(path: Path, section: str) -> str:
    with pytest.raises(StageError) as info:
        load_section(section, path)
    return str(info.value)


def all_dotted_keys(model: type[BaseModel], prefix: str) -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        keys.append(key)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += all_dotted_keys(annotation, key)
    return keys


SCHEMA_KEYS = [key for section, model in SECTIONS.items() for key in all_dotted_keys(model, section)]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_repo_params_yaml_validates_for_every_section(section):
    load_section(section, committed_params_file())


def test_repo_params_yaml_has_exactly_the_schema_sections():
    assert set(REPO_PARAMS) == set(SECTIONS)


def test_every_key_of_every_section_has_a_bad_value_case():
    covered = {case[0] for case in BAD_VALUES}
    assert set(SCHEMA_KEYS) - covered == set()
    assert covered - set(SCHEMA_KEYS) == set()  # and no case names a key the schema lacks


@pytest.mark.parametrize(
    "key, value, expected, named", [(*case, None)[:4] for case in BAD_VALUES],
    ids=[f"{case[0]}={case[1]!r}" for case in BAD_VALUES],
)
def test_bad_value_is_rejected_with_one_line_naming_key_value_and_what_is_allowed(
        tmp_path, key, value, expected, named):
    path = with_value(tmp_path, key, value)
    message = load_error(path, key.split(".")[0])
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert f"{named or f'{key} = {value!r}'}: " in message
    for part in expected:
        assert part in message


@pytest.mark.parametrize("key", SCHEMA_KEYS)
def test_missing_key_is_rejected_naming_the_full_key(tmp_path, key):
    params = copy.deepcopy(REPO_PARAMS)
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    del node[last]
    message = load_error(write(tmp_path, params), key.split(".")[0])
    assert "\n" not in message
    assert f"{key}: missing" in message


@pytest.mark.parametrize(
    "key, allowed",
    [
        ("train.learning_rate", "epochs, batch_size, lr, optimizer, momentum, weight_decay, schedule, warmup, "
                                "augment, feedback, seed, threads, device, cuda_graph"),
        ("train.augment.scale", "shift, rotate"),
        ("model.layers", "hidden, activation, dropout"),
        ("download.mirror", "mirrors, md5, retries, timeout, backoff"),
        ("download.md5.train_image", "train_images, train_labels, test_images, test_labels"),
        ("tune.grid.epochs", "lr, hidden, max_epochs"),
        ("preprocess.val_fraction", "val_size, seed, feedback"),
    ],
)
def test_unknown_key_typo_is_rejected_listing_the_allowed_keys(tmp_path, key, allowed):
    message = load_error(with_value(tmp_path, key, 0.01), key.split(".")[0])
    assert "\n" not in message
    assert f"{key}: unknown key (allowed keys: {allowed})" in message


def test_onecycle_without_a_warm_up_is_refused_naming_the_key(tmp_path):
    params = copy.deepcopy(REPO_PARAMS)
    set_key(params, "train.schedule", "onecycle")
    set_key(params, "train.warmup", 0.0)
    message = load_error(write(tmp_path, params), "train")
    assert "\n" not in message
    assert "train.warmup = 0.0: the onecycle schedule needs a warm-up fraction above 0" in message
    set_key(params, "train.warmup", 0.3)
    assert load_section("train", write(tmp_path, params)).warmup == 0.3


def test_several_bad_values_are_all_reported_on_one_line(tmp_path):
    params = copy.deepcopy(REPO_PARAMS)
    set_key(params, "train.lr", -1.0)
    set_key(params, "train.optimizer", "rmsprop")
    message = load_error(write(tmp_path, params), "train")
    assert "\n" not in message
    assert "train.lr = -1.0: " in message and "train.optimizer = 'rmsprop': " in message


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_missing_section_is_rejected_naming_it(tmp_path, section):
    params = copy.deepcopy(REPO_PARAMS)
    del params[section]
    message = load_error(write(tmp_path, params), section)
    assert message == f"{tmp_path / 'params.yaml'}: section '{section}' is missing"


def test_section_that_is_not_a_mapping_is_rejected(tmp_path):
    message = load_error(with_value(tmp_path, "train", 5), "train")
    assert "\n" not in message
    assert "train = 5: " in message and "valid dictionary" in message


@pytest.mark.parametrize("text", ["", "- just\n- a list\n"])
def test_empty_or_non_mapping_file_reports_the_missing_section(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert load_error(path, "train") == f"{path}: section 'train' is missing"


def test_invalid_yaml_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1\n  epochs: 3\n")
    message = load_error(path, "train")
    assert "\n" not in message
    assert message.startswith(f"{path} is not valid YAML: ")


def test_missing_params_file_says_where_to_run_from(tmp_path):
    message = load_error(tmp_path / "params.yaml", "train")
    assert "not found" in message and "repository root" in message


def test_params_file_that_is_not_utf8_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")  # Latin-1
    message = load_error(path, "train")
    assert "\n" not in message
    assert message.startswith(f"{path} is not valid UTF-8 (invalid continuation byte at byte 22)")


def test_an_integer_too_long_to_read_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: " + "9" * 5000 + "\n")
    assert load_error(path, "train") == (f"{path}: a value cannot be read: Exceeds the limit (4300 digits) "
                                         f"for integer string conversion: value has 5000 digits")


def test_params_file_that_is_a_directory_is_one_line_naming_it(tmp_path):
    (tmp_path / "params.yaml").mkdir()
    message = load_error(tmp_path / "params.yaml", "train")
    assert message == f"{tmp_path / 'params.yaml'} is a directory, not a file: put the YAML params file there"


def test_valid_values_at_the_edges_are_accepted(tmp_path):
    params = copy.deepcopy(REPO_PARAMS)
    for key, value in [
        ("download.mirrors", ["file:///srv/mnist/", "file://localhost/srv/mnist", "http://127.0.0.1:8000/mnist/",
                              "https://ossci-datasets.s3.amazonaws.com/mnist"]),
        ("download.retries", 1),
        ("download.backoff", 0),
        ("preprocess.val_size", 0.0),
        ("preprocess.val_size", 59999),
        ("model.dropout", 0.0),
        ("train.lr", 10),  # an int where a float is expected is fine
        ("train.seed", 2**32 - 1),
        ("preprocess.seed", 0),
        ("model.hidden", [65_536, 1]),
    ]:
        set_key(params, key, value)
    path = write(tmp_path, params)
    for section in ("download", "preprocess", "model", "train"):
        load_section(section, path)
    assert load_section("preprocess", path).val_size == 59999


def test_stage_script_with_bad_param_exits_1_with_one_error_line_and_no_traceback(tmp_path):
    with_value(tmp_path, "train.lr", -0.1)
    result = run_stage_script("train", cwd=tmp_path, check=False, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: params.yaml: train.lr = -0.1: ")
    assert "greater than 0" in lines[0]
    assert not (tmp_path / "models").exists()  # nothing was written

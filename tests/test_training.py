"""The model and both trainings: sizes, learning, the skorch NaN regression, determinism, safe reload."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch import nn

from pathlib import Path

from helpers import committed_params_file, sections_with
from mnist_dvc.data import load_split
from mnist_dvc.model import MLP, build_mlp, load_mlp, load_trained, loss_and_accuracy, predict_logits
from mnist_dvc.params import load_section
from mnist_dvc.skorch_net import build_net
from mnist_dvc.stage import StageError
from stages import evaluate as evaluate_stage
from stages import fit as fit_stage
from stages import train as train_stage


@pytest.mark.parametrize(("hidden", "count"), [([128, 64], 109_386), ([128], 101_770)])
def test_parameter_counts_match_the_reference_architectures(hidden, count):
    model = MLP(hidden)
    assert sum(p.numel() for p in model.parameters()) == count


def test_same_seed_builds_identical_weights_regardless_of_global_rng():
    a = MLP([64], seed=7)
    torch.rand(1000)  # move the global RNG: the init must not depend on it
    b = MLP([64], seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(MLP([64], seed=8).layers[1].weight, a.layers[1].weight)


def splits(folder):
    return load_split(folder / "data/processed", "train"), load_split(folder / "data/processed", "val")


def test_a_few_epochs_of_the_explicit_loop_lower_the_loss(prepared):
    train_split, val_split = splits(prepared)
    model_params, train_params = load_section("model"), load_section("train")
    untrained = build_mlp(model_params, train_params.seed)
    before, _ = loss_and_accuracy(predict_logits(untrained, *train_split[:1], 500), train_split[1])
    model = train_stage.train(model_params, train_params, train_split, val_split)
    after, accuracy = loss_and_accuracy(predict_logits(model, *train_split[:1], 500), train_split[1])
    assert after < before / 3
    assert accuracy > 0.85


def test_skorch_fit_has_a_finite_loss_and_learns(prepared):
    # The NaN regression: with skorch's default NLLLoss on logits, the loss is
    # unbounded below; build_net uses CrossEntropyLoss and must stay finite.
    train_split, val_split = splits(prepared)
    net = fit_stage.fit(load_section("model"), load_section("train"), train_split, val_split)
    losses = net.history[:, "train_loss"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert net.history[-1, "valid_acc"] > 0.8


@pytest.mark.parametrize("training", ["train", "fit"])
def test_a_loss_that_becomes_nan_ends_the_training_with_one_line(prepared, training):
    # A NaN pixel stands for any way training can diverge: the loss is NaN from the first batch on.
    (images, labels), val_split = splits(prepared)
    images = images.clone()
    images[5, 3, 3] = float("nan")
    run = train_stage.train if training == "train" else fit_stage.fit
    with pytest.raises(StageError, match=r"^training diverged: train/loss is nan after epoch 1; lower train\.lr"):
        run(load_section("model"), load_section("train"), (images, labels), val_split)


def test_skorch_default_nllloss_on_logits_is_not_a_valid_loss(prepared):
    # What the classic tutorial does, shown so the comment in build_net stays true:
    # NLLLoss takes raw logits as log-probabilities and the "loss" goes negative.
    train_split, _ = splits(prepared)
    net = build_net(load_section("model"), load_section("train"), seed=0, criterion=nn.NLLLoss, lr=0.01)
    assert net.criterion is nn.NLLLoss
    net.fit(*train_split)
    assert net.history[-1, "train_loss"] < 0 or not math.isfinite(net.history[-1, "train_loss"])


def test_fit_trains_on_the_whole_training_split_and_validates_on_the_predefined_one(prepared):
    train_split, val_split = splits(prepared)
    net = fit_stage.fit(load_section("model"), load_section("train"), train_split, val_split)
    epoch = net.history[-1]
    assert sum(b.get("train_batch_size", 0) for b in epoch["batches"]) == len(train_split[0])
    assert sum(b.get("valid_batch_size", 0) for b in epoch["batches"]) == len(val_split[0])


# The tutorial's defaults, then every option that changes what a training draws or
# computes, alone and all together (dropout included: its masks must match too).
RECIPES = {
    "defaults": {},
    "dropout": {"model": {"dropout": 0.2, "hidden": [64, 32]}},
    "onecycle": {"train": {"schedule": "onecycle", "warmup": 0.3}},
    "cosine with warm-up": {"train": {"schedule": "cosine", "warmup": 0.1}},
    "constant with warm-up": {"train": {"warmup": 0.2}},
    "weight decay (adamw)": {"train": {"optimizer": "adamw", "weight_decay": 0.05}},
    "shifts": {"train": {"augment": {"shift": 2, "rotate": 0.0}}},
    "shifts and rotations": {"train": {"augment": {"shift": 2, "rotate": 10.0}}},
    "everything": {"model": {"dropout": 0.1}, "train": {"schedule": "onecycle", "warmup": 0.25,
                                                        "weight_decay": 1e-4, "augment": {"shift": 2, "rotate": 8.0}}},
}


@pytest.mark.parametrize("recipe", RECIPES)
def test_skorch_fit_and_explicit_loop_learn_bit_identical_weights(prepared, recipe):
    # Same init seed, same batch order (one seeded permutation per epoch), the
    # same augmentations, dropout masks and learning rates from the same seeded
    # generators and schedule, same loss and optimizer: skorch adds
    # bookkeeping, not different arithmetic.
    train_split, val_split = splits(prepared)
    model_params, train_params = sections_with(RECIPES[recipe])
    loop = train_stage.train(model_params, train_params, train_split, val_split)
    torch.rand(100)  # the global RNG moved between the two: it must not matter
    net = fit_stage.fit(model_params, train_params, train_split, val_split)
    for (name, a), b in zip(loop.state_dict().items(), net.module_.state_dict().values()):
        assert torch.equal(a, b), name
    if train_params.schedule != "constant" or train_params.warmup:
        # skorch's LRScheduler stepped every batch, through the same schedule as the loop.
        lrs = [lr for epoch in net.history for lr in (b["event_lr"] for b in epoch["batches"] if "event_lr" in b)]
        assert len(lrs) == train_params.epochs * -(-len(train_split[0]) // train_params.batch_size)
        assert max(lrs) <= train_params.lr + 1e-12 and len(set(lrs)) > 2


@pytest.mark.parametrize("recipe", [name for name in RECIPES if name != "defaults"])
def test_each_option_changes_what_is_learnt(prepared, recipe):
    # An option that did nothing would pass the identity test above too. The
    # baseline: the defaults with the recipe's architecture, without dropout.
    train_split, val_split = splits(prepared)
    architecture = {k: v for k, v in RECIPES[recipe].get("model", {}).items() if k != "dropout"}
    baseline = list(train_stage.train(*sections_with({"model": architecture}), train_split, val_split).parameters())
    changed = list(train_stage.train(*sections_with(RECIPES[recipe]), train_split, val_split).parameters())
    assert [p.shape for p in baseline] == [p.shape for p in changed]
    assert not all(torch.equal(a, b) for a, b in zip(baseline, changed))


def test_dropout_masks_depend_on_the_seed_only_and_vanish_in_eval_mode():
    model = MLP([64], dropout=0.5, seed=3).train()
    x = torch.ones(8, 28, 28)
    torch.manual_seed(123)
    first = MLP([64], dropout=0.5, seed=3).train()(x)
    torch.manual_seed(456)
    second = MLP([64], dropout=0.5, seed=3).train()(x)
    assert torch.equal(first, second)  # the global RNG plays no part
    assert not torch.equal(first, MLP([64], dropout=0.5, seed=4).train()(x))
    model.eval()
    without_dropout = MLP([64], dropout=0.0, seed=3)  # the same weights (same seed), no dropout layers
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), without_dropout.parameters()))
    assert torch.equal(model(x), without_dropout.eval()(x))  # eval mode: no mask, no scaling


def run_main(stage, folder: Path, name: str) -> Path:
    """Run a training stage's ``main`` in-process with its outputs named ``name``; the model file."""
    model = folder / f"models/{name}.pt"
    stage.main(["--model", str(model), "--live", str(folder / f"metrics/{name}")])
    return model


def test_rerunning_train_and_fit_gives_byte_identical_model_files(prepared):
    for stage in (train_stage, fit_stage):
        first, second = (run_main(stage, prepared, f"{stage.__name__}-{i}").read_bytes() for i in (1, 2))
        assert first == second, stage.__name__


def test_train_logs_each_epoch_with_dvclive(prepared):
    run_main(train_stage, prepared, "mlp")
    epochs = load_section("train", prepared / "params.yaml").epochs
    plots = prepared / "metrics/mlp/plots/metrics"
    for metric in ("train/loss", "val/loss", "val/accuracy"):
        rows = (plots / f"{metric}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{metric.split('/')[-1]}" and len(rows) == 1 + epochs
    assert not list(prepared.glob("models/.*.tmp"))


def test_saved_models_reload_with_weights_only_and_predict_identically(prepared):
    manual_path, skorch_path = run_main(train_stage, prepared, "mlp"), run_main(fit_stage, prepared, "skorch_params")
    model_params = load_section("model")
    test_images, _ = load_split(prepared / "data/processed", "test")
    state = torch.load(manual_path, weights_only=True)
    loop = build_mlp(model_params, seed=123)  # a different init, overwritten by the state_dict
    loop.load_state_dict(state)
    loop_logits = predict_logits(loop, test_images, 100)
    assert torch.equal(loop_logits, predict_logits(load_mlp(model_params, manual_path), test_images, 100))
    # skorch's own loader and load_mlp (evaluate, predict and export use it) read
    # skorch's save_params file as the same weights: bit-identical logits.
    net = build_net(model_params, load_section("train"), seed=0, batch_size=1000, classes=list(range(10)))
    net.initialize()
    net.load_params(f_params=str(skorch_path))  # torch.load with weights_only=True (build_net's torch_load_kwargs)
    skorch_logits = net.forward(test_images)
    assert torch.equal(skorch_logits, predict_logits(load_mlp(model_params, skorch_path), test_images, 100))
    assert torch.equal(skorch_logits, loop_logits)  # both trainings learnt the same weights
    assert (net.predict(test_images) == loop_logits.argmax(1).numpy()).all()


def model_128():
    return sections_with({"model": {"hidden": [128]}}, committed_params_file())[0]


def good_state() -> dict[str, torch.Tensor]:
    return build_mlp(model_128(), seed=0).state_dict()


# (what the file holds, the reason the one-line error gives)
BAD_STATES = {
    # Before these checks: "TypeError: Expected state_dict to be dict-like" with a traceback.
    "tensor": (lambda: torch.zeros(3), "the file does not hold a state dict but Tensor"),
    "none": (lambda: None, "the file does not hold a state dict but None"),
    "list": (lambda: list(good_state().values()), "the file does not hold a state dict but list"),
    "int-value": (lambda: {**good_state(), "layers.1.bias": 3}, "'layers.1.bias' is int, not a tensor"),
    # Accepted silently before: truncated weights, NaN metrics and answers.
    "int64": (lambda: {k: v.long() for k, v in good_state().items()},
              "layers.1.weight is torch.int64, not floating point"),
    "nan": (lambda: {**good_state(), "layers.3.bias": torch.full((10,), float("nan"))},
            "layers.3.bias holds NaN or infinite values"),
    "inf": (lambda: {**good_state(), "layers.1.weight": good_state()["layers.1.weight"] / 0},
            "layers.1.weight holds NaN or infinite values"),
    # load_state_dict's own error: its header and the first specific reason, on one line.
    "other-hidden": (lambda: MLP([64]).state_dict(),
                     "Error(s) in loading state_dict for MLP: size mismatch for layers.1.weight: copying a param "
                     "with shape torch.Size([64, 784]) from checkpoint, the shape in current model is "
                     "torch.Size([128, 784]) (rerun the train stage)"),
    "missing-key": (lambda: {k: v for k, v in good_state().items() if k != "layers.3.bias"},
                    'Error(s) in loading state_dict for MLP: Missing key(s) in state_dict: "layers.3.bias" (rerun'),
    "unexpected-key": (lambda: {**good_state(), "extra": torch.zeros(1)},
                       'Error(s) in loading state_dict for MLP: Unexpected key(s) in state_dict: "extra" (rerun'),
}


@pytest.mark.parametrize("bad", BAD_STATES)
def test_a_model_file_that_is_not_a_finite_float_state_dict_is_refused_in_one_line(tmp_path, bad):
    make, reason = BAD_STATES[bad]
    path = tmp_path / "mlp.pt"
    torch.save(make(), path)
    with pytest.raises(StageError) as info:
        load_trained("manual", model_128(), path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused to load as manual model weights: ")
    assert reason in message and message.endswith(" (rerun the train stage)")


def test_evaluate_refuses_nan_weights_before_writing_any_metric(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(committed_params_file(), tmp_path / "params.yaml")
    (tmp_path / "models").mkdir()
    torch.save(good_state(), tmp_path / "models/mlp.pt")
    torch.save({k: v * float("nan") for k, v in good_state().items()}, tmp_path / "models/skorch_params.pt")
    with pytest.raises(StageError, match=r"^models/skorch_params\.pt: refused to load as skorch model weights: "
                                         r"layers\.1\.weight holds NaN or infinite values \(rerun the fit stage\)$"):
        evaluate_stage.main([])
    assert not (tmp_path / "metrics").exists()

"""The trainer: disjoint stratified folds, per-fold seeds, determinism, EMA."""

from __future__ import annotations

import torch

from ml_infer.checkpoints import read_checkpoint
from ml_infer.train import train_folds

from .conftest import FIXTURE_FOLDS, compose_config


def train(tmp_path, name, *overrides):
    cfg = compose_config(
        ["folds=2", "epochs=1", *overrides], config_name="train", runs_dir=tmp_path / name
    )
    return train_folds(cfg)


def test_same_seed_trains_identical_weights_and_folds_differ(tmp_path):
    first = train(tmp_path, "a")
    second = train(tmp_path, "b")
    assert [p.relative_to(tmp_path / "a") for p in first] == [
        p.relative_to(tmp_path / "b") for p in second
    ]
    for path_a, path_b in zip(first, second):
        a, _ = read_checkpoint(path_a)
        b, _ = read_checkpoint(path_b)
        for name, tensor in a["model_state_dict"].items():
            assert torch.equal(tensor, b["model_state_dict"][name]), name
    fold0, _ = read_checkpoint(first[0])
    fold1, _ = read_checkpoint(first[1])
    assert fold0["metrics"]["seed"] != fold1["metrics"]["seed"]
    assert not torch.equal(
        fold0["model_state_dict"]["0.0.weight"], fold1["model_state_dict"]["0.0.weight"]
    )


def test_fixture_folds_partition_the_train_split(fold_paths):
    sizes = [read_checkpoint(p)[0]["metrics"] for p in fold_paths]
    train_split = sizes[0]["train_size"] + sizes[0]["val_size"]
    # Disjoint validation parts that together cover the train split (StratifiedKFold).
    assert sum(m["val_size"] for m in sizes) == train_split
    assert all(m["train_size"] + m["val_size"] == train_split for m in sizes)
    assert len(fold_paths) == FIXTURE_FOLDS


def test_best_epoch_is_chosen_on_raw_validation_accuracy(fold_paths):
    for path in fold_paths:
        metrics = read_checkpoint(path)[0]["metrics"]
        assert 0 <= metrics["epoch"] < metrics["epochs"]
        assert metrics["val_accuracy"] > 0.9
        assert 0 < metrics["val_accuracy_ema"] <= 1

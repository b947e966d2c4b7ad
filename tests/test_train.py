"""The trainer: disjoint stratified folds, per-fold seeds, determinism, EMA."""

from __future__ import annotations

import pytest
import torch

from ml_infer.checkpoints import read_checkpoint
from ml_infer.train import train_folds

from .conftest import FIXTURE_FOLDS, compose_config


def train(tmp_path, name, *overrides):
    cfg = compose_config(
        ["folds=2", "epochs=1", *overrides], config_name="train", runs_dir=tmp_path / name
    )
    return train_folds(cfg)


@pytest.mark.slow
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
    from ml_infer.data import DigitsDataset

    held_out = [set(read_checkpoint(p)[0]["metrics"]["val_ids"]) for p in fold_paths]
    for i, ids in enumerate(held_out):
        for other in held_out[i + 1 :]:
            assert not ids & other  # disjoint validation parts
    train_ids = set(DigitsDataset(split="train").sample_ids)
    assert set().union(*held_out) == train_ids  # together: the whole train split, nothing else
    test_ids = set(DigitsDataset(split="test").sample_ids)
    assert not train_ids & test_ids
    assert len(fold_paths) == FIXTURE_FOLDS


def test_best_epoch_is_the_best_raw_validation_accuracy(fold_paths):
    for path in fold_paths:
        metrics = read_checkpoint(path)[0]["metrics"]
        history = metrics["val_accuracy_history"]
        assert len(history) == metrics["epochs"]
        assert metrics["epoch"] == history.index(max(history))  # the first epoch reaching the best
        assert metrics["val_accuracy"] == max(history) > 0.9
        assert 0 < metrics["val_accuracy_ema"] <= 1


def test_a_folder_without_a_train_split_cannot_be_trained_on(tmp_path):
    from PIL import Image

    from ml_infer.errors import UserError

    for name in ("a", "b"):
        (tmp_path / "flat" / name).mkdir(parents=True)
        Image.new("L", (8, 8), 128).save(tmp_path / "flat" / name / "x.png")
    cfg = compose_config(
        ["data=imagefolder", f"data.root={tmp_path / 'flat'}", "folds=2", "epochs=1"],
        config_name="train",
        runs_dir=tmp_path / "runs",
    )
    with pytest.raises(UserError, match="has no train/ folder"):
        train_folds(cfg)

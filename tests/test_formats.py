"""Checkpoints from elsewhere: the seed project's best.pt, plain state dicts, safetensors.

Each is made from one of our trained folds, so the right answer is known: the same weights
must give exactly the metrics of the fold's own checkpoint.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ml_infer.checkpoints import open_checkpoint, read_checkpoint
from ml_infer.errors import UserError
from ml_infer.models import SmallCNN
from ml_infer.task import run_evaluation

from .conftest import compose_config

COMPARED = ("accuracy", "nll", "ece", "brier", "n")


def seed_best_pt(fold_path, *, with_config: bool = True) -> dict:
    """A best.pt laid out as the seed project's ml-train writes it (DESIGN.md, 'Checkpoints')."""
    ours, _ = read_checkpoint(fold_path)
    model = SmallCNN(in_channels=1, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(2, 1, 8, 8)).sum().backward()
    optimizer.step()
    checkpoint = {
        "epoch": 12,
        "model_state_dict": ours["model_state_dict"],
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": {"last_epoch": 12, "_step_count": 13, "base_lrs": [1e-3]},
        "best_acc": 0.99,
        "train_losses": [1.2, 0.4, 0.1],
        "val_accuracies": [0.8, 0.95, 0.99],
        "timestamp": "2026-11-20T10:00:00",
        "torch_rng_state": torch.get_rng_state(),
        "numpy_rng_state": np.random.get_state(),
        "python_rng_state": random.getstate(),
        "ema_state": {
            "ema_model_state": ours["ema_state_dict"],
            "decay": 0.999,
            "warmup_steps": 100,
            "updates": 1200,
        },
    }
    if with_config:
        checkpoint["config"] = seed_run_config(ours)
    return checkpoint


def seed_run_config(ours: dict) -> dict:
    return {
        "model": {"name": "small_cnn", "num_classes": 10, "input_size": 8},
        "transforms": {
            "test": {
                "resize": 8,
                "normalize": {"mean": ours["input"]["mean"], "std": ours["input"]["std"]},
            }
        },
    }


@pytest.fixture(scope="module")
def reference(runs_dir, tmp_path_factory):
    """Metrics of fold 0 as our own checkpoint, raw and EMA weights."""
    out = tmp_path_factory.mktemp("reference")
    fold = f"ensemble.checkpoints=[{runs_dir}/fold_0/weights/best.pt]"
    raw = run_evaluation(compose_config([fold], runs_dir=runs_dir), output_dir=out / "raw")
    ema = run_evaluation(
        compose_config([fold, "use_ema=true"], runs_dir=runs_dir), output_dir=out / "ema"
    )
    return {"raw": raw, "ema": ema}


def run_foreign(path, runs_dir, out, *extra):
    cfg = compose_config(
        ["model=small_cnn", f"ensemble.checkpoints=[{path}]", *extra], runs_dir=runs_dir
    )
    return run_evaluation(cfg, output_dir=out)


@pytest.mark.slow
@pytest.mark.parametrize("use_ema", [False, True], ids=["raw", "ema"])
def test_seed_best_pt_with_ema_state_loads_safely(
    fold_paths, runs_dir, reference, tmp_path, use_ema
):
    path = tmp_path / "best.pt"
    torch.save(seed_best_pt(fold_paths[0]), path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)  # plain weights_only refuses the numpy RNG state
    assert open_checkpoint(path).format == "seed"
    metrics = run_foreign(path, runs_dir, tmp_path / "run", f"use_ema={str(use_ema).lower()}")
    expected = reference["ema" if use_ema else "raw"]
    assert (
        metrics["weights"] == ["ema" if use_ema else "raw"]
        and metrics["checkpoint_format"] == "seed"
    )
    for key in COMPARED:
        assert metrics[key] == expected[key], key


def test_use_ema_changes_the_weights_of_a_seed_checkpoint(reference):
    assert reference["raw"]["nll"] != reference["ema"]["nll"]


def test_seed_run_config_beside_the_weights_folder(fold_paths, runs_dir, reference, tmp_path):
    from omegaconf import OmegaConf

    run = tmp_path / "runs" / "seed_run"
    (run / "weights").mkdir(parents=True)
    torch.save(seed_best_pt(fold_paths[0], with_config=False), run / "weights" / "best.pt")
    OmegaConf.save(seed_run_config(read_checkpoint(fold_paths[0])[0]), run / "config.yaml")
    metrics = run_foreign(run / "weights" / "best.pt", runs_dir, tmp_path / "out")
    assert metrics["accuracy"] == reference["raw"]["accuracy"]


def input_overrides(fold_path) -> list[str]:
    spec = read_checkpoint(fold_path)[0]["input"]
    return [
        "checkpoint.input.size=[8,8]",
        f"checkpoint.input.mean=[{spec['mean'][0]}]",
        f"checkpoint.input.std=[{spec['std'][0]}]",
    ]


def test_plain_state_dict_loads_with_the_input_given(fold_paths, runs_dir, reference, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(read_checkpoint(fold_paths[0])[0]["model_state_dict"], path)
    metrics = run_foreign(path, runs_dir, tmp_path / "run", *input_overrides(fold_paths[0]))
    assert metrics["checkpoint_format"] == "state_dict"
    for key in COMPARED:
        assert metrics[key] == pytest.approx(reference["raw"][key], abs=1e-7), key


def test_safetensors_load(fold_paths, runs_dir, reference, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(dict(read_checkpoint(fold_paths[0])[0]["model_state_dict"]), path)
    metrics = run_foreign(path, runs_dir, tmp_path / "run", *input_overrides(fold_paths[0]))
    assert metrics["checkpoint_format"] == "safetensors"
    for key in COMPARED:
        assert metrics[key] == pytest.approx(reference["raw"][key], abs=1e-7), key


def test_a_checkpoint_that_does_not_describe_its_input_is_a_clear_error(
    fold_paths, runs_dir, tmp_path
):
    path = tmp_path / "model.safetensors"
    save_file(dict(read_checkpoint(fold_paths[0])[0]["model_state_dict"]), path)
    with pytest.raises(UserError, match=r"does not describe its input; set checkpoint.input.size"):
        run_foreign(path, runs_dir, tmp_path / "run")


def test_a_foreign_checkpoint_needs_an_architecture(fold_paths, runs_dir, tmp_path):
    path = tmp_path / "best.pt"
    torch.save(seed_best_pt(fold_paths[0]), path)
    cfg = compose_config([f"ensemble.checkpoints=[{path}]"], runs_dir=runs_dir)
    with pytest.raises(UserError, match="does not name its architecture; choose one with model="):
        run_evaluation(cfg, output_dir=tmp_path / "run")


def test_a_seed_checkpoint_with_another_class_count_is_refused(fold_paths, runs_dir, tmp_path):
    checkpoint = seed_best_pt(fold_paths[0])
    checkpoint["config"]["model"]["num_classes"] = 7
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    with pytest.raises(UserError, match="trained on 7 classes, the data has 10"):
        run_foreign(path, runs_dir, tmp_path / "run")


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        open_checkpoint(path)


def test_unknown_dict_layout_names_its_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weights": {"a": 1}, "notes": "x"}, path)
    with pytest.raises(UserError, match="not a format ml_infer reads.*its keys: notes, weights"):
        open_checkpoint(path)

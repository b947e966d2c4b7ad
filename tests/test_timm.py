"""timm models and checkpoints: `model=timm`, checkpoints as timm's train.py writes them through
the safe loader, EMA weights, and the evaluation transform of timm's own data config."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_infer.checkpoints import open_checkpoint
from ml_infer.errors import UserError
from ml_infer.task import run_evaluation

from .conftest import compose_config

# Every test here builds timm models (timm takes seconds to import): the full suite only.
pytestmark = pytest.mark.slow


def timm_checkpoint(path: Path, model: torch.nn.Module, ema: torch.nn.Module, **extra) -> Path:
    """What timm's CheckpointSaver writes: epoch, arch, state_dict, state_dict_ema, optimizer
    state, version, its argparse arguments, metric."""
    torch.save(
        {
            "epoch": 3,
            "arch": "resnet18",
            "state_dict": model.state_dict(),
            "state_dict_ema": ema.state_dict(),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
            "version": 2,
            "args": argparse.Namespace(model="resnet18", lr=0.1, img_size=None, amp=True),
            "metric": 0.5,
            **extra,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    ema = timm.create_model("resnet18", pretrained=False, num_classes=2).eval()
    return model, ema


def timms_own_probabilities(model: torch.nn.Module, folder: Path, paths: list[str]) -> np.ndarray:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    batch = []
    for path in paths:
        with Image.open(folder / path) as image:
            batch.append(transform(image.convert("RGB")))
    with torch.inference_mode():
        return model(torch.stack(batch)).softmax(dim=1).numpy()


def scored(folder: Path, checkpoint: Path, out: Path, *overrides: str) -> tuple[list, np.ndarray]:
    cfg = compose_config(
        [
            "model=timm",
            f"ensemble.checkpoints=[{checkpoint}]",
            "data=imagefolder",
            f"data.root={folder}",
            *overrides,
        ]
    )
    run_evaluation(cfg, output_dir=out)
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    probs = np.array([[float(r["prob_cat"]), float(r["prob_coffee"])] for r in rows])
    return [r["path"] for r in rows], probs


@pytest.mark.slow
def test_a_timm_checkpoint_gives_timms_own_probabilities(photo_folder, models, tmp_path):
    model, ema = models
    checkpoint = timm_checkpoint(tmp_path / "model_best.pth.tar", model, ema)
    paths, ours = scored(photo_folder, checkpoint, tmp_path / "raw")
    assert np.abs(ours - timms_own_probabilities(model, photo_folder, paths)).max() < 1e-5
    paths, ours_ema = scored(photo_folder, checkpoint, tmp_path / "ema", "use_ema=true")
    assert np.abs(ours_ema - timms_own_probabilities(ema, photo_folder, paths)).max() < 1e-5
    assert np.abs(ours_ema - ours).max() > 1e-3  # the EMA weights were the ones used


@pytest.mark.slow
def test_timms_checkpoint_format_loads_as_data(models, tmp_path):
    model, ema = models
    found = open_checkpoint(timm_checkpoint(tmp_path / "a.pth.tar", model, ema))
    assert found.format == "timm" and found.ema_state_dict is not None
    assert set(found.state_dict) == set(model.state_dict())
    hostile = tmp_path / "hostile.pth.tar"
    timm_checkpoint(hostile, model, ema, args=argparse.Namespace(hook=print))
    with pytest.raises(UserError, match="not safe to unpickle"):
        open_checkpoint(hostile)


def test_the_input_comes_from_timms_data_config_unless_set():
    from ml_infer.bank import configured_input_spec

    spec = configured_input_spec(compose_config(["model=timm"]), Path("x.pt"))
    assert (spec.size, spec.interpolation, spec.resize) == ((224, 224), "bicubic", 235)  # 0.95
    spec = configured_input_spec(
        compose_config(["model=timm", "checkpoint.input.crop_pct=0.875"]), Path("x.pt")
    )
    assert spec.resize == 256
    with pytest.raises(UserError, match="unknown timm model 'resnet_nope'"):
        from ml_infer.models import timm_classifier

        timm_classifier("resnet_nope", in_channels=3, num_classes=2)


@pytest.mark.slow
def test_an_ensemble_may_mix_formats_of_one_architecture(photo_folder, models, tmp_path):
    """A timm train.py checkpoint and a plain state dict of the same timm architecture ensemble
    like two folds: the mean of their own probabilities."""
    model, ema = models
    timm_file = timm_checkpoint(tmp_path / "a.pth.tar", model, ema)
    plain = tmp_path / "b.pt"
    torch.save({f"module.{k}": v for k, v in ema.state_dict().items()}, plain)  # DataParallel
    cfg = compose_config(
        [
            "model=timm",
            "strategy=ensemble",
            f"ensemble.checkpoints=[{timm_file},{plain}]",
            "data=imagefolder",
            f"data.root={photo_folder}",
        ]
    )
    metrics = run_evaluation(cfg, output_dir=tmp_path / "run")
    assert metrics["models"] == 2
    with (tmp_path / "run" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [r["path"] for r in rows]
    ours = np.array([[float(r["prob_cat"]), float(r["prob_coffee"])] for r in rows])
    expected = (
        timms_own_probabilities(model, photo_folder, paths)
        + timms_own_probabilities(ema, photo_folder, paths)
    ) / 2
    assert np.abs(ours - expected).max() < 1e-5

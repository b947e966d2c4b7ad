"""What every row runs: the preloaded images of a model family (a workload) and the engine.

A workload holds its members (the trained digit folds or random models), their input and the
images every row runs, on the benchmark device; `engine_predictor` builds our engine on it with
the one EngineSettings value of the run (`engine_settings`: conf/config.yaml and the command line).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ml_infer.aggregate import SoftVoting
from ml_infer.augment import Views
from ml_infer.bank import load_classifier
from ml_infer.config import conf_dir
from ml_infer.data import DigitsDataset, make_loader
from ml_infer.evaluate import build_views
from ml_infer.inputs import InputSpec, fit_images
from ml_infer.models import SmallCNN, torchvision_classifier
from ml_infer.predictor import EngineSettings, Predictor

ENSEMBLE_SIZES = (1, 3, 5)
MEMBERS = max(ENSEMBLE_SIZES)  # models per workload: the largest ensemble's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# How the engine ran before issue 6: chunks of 256, contiguous memory, BatchNorm kept.
BEFORE_TUNING = EngineSettings(forward_batch_size=256, channels_last=False, fold_batch_norm=False)


@dataclasses.dataclass
class Workload:
    """One model family: its members, their input, and the preloaded images every row runs."""

    name: str
    models: list[nn.Module]
    input_spec: InputSpec
    images: Tensor  # [N, C, H, W] in [0, 1], on the benchmark device
    labels: Tensor
    batch_size: int
    note: str

    @functools.cached_property
    def batches(self) -> list[Tensor]:
        return list(self.images.split(self.batch_size))


def digits_workload(
    runs_dir: Path, n_images: int, batch_size: int, device: torch.device
) -> Workload:
    """The digits CNN: the trained folds where they exist, random SmallCNNs for the rest."""
    paths = sorted(runs_dir.glob("fold_*/weights/best.pt"))[:MEMBERS]
    classifiers = [load_classifier(path) for path in paths]
    models = [classifier.model for classifier in classifiers]
    if classifiers:
        input_spec = classifiers[0].input_spec
        note = f"{len(paths)} trained fold(s) from {runs_dir}"
    else:
        input_spec = InputSpec(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))
        note = f"no folds under {runs_dir}: random weights"
    torch.manual_seed(0)
    if classifiers and len(models) < MEMBERS:
        note += f" + {MEMBERS - len(models)} random SmallCNN(s)"
    while len(models) < MEMBERS:
        models.append(SmallCNN(in_channels=1, num_classes=10))
    images, labels = tiled_digits(n_images, image_size=input_spec.size, channels=1)
    return Workload(
        name="digits_cnn",
        models=[model.eval().to(device) for model in models],
        input_spec=input_spec,
        images=images.to(device),
        labels=labels,
        batch_size=batch_size,
        note=f"{note}; {n_images} images of 1x8x8 in batches of {batch_size}",
    )


def resnet_workload(n_images: int, batch_size: int, device: torch.device) -> Workload:
    """torchvision's resnet18 (random weights) on the digits, resized to 3x64x64."""
    torch.manual_seed(0)
    models = [torchvision_classifier("resnet18", in_channels=3, num_classes=10) for _ in range(5)]
    images, labels = tiled_digits(n_images, image_size=(64, 64), channels=3)
    return Workload(
        name="resnet18@64",
        models=[model.eval().to(device) for model in models],
        input_spec=InputSpec(size=(64, 64), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        images=images.to(device),
        labels=labels,
        batch_size=batch_size,
        note=f"random weights; {n_images} images of 3x64x64 in batches of {batch_size}",
    )


def tiled_digits(
    n_images: int, *, image_size: Sequence[int], channels: int
) -> tuple[Tensor, Tensor]:
    """`n_images` real digits (the test split, repeated as often as needed), fitted to a model."""
    digits = DigitsDataset(split="test")
    images, labels, _ = next(iter(make_loader(digits, batch_size=len(digits))))
    repeats = math.ceil(n_images / len(digits))
    images, labels = images.repeat(repeats, 1, 1, 1)[:n_images], labels.repeat(repeats)[:n_images]
    return fit_images(images, image_size=image_size, channels=channels), labels


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """conf/config.yaml's engine block, with the command line's overrides."""
    from omegaconf import OmegaConf

    configured = EngineSettings.from_config(OmegaConf.load(conf_dir() / "config.yaml").engine)
    forward_batch_size = args.forward_batch_size or configured.forward_batch_size
    if str(forward_batch_size).isdigit():
        forward_batch_size = int(forward_batch_size)
    return dataclasses.replace(
        configured,
        forward_batch_size=forward_batch_size,
        channels_last=configured.channels_last
        if args.channels_last is None
        else args.channels_last,
        fold_batch_norm=configured.fold_batch_norm
        if args.fold_batch_norms is None
        else args.fold_batch_norms,
    )


def engine_predictor(
    workload: Workload,
    views: Views,
    n_models: int,
    device: torch.device,
    settings: EngineSettings,
    autocast_dtype: torch.dtype | None = None,
) -> Predictor:
    """Our engine on copies of the first `n_models` models (a Predictor converts what it gets)."""
    return Predictor(
        [copy.deepcopy(model) for model in workload.models[:n_models]],
        views,
        SoftVoting(),
        SoftVoting(),
        workload.input_spec,
        device=device,
        autocast_dtype=autocast_dtype,
        engine=settings,
    )


def preset_views(preset: str) -> Views:
    """The views of conf/tta/<preset>.yaml."""
    from omegaconf import OmegaConf

    return build_views(list(OmegaConf.load(conf_dir() / "tta" / f"{preset}.yaml").augmentations))

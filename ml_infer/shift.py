"""Input shift: the scored images corrupted (`shift=<corruption> shift.severity=1..5`).

A corruption is applied to the [0, 1] images before test-time views and normalisation, once
per run, in batches. Its random numbers come from a generator per image seeded by (data set,
image id, corruption, seed): the same pixels in every run, process, batch size and strategy, so
that comparisons under shift stay paired. The seed leaves out the severity on purpose: the
severities of one image share their random numbers (the same Gaussian noise, scaled; the same
salt-and-pepper positions, more of them; the same blur angle and warp), so that a higher severity
changes the same image more rather than differently. Shot noise is the exception: a Poisson
draw at another rate is another draw. Severity 0 is the clean data set itself (the same tensor).

The calibration split is never shifted: whatever a strategy fits (temperature, conformal
thresholds, learned weights, cascade thresholds) is fitted on clean images, as it would be
before deployment, and scored on shifted ones.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import torch

from ml_infer.config import CLEAN_SHIFT, corruption_names, instantiate, options
from ml_infer.corruptions import Corruption, check_severity
from ml_infer.errors import UserError, one_of
from ml_infer.imagesets import FileImages, TensorImages

log = logging.getLogger(__name__)

BATCH_SIZE = 256
CHANGE_SAMPLE = 256  # images a streamed folder's mean pixel change is measured on


@dataclasses.dataclass(frozen=True)
class Shift:
    """What `shift.*` asks for: a corruption (None for clean), its severity and seed."""

    name: str = CLEAN_SHIFT
    severity: int = 0
    seed: int = 0
    corruption: Corruption | None = None

    @property
    def is_clean(self) -> bool:
        return self.corruption is None or self.severity == 0

    def describe(self) -> dict[str, Any]:
        return {"shift": self.name, "severity": self.severity, "shift_seed": self.seed}


def shift_of(cfg: Any) -> Shift:
    """The run's `shift` block, checked: a known corruption, a severity 0-5, an integer seed."""
    block = cfg.get("shift")
    if block is None:
        return Shift()
    name = str(block.get("name", CLEAN_SHIFT))
    severity = check_severity(block.get("severity", 0))
    seed = block.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"shift.seed must be an integer, got {seed!r}")
    if block.get("corruption") is None:
        if name != CLEAN_SHIFT:
            raise one_of("shift", name, options("shift"))
        if severity != 0:
            raise UserError(
                f"shift.severity={severity} needs a corruption: add shift=NAME, one of "
                f"{corruption_names()}"
            )
        return Shift(seed=seed)
    corruption = instantiate(block.corruption)
    if not isinstance(corruption, Corruption):
        raise UserError(
            f"shift.corruption built a {type(corruption).__name__}, not an "
            "ml_infer.corruptions.Corruption"
        )
    return Shift(name, severity, seed, corruption)


def image_seed(data: str, sample_id: Any, corruption: str, seed: int) -> int:
    """The seed of one image's corruption: a digest of what identifies it, never of the batch.

    >>> image_seed("digits", 7, "blur", 0) == image_seed("digits", 7, "blur", 0)
    True
    >>> image_seed("digits", 7, "blur", 0) != image_seed("digits", "7", "blur", 0)
    True
    """
    identity = json.dumps([data, sample_id, corruption, seed], default=str)
    return int(hashlib.sha256(identity.encode()).hexdigest()[:15], 16)


def generators_for(data: str, sample_ids: Sequence[Any], shift: Shift) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed(image_seed(data, sample_id, shift.name, shift.seed))
        for sample_id in sample_ids
    ]


def corrupt(
    images: torch.Tensor, sample_ids: Sequence[Any], data: str, shift: Shift
) -> torch.Tensor:
    """A batch [B, C, H, W] of [0, 1] images with ids `sample_ids`, corrupted as `shift` says."""
    if shift.is_clean:
        return images
    assert shift.corruption is not None
    # A digest and a generator per image only for the corruptions that draw random numbers.
    generators = generators_for(data, sample_ids, shift) if shift.corruption.is_random else []
    return shift.corruption(images, shift.severity, generators)


def shifted(dataset: TensorImages, shift: Shift, data: str) -> tuple[TensorImages, dict[str, Any]]:
    """The data set under `shift` (the data set itself when clean), and what to report of it:
    the shift, whether it applied to these images, and the mean absolute pixel change."""
    unchanged = shift.describe() | {"shift_applied": False, "shift_mean_abs_change": 0.0}
    if shift.is_clean:
        return dataset, unchanged
    assert shift.corruption is not None
    if isinstance(dataset, FileImages) and dataset.streamed:
        return _shifted_stream(dataset, shift, data)
    clean = _pixels(dataset)
    if not shift.corruption.applies_to(clean.shape[1]):
        log.warning(
            "shift %s does not apply to %d-channel images: they are scored as they are",
            shift.name,
            clean.shape[1],
        )
        return dataset, unchanged
    images = torch.empty(clean.shape, dtype=torch.float32)
    change = 0.0
    for start in range(0, len(clean), BATCH_SIZE):
        batch = clean[start : start + BATCH_SIZE]
        ids = dataset.sample_ids[start : start + BATCH_SIZE]
        images[start : start + BATCH_SIZE] = corrupt(batch, ids, data, shift)
        change += float((images[start : start + BATCH_SIZE] - batch).abs().double().sum())
    result = TensorImages(
        images, dataset.labels, dataset.sample_ids, dataset.classes, dataset.skipped
    )
    result.id_name = dataset.id_name
    result.shift = shift.describe()
    log.info("shift %s, severity %d: %d images", shift.name, shift.severity, len(images))
    return result, shift.describe() | {
        "shift_applied": True,
        "shift_mean_abs_change": change / max(1, images.numel()),
    }


def _shifted_stream(
    dataset: FileImages, shift: Shift, data: str
) -> tuple[TensorImages, dict[str, Any]]:
    """A streamed folder under `shift`: corrupted per batch, as it is decoded; the mean absolute
    change is measured on its first CHANGE_SAMPLE images (decoding them all is a pass of its own).
    """
    unchanged = shift.describe() | {"shift_applied": False, "shift_mean_abs_change": 0.0}
    assert shift.corruption is not None
    if not shift.corruption.applies_to(dataset.reader.channels):
        log.warning(
            "shift %s does not apply to %d-channel images: they are scored as they are",
            shift.name,
            dataset.reader.channels,
        )
        return dataset, unchanged
    result = dataset.subset(range(len(dataset)))
    assert isinstance(result, FileImages)
    # Held images are keyed by their corrupted pixels; streamed ones by what makes them.
    made_by = type(shift.corruption)
    result.shift = shift.describe() | {
        "data": data,
        "corruption": f"{made_by.__module__}.{made_by.__qualname__}:{vars(shift.corruption)}",
    }
    result.corruption = functools.partial(corrupt, data=data, shift=shift)
    sample = range(min(CHANGE_SAMPLE, len(dataset)))
    change = (result.pixels(sample) - dataset.pixels(sample)).abs().double().mean()
    log.info("shift %s, severity %d: %d images, streamed", shift.name, shift.severity, len(result))
    return result, shift.describe() | {
        "shift_applied": True,
        "shift_mean_abs_change": float(change),
    }


def _pixels(dataset: Any) -> torch.Tensor:
    """Every image of the data set as float [N, C, H, W] in [0, 1] (uint8 scaled)."""
    if hasattr(dataset, "pixels"):
        images = dataset.pixels()
    else:
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()

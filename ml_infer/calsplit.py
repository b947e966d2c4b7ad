"""The calibration split: labelled images a calibrator or a conformal threshold is fitted on,
never the images a strategy is scored on.

In order of preference: `calibration.holdout_fraction` (a fixed-seed stratified part of the
scored split, then left out of scoring), `data.val_root` (a folder of its own), or the data
set's `val` split (digits, textures, our trainer's folders with a val/ folder). A calibration
split that shares an image id with the scored split is refused.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from ml_infer.data import build_dataset
from ml_infer.errors import UserError
from ml_infer.imagesets import TensorImages

log = logging.getLogger(__name__)


@dataclasses.dataclass
class CalibrationSplit:
    """The images to fit on, the images left to score, and where the former came from."""

    calibration: TensorImages
    scored: TensorImages
    source: str  # "val", "val_root DIR" or "holdout 0.5 of test (seed 0)"


def needs_calibration_split(cfg: DictConfig) -> bool:
    return cfg.calibration.method != "none" or cfg.conformal.method != "none"


def calibration_split(
    cfg: DictConfig, scored: TensorImages, fit: dict[str, Any]
) -> CalibrationSplit:
    """The calibration images for `scored` (the evaluated split, or the folder to predict),
    with `scored` reduced when a holdout is taken from it."""
    fraction = cfg.calibration.get("holdout_fraction")
    val_root = cfg.data.get("val_root")
    if fraction is not None:
        if cfg.mode == "predict":
            raise UserError(
                "calibration.holdout_fraction needs labelled images; mode=predict calibrates on "
                "the data's val split or data.val_root=DIR"
            )
        if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise UserError(
                f"calibration.holdout_fraction must lie in (0, 1) or be null, got {fraction!r}"
            )
        calibration_positions, scored_positions = stratified_holdout(
            scored.labels.tolist(), float(fraction), seed=cfg.seed
        )
        split = CalibrationSplit(
            scored.subset(calibration_positions),
            scored.subset(scored_positions),
            f"holdout {fraction} of {cfg.data.split} (seed {cfg.seed})",
        )
    elif val_root is not None:
        if "root" not in cfg.data.keys():  # noqa: SIM118 (a required ??? root counts)
            raise UserError(
                f"data.val_root is for image folders; data={cfg.data.name} has a val split"
            )
        if cfg.mode == "evaluate":
            _refuse_overlapping_folders(Path(str(val_root)), Path(str(cfg.data.root)), cfg)
        data = OmegaConf.merge(cfg.data, {"root": str(val_root)})
        split = CalibrationSplit(build_dataset(data, "val", **fit), scored, f"val_root {val_root}")
    else:
        if cfg.mode == "evaluate" and cfg.data.split == "val":
            raise UserError(
                "data.split=val is the calibration split: score data.split=test, or fit on "
                "calibration.holdout_fraction=0.5 of it"
            )
        split = CalibrationSplit(build_dataset(cfg.data, "val", **fit), scored, "val")
        if cfg.mode == "evaluate" and not set(split.calibration.sample_ids).isdisjoint(
            scored.sample_ids
        ):
            raise UserError(
                f"data {cfg.data.name} has no val split apart from the scored images (an image "
                "folder without val/ and test/ folders); set data.val_root=DIR or "
                "calibration.holdout_fraction=0.5"
            )
    if len(split.scored) == 0 or len(split.calibration) == 0:
        raise UserError(
            f"the calibration split ({len(split.calibration)} images) or the scored split "
            f"({len(split.scored)} images) is empty"
        )
    return split


def _refuse_overlapping_folders(val_root: Path, data_root: Path, cfg: DictConfig) -> None:
    """data.val_root must not hold the scored images, nor lie inside their folder (ids are
    relative to each root, so they cannot tell)."""
    from ml_infer.folders import split_dir

    scored = split_dir(data_root, str(cfg.data.split)).resolve()
    calibration = split_dir(val_root, "val").resolve()
    if calibration == scored or scored in calibration.parents or calibration in scored.parents:
        raise UserError(
            f"data.val_root {str(val_root)!r} holds the scored images ({scored}); give a "
            "folder of other labelled images, or use calibration.holdout_fraction=0.5"
        )


def stratified_holdout(
    labels: Sequence[int], fraction: float, *, seed: int
) -> tuple[list[int], list[int]]:
    """Positions of a `fraction` of the images (stratified by label when every class has two
    images or more, fixed by `seed`) and of the rest, each sorted.

    >>> held, rest = stratified_holdout([0, 0, 1, 1, 1, 1], 0.5, seed=0)
    >>> len(held), len(rest), set(held) & set(rest)
    (3, 3, set())
    """
    from sklearn.model_selection import train_test_split

    labels_array = np.asarray(labels)
    counts = np.unique(labels_array, return_counts=True)[1]
    stratify = labels_array if len(counts) > 1 and counts.min() >= 2 else None
    if stratify is None and len(counts) > 1:
        log.warning("a class has one image: the calibration holdout is not stratified")
    try:
        rest, held = train_test_split(
            np.arange(len(labels_array)),
            test_size=fraction,
            stratify=stratify,
            random_state=seed,
        )
    except ValueError as error:  # too few images for the fraction and the classes
        raise UserError(
            f"calibration.holdout_fraction={fraction} cannot split {len(labels_array)} images "
            f"({str(error).splitlines()[0]})"
        ) from None
    return sorted(held.tolist()), sorted(rest.tolist())

"""What a strategy's probabilities are worth once fitted on the calibration split: calibrated
probabilities (temperature or vector scaling, per member or on the merged output) and conformal
prediction sets, with the figures of both beside the raw ones.

Everything is fitted on the calibration split's outputs (from the prediction store, like the
scored split's) and only applied to the scored images.

Vector scaling and a conformal threshold are not fitted on the same images: the calibration
split is then halved (stratified, fixed seed), the scaling fitted on one half and the
threshold on the other's calibrated outputs (a threshold computed on the very images 2C
parameters were fitted to undercovers: LAC after vector scaling covered 0.864 at alpha 0.1 on
digits). A temperature, one parameter, shares the images with the threshold: what one
parameter learns of them moves coverage by O(1/n) (measured in scripts/bench_conformal.py),
and halving a small split leaves too few errors to fit it on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from ml_infer import conformal
from ml_infer.aggregate import Predictions
from ml_infer.calibrate import STAGES, Calibrator, calibrator, log_probs_as_logits
from ml_infer.calsplit import stratified_holdout
from ml_infer.errors import UserError, one_of
from ml_infer.metrics import calibration_metrics, reliability_bins

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PostHoc:
    """The scored images' calibrated prediction, their conformal sets [N, C] (None without
    conformal), and the figures for metrics.json."""

    calibrated: Predictions
    sets: Tensor | None
    metrics: dict[str, Any]
    # The calibration split as the conformal threshold saw it (calibrated probabilities, labels).
    calibration_probs: Tensor | None = None
    calibration_labels: Tensor | None = None


def check_settings(cfg: DictConfig) -> None:
    """The calibration and conformal settings, checked before any model runs."""
    from ml_infer.calibrate import METHODS as CALIBRATION_METHODS

    if cfg.calibration.method not in CALIBRATION_METHODS:
        raise one_of("calibration.method", cfg.calibration.method, CALIBRATION_METHODS)
    if cfg.calibration.stage not in STAGES:
        raise one_of("calibration.stage", cfg.calibration.stage, STAGES)
    settings = cfg.conformal
    if settings.method not in conformal.METHODS:
        raise one_of("conformal.method", settings.method, conformal.METHODS)
    if settings.method != "none":
        conformal.check_settings(settings.alpha, settings.k_reg, settings.lam)


def fit_and_apply(
    cfg: DictConfig,
    merge: Callable[[Tensor], Predictions],
    calibration_logits: Tensor,
    calibration_labels: Tensor,
    logits: Tensor,
    merged: Predictions,
    labels: Tensor | None,
) -> PostHoc:
    """Fits `cfg.calibration` and `cfg.conformal` on the calibration split's logits [M, K, n, C]
    and applies them to the scored split's (`logits`, merged into `merged`); `merge` is how the
    strategy merges logits (a cascade's replay, too); `labels` are None for unlabelled images."""
    method, stage = cfg.calibration.method, cfg.calibration.stage
    if stage not in STAGES:
        raise one_of("calibration.stage", stage, STAGES)
    if not torch.isfinite(calibration_logits).all():
        raise UserError(
            "a model gave NaN or infinite outputs on the calibration split; nothing was fitted"
        )
    conformal_logits = conformal_labels = None
    if method == "vector" and cfg.conformal.method != "none":
        fit_part, conformal_part = stratified_holdout(
            calibration_labels.tolist(), 0.5, seed=cfg.seed
        )
        conformal_logits = calibration_logits[:, :, conformal_part]
        conformal_labels = calibration_labels[conformal_part]
        calibration_logits = calibration_logits[:, :, fit_part]
        calibration_labels = calibration_labels[fit_part]
    absent = sorted(set(range(logits.shape[-1])) - set(calibration_labels.tolist()))
    if method == "vector" and absent:
        log.warning(
            "vector scaling saw no calibration image of %d class(es) (outputs %s): it learns to "
            "lower their probabilities; give images of every class, or use calibration=temperature",
            len(absent),
            absent,
        )
    found: dict[str, Any] = {
        "calibration_method": method,
        "calibration_n": len(calibration_labels),
    }
    apply, parameters = _fit_calibration(
        method, stage, merge, calibration_logits, calibration_labels
    )
    if parameters:
        found["calibration_fit"] = parameters
    calibrated = merged if method == "none" else apply(logits)
    if method != "none":
        found["calibration_stage"] = stage
        found["preds_changed_by_calibration"] = int((calibrated.preds != merged.preds).sum())
        if labels is not None:
            found |= {
                f"{name}_calibrated": value
                for name, value in calibration_metrics(
                    calibrated.probs, calibrated.preds, labels
                ).items()
            }
            found["accuracy_calibrated"] = float((calibrated.preds == labels).double().mean())
    if labels is not None:
        found["reliability"] = {"raw": reliability_bins(merged.probs, merged.preds, labels)}
        if method != "none":
            found["reliability"]["calibrated"] = reliability_bins(
                calibrated.probs, calibrated.preds, labels
            )
    sets: Tensor | None = None
    seen_probs: Tensor | None = None
    seen_labels: Tensor | None = None
    if cfg.conformal.method != "none":
        settings = cfg.conformal
        if conformal_logits is None or conformal_labels is None:
            conformal_logits, conformal_labels = calibration_logits, calibration_labels
        seen_probs, seen_labels = apply(conformal_logits).probs, conformal_labels
        fitted_sets = conformal.fit(
            seen_probs,
            seen_labels,
            settings.method,
            float(settings.alpha),
            randomized=bool(settings.randomized),
            nonempty=bool(settings.nonempty),
            k_reg=settings.k_reg,
            lam=float(settings.lam),
            seed=cfg.seed,
        )
        sets = fitted_sets.sets(calibrated.probs)
        found |= {
            "conformal_method": settings.method,
            "conformal_alpha": float(settings.alpha),
            "conformal_n": len(conformal_labels),
        }
        found |= fitted_sets.parameters()
        found |= conformal.set_metrics(sets, calibrated.preds, labels)
    return PostHoc(calibrated, sets, found, seen_probs, seen_labels)


def _fit_calibration(
    method: str, stage: str, merge: Callable[[Tensor], Predictions], logits: Tensor, labels: Tensor
) -> tuple[Callable[[Tensor], Predictions], dict[str, float]]:
    """The calibrator fitted on `logits` [M, K, n, C], as a map from any split's logits to its
    calibrated prediction, and its parameters (per member `name.m<k>`)."""
    if method == "none":
        return merge, {}
    if stage == "merged":
        fitted = calibrator(method).fit(log_probs_as_logits(merge(logits).probs), labels)
        return (
            lambda split_logits: _apply_merged(fitted, merge(split_logits)),
            _flat(fitted.parameters()),
        )
    # member: each checkpoint's own calibrator, fitted on its identity-view outputs
    members = [calibrator(method).fit(member_logits[0], labels) for member_logits in logits]
    return (
        lambda split_logits: merge(_apply_members(members, split_logits)),
        {
            f"{name}.m{m}": value
            for m, member in enumerate(members)
            for name, value in _flat(member.parameters()).items()
        },
    )


def _apply_merged(fitted: Calibrator, merged: Predictions) -> Predictions:
    probs = fitted(log_probs_as_logits(merged.probs)).softmax(dim=-1).to(merged.probs.dtype)
    if fitted.name == "temperature":  # the strategy's own class (a vote's tie-break) stays
        return Predictions(probs, merged.preds)
    return Predictions.from_probs(probs)


def _apply_members(fitted: list[Calibrator], logits: Tensor) -> Tensor:
    return torch.stack(
        [member(member_logits.double()).float() for member, member_logits in zip(fitted, logits)]
    )


def _flat(parameters: dict[str, float | list[float]]) -> dict[str, float]:
    """Parameters as numbers: a per-class list becomes one entry per class."""
    flat: dict[str, float] = {}
    for name, value in parameters.items():
        if isinstance(value, list):
            flat |= {f"{name}.{k}": v for k, v in enumerate(value)}
        else:
            flat[name] = value
    return flat

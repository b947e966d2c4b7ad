"""What a run's metrics.json holds: how the run was made and how fast it ran, its accuracy and
calibration, the paired comparison with `standard` (images fixed and broken), selective
prediction, and each view and member alone."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from ml_infer.assemble import per_member_accuracy, per_view_accuracy
from ml_infer.bank import Classifier
from ml_infer.imagesets import TensorImages
from ml_infer.labels import class_presence
from ml_infer.metrics import (
    classification_metrics,
    mcnemar_p_value,
    paired_bootstrap_delta,
    selective_metrics,
    speed_metrics,
)
from ml_infer.outputs import current_sweep_id
from ml_infer.passes import DatasetPredictions, Timing
from ml_infer.predictor import Predictor
from ml_infer.runners import Runner
from ml_infer.store import data_identity


def run_metrics(
    cfg: DictConfig,
    predictor: Predictor,
    members: Sequence[Classifier],
    runner: Runner,
    dataset: TensorImages,
    timing: Timing,
) -> dict[str, Any]:
    """Speed, and how the run was made: what every metrics.json holds, in either mode."""
    strategy = cfg.strategy
    views = predictor.views
    return {
        "strategy": strategy.name,
        "mode": cfg.mode,
        "n": len(dataset),
        **speed_metrics(timing.timed_images, timing.wall_seconds, timing.batch_seconds),
        "relative_cost": timing.relative_cost,
        "relative_cost_iqr": timing.relative_cost_iqr,
        "timed_images": timing.timed_images,
        "timed_passes": len(timing.pass_seconds),
        "forward_passes_per_image": predictor.forward_passes_per_image,
        "peak_mem_mb": timing.peak_memory_mb,
        "peak_mem_kind": timing.peak_memory_kind,
        "views": len(views),
        "models": len(members),
        "view_names": list(views.names),
        "tta_aggregation": _name_of(cfg.tta.aggregation),
        "ensemble_aggregation": _name_of(cfg.ensemble.aggregation),
        "ensemble_weights": None
        if cfg.ensemble.get("weights") is None
        else list(cfg.ensemble.weights),
        "precision": predictor.precision_name,
        "runner": strategy.runner,
        "processes": runner.num_processes,
        "device": str(runner.device),
        "torch_threads": torch.get_num_threads(),
        "data": cfg.data.name if cfg.mode == "evaluate" else "folder",
        "split": cfg.data.split if cfg.mode == "evaluate" else str(cfg.predict.root),
        "skipped_files": len(dataset.skipped),
        "data_digest": data_identity(dataset),  # SHA-256 of the pixels seen, or of the files
        "weights": sorted({member.weights for member in members}),
        "checkpoints": [str(member.path) for member in members],
        "checkpoint_format": members[0].format,
        "checkpoint_sha256": [member.sha256 for member in members],
        "host": platform.node(),
        **({"sweep_id": sweep_id} if (sweep_id := current_sweep_id()) else {}),
    }


def scores(
    seed: int, result: DatasetPredictions, baseline_correct: Tensor, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, calibration, selective prediction, and the paired comparison with `standard`
    on the same images: the accuracy difference with its interval, McNemar's test, and the
    images this strategy fixed (standard wrong, this right) and broke (the reverse). Which of
    the checkpoint's `classes` the labels hold (macro-F1 is over those)."""
    correct = result.preds == result.labels
    delta, delta_low, delta_high = paired_bootstrap_delta(correct, baseline_correct, seed=seed)
    return {
        **classification_metrics(result.probs, result.preds, result.labels),
        **class_presence(result.labels, classes),
        "accuracy_delta_vs_standard": delta,
        "accuracy_delta_ci95_low": delta_low,
        "accuracy_delta_ci95_high": delta_high,
        "mcnemar_p_vs_standard": mcnemar_p_value(correct, baseline_correct),
        "flips_fixed": int((correct & ~baseline_correct).sum()),
        "flips_broken": int((~correct & baseline_correct).sum()),
        **selective_metrics(result.probs, result.preds, result.labels),
    }


def member_and_view_scores(
    predictor: Predictor, logits: Tensor, labels: Tensor, members: Sequence[Classifier]
) -> dict[str, Any]:
    """Each view alone (with several views) and each checkpoint alone (with several models)."""
    found: dict[str, Any] = {}
    if len(predictor.views) > 1:
        found["per_view_accuracy"] = per_view_accuracy(predictor, logits, labels)
    if len(members) > 1:
        names = [str(member.path) for member in members]
        found["per_member_accuracy"] = per_member_accuracy(predictor, logits, labels, names)
    return found


def _name_of(entry: Any) -> str:
    if isinstance(entry, (Mapping, DictConfig)):
        return str(entry.get("_target_"))
    return str(entry)

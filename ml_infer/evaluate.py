"""One evaluation: compose the strategy's parts from the config, run it, score it, write it down.

`evaluate(cfg)` is the task behind `python -m ml_infer`; it is a plain function so that tests
and notebooks can call it with a composed config. It checks every name and number in the config
before loading a model, and writes nothing until the results are complete.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ml_infer.config import instantiate_named
from ml_infer.errors import UserError, one_of

log = logging.getLogger(__name__)

RUNNERS = ("single", "accelerate")


def build_views(augmentations: Sequence[Any]):
    """The identity view plus each named (or inline `_target_`) augmentation's views."""
    from ml_infer.augment import Views

    if isinstance(augmentations, str):
        augmentations = [augmentations]
    return Views(
        [instantiate_named("augmentation", entry, "augmentation") for entry in augmentations or []]
    )


def build_aggregators(cfg: DictConfig, n_models: int):
    """The TTA aggregator (over views) and the ensemble aggregator (over models)."""
    view_aggregator = instantiate_named("tta_aggregation", cfg.tta.aggregation, "TTA aggregation")
    weights = cfg.ensemble.get("weights")
    model_aggregator = instantiate_named(
        "ensemble_aggregation",
        cfg.ensemble.aggregation,
        "ensemble aggregation",
        weights=None if weights is None else list(weights),
    )
    model_aggregator.check_members(n_models)
    return view_aggregator, model_aggregator


def evaluate(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Scores the configured strategy and writes `metrics.json` and `predictions.csv`.

    `output_dir` defaults to the Hydra run directory. Returns the metrics written.
    """
    from ml_infer.checkpoints import expand_checkpoint_paths, load_ensemble
    from ml_infer.predictor import Predictor, resolve_autocast_dtype

    strategy = cfg.strategy
    if strategy.runner not in RUNNERS:
        raise one_of("strategy.runner", strategy.runner, RUNNERS)
    views = build_views(cfg.tta.augmentations)
    checkpoint_paths = expand_checkpoint_paths(cfg.ensemble.checkpoints)
    view_aggregator, model_aggregator = build_aggregators(cfg, len(checkpoint_paths))
    runner = _build_runner(strategy.runner, cfg.device)
    autocast_dtype = resolve_autocast_dtype(
        strategy.precision, strategy.autocast_dtype, runner.device
    )

    import torch

    torch.manual_seed(cfg.seed)
    model_config = None
    if cfg.get("model") is not None:
        model_config = OmegaConf.to_container(cfg.model, resolve=True)
    members = load_ensemble(
        checkpoint_paths,
        use_ema=cfg.use_ema,
        model_config=model_config,
        allow_mixed_architectures=cfg.ensemble.allow_mixed_architectures,
    )
    input_spec = members[0].input_spec
    dataset = _load_data(cfg, input_spec, members[0].classes)
    predictor = Predictor(
        [member.model for member in members],
        views,
        view_aggregator,
        model_aggregator,
        input_spec,
        device=runner.device,
        autocast_dtype=autocast_dtype,
        forward_batch_size=cfg.engine.forward_batch_size,
        channels_last=cfg.engine.channels_last,
    )
    log.info(
        "%s: %d view(s) x %d model(s) = %d forward passes per image, %s on %s, %d %s images",
        strategy.name,
        len(views),
        len(members),
        predictor.forward_passes_per_image,
        predictor.precision_name,
        runner.device,
        len(dataset),
        cfg.data.split,
    )
    result = runner.predict(
        predictor,
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        warmup_batches=cfg.engine.warmup_batches,
        progress=cfg.engine.progress,
        min_timing_s=cfg.engine.min_timing_s,
    )
    output_dir = Path(output_dir) if output_dir is not None else _hydra_output_dir()
    baseline_correct = standard_baseline(cfg, predictor, members, dataset, runner, result)
    if not runner.is_main_process:
        return {}

    from ml_infer.metrics import (
        classification_metrics,
        mcnemar_p_value,
        paired_bootstrap_delta,
        speed_metrics,
    )

    correct = correct_by_position(result)
    delta, delta_low, delta_high = paired_bootstrap_delta(correct, baseline_correct, seed=cfg.seed)
    metrics: dict[str, Any] = {
        "strategy": strategy.name,
        "n": len(result.labels),
        **classification_metrics(result.probs, result.preds, result.labels),
        "accuracy_delta_vs_standard": delta,
        "accuracy_delta_ci95_low": delta_low,
        "accuracy_delta_ci95_high": delta_high,
        "mcnemar_p_vs_standard": mcnemar_p_value(correct, baseline_correct),
        **speed_metrics(len(result.labels), result.wall_seconds, result.batch_seconds),
        "timed_passes": len(result.pass_seconds),
        "forward_passes_per_image": predictor.forward_passes_per_image,
        "peak_mem_mb": result.peak_memory_mb,
        "peak_mem_kind": result.peak_memory_kind,
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
        "data": cfg.data.name,
        "split": cfg.data.split,
        "weights": sorted({member.weights for member in members}),
        "checkpoints": [str(member.path) for member in members],
        "checkpoint_sha256": [member.sha256 for member in members],
        "host": platform.node(),
    }
    write_predictions(output_dir / "predictions.csv", result, dataset)
    from ml_infer.report import plot_confusion_matrix

    plot_confusion_matrix(
        result.labels,
        result.preds,
        dataset.classes,
        output_dir / "confusion_matrix.png",
        title=f"{strategy.name}: accuracy {metrics['accuracy']:.4f} "
        f"on {cfg.data.name}/{cfg.data.split}",
    )
    write_json(output_dir / "metrics.json", metrics)

    from ml_infer.tracking import log_evaluation

    log_evaluation(cfg, metrics, output_dir)
    return metrics


def correct_by_position(result: Any):
    """Per-sample correctness [N] in data-set order (a multi-process gather may reorder samples)."""
    import torch

    correct = torch.empty(len(result.labels), dtype=torch.bool)
    correct[result.positions] = result.preds == result.labels
    return correct


def standard_baseline(
    cfg: DictConfig, predictor: Any, members: list, dataset: Any, runner: Any, result: Any
):
    """Per-sample correctness of `standard` on the same data: the run's first checkpoint, fp32,
    no views. A standard run is its own baseline; other runs reuse the baseline that a run of the
    same sweep (same checkpoint, weights and data) already stored, and compute it only otherwise.
    """
    import hashlib

    from ml_infer.aggregate import SoftVoting
    from ml_infer.augment import Views
    from ml_infer.predictor import Predictor

    first = members[0]
    identity = {
        "checkpoint_sha256": first.sha256,
        "weights": first.weights,
        "data": OmegaConf.to_container(cfg.data.dataset, resolve=True),
        "split": cfg.data.split,
        "n": len(dataset),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    sweep_dir = _sweep_dir()
    cache = sweep_dir / "baselines" / f"standard_{key}.json" if sweep_dir else None
    if predictor.forward_passes_per_image == 1 and predictor.autocast_dtype is None:
        baseline = correct_by_position(result) if runner.is_main_process else None
    elif cache is not None and runner.agree(cache.is_file()):
        baseline = None
        if runner.is_main_process:
            import torch

            baseline = torch.tensor(json.loads(cache.read_text())["correct"], dtype=torch.bool)
    else:
        log.info(
            "computing the standard baseline (%s, 1 view, fp32) for the comparison", first.path
        )
        standard = Predictor(
            [first.model],
            Views([]),
            SoftVoting(),
            SoftVoting(),
            first.input_spec,
            device=runner.device,
            forward_batch_size=predictor.forward_batch_size,
        )
        baseline_result = runner.predict(
            standard,
            dataset,
            batch_size=cfg.data.batch_size,
            num_workers=cfg.data.num_workers,
            warmup_batches=0,
            progress=False,
        )
        baseline = correct_by_position(baseline_result) if runner.is_main_process else None
    if runner.is_main_process and cache is not None and not cache.is_file():
        write_json(cache, identity | {"correct": baseline.int().tolist()})
    return baseline


def _sweep_dir() -> Path | None:
    """The directory a multirun's jobs share, or None outside a multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir)
    return None


def _load_data(cfg: DictConfig, input_spec: Any, model_classes: list[str]):
    from ml_infer.data import build_dataset

    dataset = build_dataset(
        cfg.data, cfg.data.split, image_size=list(input_spec.size), channels=input_spec.channels
    )
    if list(dataset.classes) != list(model_classes):
        only_data = sorted(set(dataset.classes) - set(model_classes))
        only_model = sorted(set(model_classes) - set(dataset.classes))
        detail = f"only in data: {only_data}; only in checkpoint: {only_model}"
        if not only_data and not only_model:
            detail = (
                f"same names in another order: data {dataset.classes}, checkpoint {model_classes}"
            )
        raise UserError(f"the data's classes differ from the checkpoint's ({detail})")
    return dataset


def _build_runner(name: str, device: str):
    if name == "accelerate":
        from ml_infer.distributed import AccelerateRunner

        return AccelerateRunner(device)
    from ml_infer.distributed import SingleProcessRunner

    return SingleProcessRunner(device)


def _name_of(entry: Any) -> str:
    if isinstance(entry, (Mapping, DictConfig)):
        return str(entry.get("_target_"))
    return str(entry)


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise UserError("evaluate() outside a Hydra run needs an output_dir")
    return Path(HydraConfig.get().runtime.output_dir)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes JSON atomically: a reader sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)


def write_predictions(path: Path, result: Any, dataset: Any) -> None:
    """One row per image: its id, true and predicted class names, then each class's probability."""
    classes = list(dataset.classes)
    sample_ids = dataset.sample_ids
    order = result.positions.argsort()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([dataset.id_name, "label", "pred", *(f"prob_{name}" for name in classes)])
        probs = result.probs[order].tolist()
        for row, i in enumerate(order.tolist()):
            writer.writerow(
                [
                    sample_ids[int(result.positions[i])],
                    classes[int(result.labels[i])],
                    classes[int(result.preds[i])],
                    *(f"{p:.6g}" for p in probs[row]),
                ]
            )
    os.replace(partial, path)

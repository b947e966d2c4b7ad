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
    )
    if not runner.is_main_process:
        return {}

    from ml_infer.metrics import classification_metrics, speed_metrics

    metrics: dict[str, Any] = {
        "strategy": strategy.name,
        "n": len(result.labels),
        **classification_metrics(result.probs, result.preds, result.labels),
        **speed_metrics(len(result.labels), result.wall_seconds, result.batch_seconds),
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
    output_dir = Path(output_dir) if output_dir is not None else _hydra_output_dir()
    write_predictions(output_dir / "predictions.csv", result, dataset)
    write_json(output_dir / "metrics.json", metrics)
    return metrics


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

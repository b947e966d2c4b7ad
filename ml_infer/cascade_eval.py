"""`strategy=cascade` evaluated: the cascade's predictions replayed from the prediction store
(every stage's outputs on the whole split), its speed measured live (`cascade.CascadePredictor`),
and what it escalated. The cascade itself is `ml_infer.cascade`."""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ml_infer.aggregate import Predictions
from ml_infer.assemble import StoreKeys, assemble, uncertainty
from ml_infer.augment import Augmentation, Views
from ml_infer.bank import strategy_checkpoints
from ml_infer.calsplit import needs_calibration_split
from ml_infer.cascade import (
    CascadePredictor,
    Pair,
    build_stages,
    check_settings,
    choose_threshold,
    replay,
    stage_configs,
    stage_output,
)
from ml_infer.errors import UserError
from ml_infer.evaluate import Evaluation, build_views, load_inputs, plain_predictor
from ml_infer.outputs import sweep_dir
from ml_infer.passes import DatasetPredictions
from ml_infer.posthoc import check_settings as check_posthoc_settings
from ml_infer.posthoc import fit_and_apply
from ml_infer.runners import build_runner
from ml_infer.score import run_metrics, scores
from ml_infer.store import open_store


def evaluate_cascade(cfg: DictConfig) -> Evaluation:
    """The cascade's predictions replayed from the store, its speed measured live."""
    settings = cfg.cascade
    if cfg.mode != "evaluate":
        raise UserError("strategy=cascade scores labelled data; run it with mode=evaluate")
    check_settings(settings)
    check_posthoc_settings(cfg)
    configs = stage_configs(cfg)
    thresholds = None if settings.thresholds is None else [float(t) for t in settings.thresholds]
    paths = list(dict.fromkeys(p for c in configs for p in strategy_checkpoints(c.ensemble)))
    augmentations: dict[tuple[str, ...], Augmentation] = {}  # every stage's views, once each
    for stage_cfg in configs:
        if stage_cfg.tta.get("compose", "sum") != "sum":
            raise UserError("a cascade's stages take tta.compose=sum: their views are shared")
        for augmentation in build_views(stage_cfg.tta.augmentations).augmentations:
            augmentations.setdefault(augmentation.view_names, augmentation)
    runner = build_runner("single", cfg.device)
    torch.manual_seed(cfg.seed)
    posthoc_wanted = needs_calibration_split(cfg)
    inputs = load_inputs(
        cfg,
        paths,
        with_calibration=thresholds is None or posthoc_wanted,
        corners=any(a.needs_corners for a in augmentations.values()),
    )
    views = Views([a for names, a in augmentations.items() if names != ("identity",)])
    every = plain_predictor(cfg, inputs, views, runner.device)
    stages = build_stages(every, configs, {str(path): i for i, path in enumerate(paths)})
    store = open_store(cfg.engine.store, sweep_dir(), cfg.engine.store_dtype)

    computed: list[int] = []  # passes over each split this run computed (not served)

    def outputs_on(dataset: Any, baseline: bool) -> tuple[dict[Pair, Tensor], Tensor | None]:
        assembled = assemble(
            every,
            StoreKeys.of(every, inputs.members, dataset),
            store,
            runner,
            runner.loader(dataset, batch_size=cfg.data.batch_size, num_workers=0),
            progress=cfg.engine.progress,
            with_baseline=baseline,
        )
        assert assembled.logits is not None
        computed.append(assembled.passes_computed)
        names = list(every.views.names)
        found = {
            (m, view): assembled.logits[m, k]
            for m in range(len(inputs.members))
            for k, view in enumerate(names)
        }
        return found, assembled.baseline_logits

    found: dict[str, Any] = {}
    calibration_outputs: dict[Pair, Tensor] = {}
    if inputs.split is not None:
        calibration_outputs, _ = outputs_on(inputs.split.calibration, False)
        found["calibration_passes_computed"] = computed[-1]
    if thresholds is None:
        assert inputs.split is not None
        shared, chosen_on = choose_threshold(
            stages,
            calibration_outputs,
            inputs.split.calibration.labels,
            settings.confidence,
            float(settings.target_gain),
        )
        thresholds = [shared] * (len(stages) - 1)
        found["cascade_threshold_choice"] = chosen_on
    dataset = inputs.dataset
    logits_of, baseline_logits = outputs_on(dataset, True)
    assert baseline_logits is not None
    merged, passes, escalated = replay(stages, logits_of, thresholds, settings.confidence)
    live = CascadePredictor(every, stages, thresholds, settings.confidence)
    loader = runner.loader(
        dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers
    )
    timing = runner.time(
        live,  # type: ignore[arg-type]  # times anything that maps images to predictions
        every.restricted([0], ["identity"], autocast_dtype=None),
        loader,
        warmup_batches=cfg.engine.warmup_batches,
        min_timing_s=cfg.engine.min_timing_s,
        timing_batches=cfg.engine.timing_batches,
    )
    result = DatasetPredictions.timed(merged, dataset.labels, timing)
    metrics = run_metrics(cfg, every, inputs.members, runner, dataset, timing) | inputs.shift
    baseline_preds = baseline_logits.argmax(dim=-1)
    metrics |= scores(cfg.seed, result, baseline_preds == dataset.labels, inputs.members[0].classes)
    metrics |= found | {
        "forward_passes_per_image": float(passes.mean()),
        "forward_passes_computed": computed[-1],
        "store": str(getattr(store, "directory", "off")),
        "cascade_stages": [OmegaConf.to_container(stage) for stage in settings.stages],
        "cascade_thresholds": thresholds,
        "cascade_confidence": settings.confidence,
        "escalated_share": escalated,
        "stage_accuracy": [
            float((stage_output(stage, logits_of, None).preds == dataset.labels).double().mean())
            for stage in stages
        ],
    }
    title = f"cascade: accuracy {metrics['accuracy']:.4f} on {cfg.data.name}/{cfg.data.split}"
    names = list(every.views.names)

    def stacked_of(found_logits: dict[Pair, Tensor]) -> Tensor:
        return torch.stack(
            [torch.stack([found_logits[(m, v)] for v in names]) for m in range(len(paths))]
        )

    def merge(stacked_logits: Tensor) -> Predictions:  # the cascade, replayed, on any split
        by_pair = {
            (m, v): stacked_logits[m, k] for m in range(len(paths)) for k, v in enumerate(names)
        }
        return replay(stages, by_pair, thresholds, settings.confidence)[0]

    stacked = stacked_of(logits_of)
    posthoc = None
    calibration_ids: list[Any] | None = None
    if posthoc_wanted and inputs.split is not None:
        posthoc = fit_and_apply(
            cfg,
            merge,
            stacked_of(calibration_outputs),
            inputs.split.calibration.labels,
            stacked,
            merged,
            dataset.labels,
        )
        metrics |= {"calibration_split": inputs.split.source} | posthoc.metrics
        calibration_ids = list(inputs.split.calibration.sample_ids)
    return Evaluation(
        metrics,
        result,
        dataset,
        list(inputs.members[0].classes),
        cfg.mode,
        cfg,
        title,
        uncertainty(stacked, merged),
        baseline_preds,
        posthoc,
        calibration_ids,
    )

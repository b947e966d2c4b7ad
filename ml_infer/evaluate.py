"""One evaluation: compose the strategy's parts from the config, run it, score it.

`evaluate(cfg)` returns an `Evaluation` and writes nothing: `record.write_run` writes its files
and `tracking.log_evaluation` logs it (`task.run_evaluation` does all three, as
`python -m ml_infer` does). It checks the names in the config (strategy parts, augmentations,
aggregators, weights, checkpoint paths) before loading a model.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from ml_infer.aggregate import Aggregator, SoftVoting
from ml_infer.assemble import StoreKeys, assemble, uncertainty
from ml_infer.augment import Views
from ml_infer.bank import Classifier, configured_input_spec, load_ensemble, strategy_checkpoints
from ml_infer.calsplit import CalibrationSplit, calibration_split, needs_calibration_split
from ml_infer.checkpoints import open_checkpoint
from ml_infer.config import instantiate_named, plain_dict
from ml_infer.data import UnlabelledImages, build_dataset
from ml_infer.device import resolve_autocast_dtype
from ml_infer.errors import UserError, one_of
from ml_infer.imagesets import TensorImages
from ml_infer.inputs import InputSpec
from ml_infer.labels import check_unknown_classes, labelled_by_name
from ml_infer.learned import LearnedWeights
from ml_infer.outputs import sweep_dir
from ml_infer.passes import DatasetPredictions
from ml_infer.posthoc import PostHoc, check_settings, fit_and_apply
from ml_infer.predictor import EngineSettings, Predictor
from ml_infer.runners import RUNNERS, build_runner
from ml_infer.score import member_and_view_scores, run_metrics, scores
from ml_infer.shift import shift_of, shifted
from ml_infer.store import open_store

log = logging.getLogger(__name__)

MODES = ("evaluate", "predict", "tune")


@dataclasses.dataclass
class Evaluation:
    """One evaluated strategy: the figures of `metrics.json`, every image's prediction, and what
    its files need (the data set's ids, the class names, the config it ran with)."""

    metrics: dict[str, Any]
    predictions: DatasetPredictions
    dataset: TensorImages
    classes: list[str]
    mode: str
    config: DictConfig
    title: str
    uncertainty: dict[str, Tensor]  # per image: entropy, mutual_information, disagreement
    baseline_preds: Tensor | None  # standard's predicted class of each image (labelled data)
    posthoc: PostHoc | None = None  # calibrated predictions and conformal sets, when asked for
    calibration_ids: list[Any] | None = None  # the images they were fitted on


def build_views(augmentations: Sequence[Any], compose: str = "sum") -> Views:
    """The identity view plus each named (or inline `_target_`) augmentation's views, or their
    combinations (`compose="product"`)."""
    if isinstance(augmentations, str):
        augmentations = [augmentations]
    return Views(
        [instantiate_named("augmentation", entry, "augmentation") for entry in augmentations or []],
        compose,
    )


def build_aggregators(cfg: DictConfig, n_models: int) -> tuple[Aggregator, Aggregator]:
    """The TTA aggregator (over views) and the ensemble aggregator (over models)."""
    view_aggregator = instantiate_named("tta_aggregation", cfg.tta.aggregation, "TTA aggregation")
    weights = cfg.ensemble.get("weights")
    if weights is not None and not isinstance(weights, (list, tuple, ListConfig)):
        weights = [weights]  # ensemble.weights=0.7 for a single checkpoint
    model_aggregator = instantiate_named(
        "ensemble_aggregation",
        cfg.ensemble.aggregation,
        "ensemble aggregation",
        weights=None if weights is None else list(weights),
    )
    model_aggregator.check_members(n_models)
    return view_aggregator, model_aggregator


def evaluate(cfg: DictConfig) -> Evaluation | None:
    """Runs the configured strategy over its data and scores it.

    `mode=evaluate` scores a labelled split; `mode=predict` labels a folder of images. Returns
    None on the processes of a multi-process run other than the main one (they only help).
    """
    strategy = cfg.strategy
    if cfg.mode not in MODES:
        raise one_of("mode", cfg.mode, MODES)
    if cfg.mode == "tune":
        raise UserError("mode=tune chooses presets and scores nothing: run python -m ml_infer.tune")
    if strategy.runner not in RUNNERS:
        raise one_of("strategy.runner", strategy.runner, RUNNERS)
    if cfg.mode == "predict" and not cfg.predict.root:
        raise UserError("mode=predict needs predict.root=DIR, a folder of images")
    check_settings(cfg)
    views = build_views(cfg.tta.augmentations, cfg.tta.get("compose", "sum"))
    checkpoint_paths = strategy_checkpoints(cfg.ensemble)
    view_aggregator, model_aggregator = build_aggregators(cfg, len(checkpoint_paths))
    runner = build_runner(strategy.runner, cfg.device)
    autocast_dtype = resolve_autocast_dtype(
        strategy.precision, strategy.autocast_dtype, runner.device
    )

    torch.manual_seed(cfg.seed)
    fits_views = isinstance(view_aggregator, LearnedWeights)  # tta.aggregation=learned
    loaded = load_inputs(
        cfg,
        checkpoint_paths,
        with_calibration=needs_calibration_split(cfg) or fits_views,
        corners=views.needs_corners,
    )
    members, input_spec, dataset, split = (
        loaded.members,
        loaded.input_spec,
        loaded.dataset,
        loaded.split,
    )
    classes = members[0].classes
    engine = EngineSettings.from_config(cfg.engine)
    predictor = Predictor(
        [member.model for member in members],
        views,
        view_aggregator,
        model_aggregator,
        input_spec,
        device=runner.device,
        autocast_dtype=autocast_dtype,
        engine=engine,
        member_names=[f"checkpoint {member.path}" for member in members],
    )
    log.info(
        "%s: %d view(s) x %d model(s) = %d forward passes per image, %s on %s, %d images",
        strategy.name,
        len(views),
        len(members),
        predictor.forward_passes_per_image,
        predictor.precision_name,
        runner.device,
        len(dataset),
    )
    loader = runner.loader(
        dataset, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers
    )
    store = open_store(cfg.engine.store, sweep_dir(), cfg.engine.store_dtype)
    assembled = assemble(
        predictor,
        StoreKeys.of(predictor, members, dataset),
        store,
        runner,
        loader,
        progress=cfg.engine.progress,
        with_baseline=cfg.mode == "evaluate",
    )
    calibration_logits = None
    if split is not None:  # the calibration split's outputs, from the store like the scored ones
        calibration_logits = assemble(
            predictor,
            StoreKeys.of(predictor, members, split.calibration),
            store,
            runner,
            runner.loader(
                split.calibration,
                batch_size=cfg.data.batch_size,
                num_workers=cfg.data.num_workers,
            ),
            progress=cfg.engine.progress,
            with_baseline=False,
        )
    if (
        isinstance(view_aggregator, LearnedWeights)
        and calibration_logits is not None
        and calibration_logits.logits is not None
    ):
        assert split is not None
        view_aggregator.fit(
            calibration_logits.logits.softmax(dim=-1), split.calibration.labels, views.names
        )
    merged = predictor.merge(assembled.logits) if assembled.logits is not None else None
    # Checked on every process (the main one's counts), so that they stop together or not at all.
    predictor.check_finite(len(dataset), lambda counts: torch.tensor(runner.agree(counts.tolist())))
    is_standard = predictor.forward_passes_per_image == 1 and predictor.autocast_dtype is None
    standard = None if is_standard else predictor.restricted([0], ["identity"], autocast_dtype=None)
    timing = runner.time(
        predictor,
        standard,
        loader,
        warmup_batches=cfg.engine.warmup_batches,
        min_timing_s=cfg.engine.min_timing_s,
        timing_batches=cfg.engine.timing_batches,
    )
    if merged is None or assembled.logits is None:
        return None  # a helper process of a multi-process run: it took part in the passes

    result = DatasetPredictions.timed(merged, dataset.labels, timing)
    metrics = run_metrics(cfg, predictor, members, runner, dataset, timing) | loaded.shift
    metrics["forward_passes_computed"] = assembled.passes_computed
    if calibration_logits is not None:  # passes over the calibration split's images
        metrics["calibration_passes_computed"] = calibration_logits.passes_computed
    metrics["store"] = str(getattr(store, "directory", "off"))
    uncertainty_columns = uncertainty(assembled.logits, merged)
    baseline_preds = None
    if cfg.mode == "predict":
        predicted = result.preds.bincount(minlength=len(classes)).tolist()
        metrics["predicted_counts"] = dict(zip(classes, predicted))
        metrics["mean_confidence"] = float(result.probs.max(dim=1).values.mean())
        title = f"{strategy.name} on {cfg.predict.root}"
    else:
        assert assembled.baseline_logits is not None
        baseline_preds = assembled.baseline_logits.argmax(dim=-1)
        metrics |= scores(cfg.seed, result, baseline_preds == result.labels, classes)
        metrics |= member_and_view_scores(predictor, assembled.logits, result.labels, members)
        title = (
            f"{strategy.name}: accuracy {metrics['accuracy']:.4f} "
            f"on {cfg.data.name}/{cfg.data.split}"
        )
    if isinstance(view_aggregator, LearnedWeights):
        metrics["tta_weights"] = view_aggregator.weights_by_view()
        metrics["tta_temperature"] = view_aggregator.temperature
    posthoc = None
    if split is not None:
        assert calibration_logits is not None and calibration_logits.logits is not None
        posthoc = fit_and_apply(
            cfg,
            predictor.merge,
            calibration_logits.logits,
            split.calibration.labels,
            assembled.logits,
            merged,
            result.labels if cfg.mode == "evaluate" else None,
        )
        metrics |= {"calibration_split": split.source} | posthoc.metrics
    return Evaluation(
        metrics,
        result,
        dataset,
        list(classes),
        cfg.mode,
        cfg,
        title,
        uncertainty_columns,
        baseline_preds,
        posthoc,
        None if split is None else list(split.calibration.sample_ids),
    )


@dataclasses.dataclass
class Inputs:
    """What a run reads: its checkpoints' models, their input, the images to score (or predict)
    and, when asked for, the calibration split (with the scored images it leaves)."""

    members: list[Classifier]
    input_spec: InputSpec
    dataset: TensorImages
    split: CalibrationSplit | None
    shift: dict[str, Any] = dataclasses.field(default_factory=dict)  # what shifted() reports


def load_inputs(
    cfg: DictConfig,
    checkpoint_paths: Sequence[Path],
    *,
    with_calibration: bool,
    corners: bool = False,
) -> Inputs:
    """Opens the checkpoints, loads the data at their input size (each image as its six crops
    with `corners`, for crop views), builds the models, numbers every split's labels as the
    models' classes by name (ml_infer.labels), and takes the calibration split."""
    unknown_classes = cfg.data.get("unknown_classes", "error")
    check_unknown_classes(unknown_classes)
    shift = shift_of(cfg)
    if corners and not shift.is_clean:
        raise UserError(
            f"shift={shift.name} with crop views (five_crop, ten_crop) is not supported: "
            "corrupt the photos or crop them, not both"
        )
    prefix = cfg.checkpoint.get("state_dict_prefix")
    checkpoints = [open_checkpoint(path, prefix) for path in checkpoint_paths]
    input_spec = checkpoints[0].input_spec or configured_input_spec(cfg, checkpoints[0].path)
    fit = input_spec.fit() | ({"corners": True} if corners else {})
    dataset = _load_data(cfg, fit)
    if corners and dataset[0][0].dim() != 4:  # a data set of the user's own
        raise UserError(f"data {cfg.data.name} does not read photos as crops for crop views")
    configured = [str(name) for name in cfg.checkpoint.classes or ()]  # [0,1]: ints, not names
    named = next((c.classes for c in checkpoints if c.classes), None) or configured
    members = load_ensemble(
        checkpoints,
        use_ema=cfg.use_ema,
        model_config=None if cfg.get("model") is None else plain_dict(cfg.model),
        classes=named or dataset.classes,
        input_spec=input_spec,
        allow_mixed_architectures=cfg.ensemble.allow_mixed_architectures,
        classes_from_folder=not named,
    )
    classes = members[0].classes
    if cfg.mode != "predict":
        dataset = labelled_by_name(dataset, classes, unknown_classes)
    split = None
    if with_calibration:
        split = calibration_split(cfg, dataset, fit)
        try:
            split.calibration = labelled_by_name(split.calibration, classes, unknown_classes)
        except UserError as error:
            raise UserError(f"the calibration images: {error}") from None
        dataset = split.scored
    # After the split: what a strategy fits, it fits on clean images.
    dataset, shift_report = shifted(dataset, shift, cfg.data.name)
    return Inputs(list(members), input_spec, dataset, split, shift_report)


def plain_predictor(cfg: DictConfig, inputs: Inputs, views: Views, device: Any) -> Predictor:
    """Every checkpoint of `inputs` under `views`, fp32, merged by plain means: the outputs a
    search (tuning) or a cascade's stages are assembled from."""
    return Predictor(
        [member.model for member in inputs.members],
        views,
        SoftVoting(),
        SoftVoting(),
        inputs.input_spec,
        device=device,
        autocast_dtype=None,
        engine=EngineSettings.from_config(cfg.engine),
        member_names=[f"checkpoint {member.path}" for member in inputs.members],
    )


def _load_data(cfg: DictConfig, fit: dict[str, Any]) -> TensorImages:
    """The labelled split to score, or the folder to predict, at the model's input size."""
    if cfg.mode == "predict":
        return UnlabelledImages(
            cfg.predict.root,
            **fit,
            decode_threads=cfg.predict.decode_threads,
            stream=cfg.predict.get("stream", "auto"),
        )
    return build_dataset(cfg.data, cfg.data.split, **fit)

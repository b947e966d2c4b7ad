"""`strategy=cascade`: stages from cheap to expensive; an image moves on to the next stage only
while the current stage is unsure of it (Wang et al. 2022, "Wisdom of Committees").

Each stage is a (tta, ensemble) pair of option names, merged as that TTA x ensemble merges.
After stage s an image whose confidence (`max_prob`, `margin` between the two top classes, or
`entropy`: 1 - H / log C) is below `thresholds[s]` goes on; the others keep stage s's answer.
A stage computes only the (checkpoint, view) outputs no earlier stage computed for the image.

Predictions come from the prediction store (every stage's outputs on the whole split, then the
escalation replayed); speed is measured live on `CascadePredictor`, which runs each stage on the
images that reach it. With `thresholds: null`, the thresholds are chosen on the calibration
split: the cheapest (one shared threshold for every stage) that keeps `target_gain` of the last
stage's accuracy gain over the first.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from ml_infer.aggregate import Predictions
from ml_infer.bank import strategy_checkpoints
from ml_infer.config import group_file
from ml_infer.errors import UserError, one_of
from ml_infer.evaluate import build_aggregators, build_views
from ml_infer.predictor import Predictor

SIGNALS = ("max_prob", "margin", "entropy")
log = logging.getLogger(__name__)
Pair = tuple[int, str]  # (member index, view name)


def confidence(probs: Tensor, signal: str) -> Tensor:
    """Per image, higher = surer, in [0, 1].

    >>> p = torch.tensor([[0.7, 0.2, 0.1]])
    >>> [round(float(confidence(p, s)[0]), 4) for s in SIGNALS]
    [0.7, 0.5, 0.2702]
    """
    if signal == "max_prob":
        return probs.max(dim=-1).values
    if signal == "margin":
        top = probs.topk(2, dim=-1).values
        return top[..., 0] - top[..., 1]
    if signal == "entropy":
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
        return 1.0 - entropy / math.log(probs.shape[-1])
    raise one_of("cascade.confidence", signal, SIGNALS)


@dataclasses.dataclass
class Stage:
    """One stage: its pairs in (member, view) order, and its merge."""

    members: list[int]
    views: list[str]
    predictor: Predictor  # the stage's models and views, merged by its aggregators

    @property
    def pairs(self) -> list[Pair]:
        return [(m, v) for m in self.members for v in self.views]


def check_settings(settings: DictConfig) -> None:
    """cascade.* as one-line errors: stages of {tta, ensemble}, one threshold in [0, 1.01] per
    stage but the last (or null), a known confidence signal, target_gain in [0, 1]."""
    stages = settings.stages
    if not isinstance(stages, (list, ListConfig)) or len(stages) < 2:
        raise UserError(
            "cascade.stages needs at least two stages, e.g. [{tta: none, ensemble: single}, "
            "{tta: none, ensemble: folds}]"
        )
    for stage in stages:
        if not isinstance(stage, (dict, DictConfig)) or set(stage.keys()) != {"tta", "ensemble"}:
            raise UserError(
                f"a cascade stage names a tta and an ensemble option, e.g. "
                f"{{tta: none, ensemble: folds}}; got {stage}"
            )
    if settings.confidence not in SIGNALS:
        raise one_of("cascade.confidence", settings.confidence, SIGNALS)
    thresholds = settings.thresholds
    if thresholds is not None:
        if not isinstance(thresholds, (list, ListConfig)) or not all(
            _number(t) and 0.0 <= float(t) <= 1.01 for t in thresholds
        ):
            raise UserError(
                f"cascade.thresholds must be a list of numbers in [0, 1.01] or null, got "
                f"{thresholds}"
            )
        if len(thresholds) != len(stages) - 1:
            raise UserError(
                f"cascade.thresholds has {len(thresholds)} value(s) for {len(stages)} stages; "
                "give one per stage but the last, or null to choose them for "
                "cascade.target_gain"
            )
    gain = settings.target_gain
    if not _number(gain) or not 0.0 <= float(gain) <= 1.0:
        raise UserError(f"cascade.target_gain must be a number in [0, 1], got {gain!r}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stage_configs(cfg: DictConfig) -> list[DictConfig]:
    """Each stage's config: the run's, with that stage's tta and ensemble groups."""
    stages = cfg.cascade.stages
    if not stages or len(stages) < 2:
        raise UserError(
            "cascade.stages needs at least two stages, e.g. [{tta: none, ensemble: "
            "single}, {tta: none, ensemble: folds}]"
        )
    configs = []
    for stage in stages:
        parts = {
            group: OmegaConf.load(group_file(group, str(stage[group])))
            for group in ("tta", "ensemble")
        }
        merged = OmegaConf.merge(cfg, parts)
        assert isinstance(merged, DictConfig)
        configs.append(merged)
    return configs


def build_stages(
    predictor: Predictor, configs: Sequence[DictConfig], member_of: dict[str, int]
) -> list[Stage]:
    """Stages over `predictor`'s prepared models (every stage's checkpoints, once each)."""
    stages = []
    for stage_cfg in configs:
        paths = strategy_checkpoints(stage_cfg.ensemble)
        members = [member_of[str(path)] for path in paths]
        views = list(build_views(stage_cfg.tta.augmentations).names)
        part = predictor.restricted(members, views)
        part.view_aggregator, part.model_aggregator = build_aggregators(stage_cfg, len(members))
        stages.append(Stage(members, views, part))
    return stages


def replay(
    stages: Sequence[Stage],
    logits_of: dict[Pair, Tensor],
    thresholds: Sequence[float],
    signal: str,
    outputs: Sequence[Predictions] | None = None,
) -> tuple[Predictions, Tensor, list[float]]:
    """The cascade on whole-split outputs: its prediction, the (member, view) passes each image
    needed, and the share of images that went on after each stage. `outputs`: each stage's
    prediction on the whole split, when already merged (they do not depend on thresholds)."""
    if outputs is None:
        outputs = [stage_output(stage, logits_of, None) for stage in stages]
    first = outputs[0]
    probs, preds = first.probs.clone(), first.preds.clone()
    n = len(preds)
    active = torch.ones(n, dtype=torch.bool)
    passes = torch.zeros(n)
    seen: set[Pair] = set()
    escalated = []
    for index, stage in enumerate(stages):
        new = [pair for pair in stage.pairs if pair not in seen]
        seen |= set(new)
        passes[active] += len(new)
        output = outputs[index]
        probs[active], preds[active] = output.probs[active], output.preds[active]
        if index < len(stages) - 1:
            active = active & (confidence(output.probs, signal) < thresholds[index])
            escalated.append(float(active.double().mean()))
    return Predictions(probs, preds), passes, escalated


def choose_threshold(
    stages: Sequence[Stage],
    logits_of: dict[Pair, Tensor],
    labels: Tensor,
    signal: str,
    target_gain: float,
) -> tuple[float, dict[str, float]]:
    """The cheapest shared threshold whose accuracy keeps `target_gain` of the last stage's
    gain over the first on these (calibration) images."""
    outputs = [stage_output(stage, logits_of, None) for stage in stages]
    first, last = outputs[0], outputs[-1]
    accuracy_first = float((first.preds == labels).double().mean())
    accuracy_last = float((last.preds == labels).double().mean())
    wanted = accuracy_first + target_gain * max(0.0, accuracy_last - accuracy_first)
    candidates = sorted({0.0, *confidence(first.probs, signal).tolist(), 1.0 + 1e-6})
    best = (math.inf, 1.0 + 1e-6)
    for threshold in candidates:
        shared = [threshold] * (len(stages) - 1)
        merged, passes, _ = replay(stages, logits_of, shared, signal, outputs)
        accuracy = float((merged.preds == labels).double().mean())
        if accuracy >= wanted - 1e-12 and float(passes.mean()) < best[0]:
            best = (float(passes.mean()), threshold)
    if math.isinf(best[0]):  # no threshold keeps the gain: escalate everything, and say so
        log.warning(
            "cascade: no threshold keeps %.0f%% of the last stage's gain on the calibration "
            "split; every image goes on to the last stage",
            100 * target_gain,
        )
    return best[1], {"first": accuracy_first, "last": accuracy_last, "wanted": wanted}


def stage_output(stage: Stage, logits_of: dict[Pair, Tensor], rows: Tensor | None) -> Predictions:
    stacked = torch.stack(
        [torch.stack([logits_of[(m, v)] for v in stage.views]) for m in stage.members]
    )
    if rows is not None:
        stacked = stacked[:, :, rows]
    return stage.predictor.merge(stacked)


class CascadePredictor:
    """The cascade run live on a batch: each stage on the images that reach it, computing only
    the pairs no earlier stage computed (for timing; `replay` gives the same predictions)."""

    def __init__(
        self,
        every: Predictor,
        stages: Sequence[Stage],
        thresholds: Sequence[float],
        signal: str,
    ) -> None:
        self.every, self.stages = every, list(stages)
        self.thresholds, self.signal = list(thresholds), signal
        self.device, self.engine = every.device, every.engine
        # every image's; later stages add passes for the images that reach them
        self.forward_passes_per_image = len(self.stages[0].pairs)
        # What each stage computes is fixed by the stages: its passes are prepared once.
        self.passes: list[list[tuple[list[int], tuple[str, ...], Predictor]]] = []
        done: dict[Pair, None] = {}
        for stage in self.stages:
            missing = _missing(stage.pairs, done)
            self.passes.append(
                [
                    (members, views, every.restricted(members, list(views), autocast_dtype=None))
                    for views, members in missing.items()
                ]
            )
            done |= dict.fromkeys(stage.pairs)

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> Predictions:
        n = len(images)
        active = torch.arange(n)
        logits_of: dict[Pair, Tensor] = {}
        probs: Tensor | None = None
        preds: Tensor | None = None
        for index, stage in enumerate(self.stages):
            if len(active) == 0:
                break
            everyone = len(active) == n
            reaching = images if everyone else images[active]
            for members, views, part in self.passes[index]:
                computed = part.logits(reaching)  # [M, K, b, C], one pass for them all
                for i, member in enumerate(members):
                    for k, view in enumerate(views):
                        full = computed.new_full((n, computed.shape[-1]), math.nan)
                        full[active] = computed[i, k]
                        logits_of[(member, view)] = full
            output = stage_output(stage, logits_of, None if everyone else active)
            if probs is None or preds is None:
                probs = torch.empty(n, output.probs.shape[-1], device=output.probs.device)
                preds = torch.empty(n, dtype=output.preds.dtype, device=output.preds.device)
            probs[active], preds[active] = output.probs, output.preds
            if index < len(self.stages) - 1:
                unsure = confidence(output.probs, self.signal) < self.thresholds[index]
                active = active[unsure.to(active.device)]
        assert probs is not None and preds is not None
        return Predictions(probs, preds)


def _missing(pairs: Sequence[Pair], computed: dict[Pair, Any]) -> dict[tuple[str, ...], list[int]]:
    """The pairs not computed yet, as passes: the members lacking the same views share one.

    >>> _missing([(0, "identity"), (1, "identity"), (1, "flip")], {(0, "identity"): None})
    {('identity', 'flip'): [1]}
    """
    by_member: dict[int, list[str]] = {}
    for member, view in pairs:
        if (member, view) not in computed:
            by_member.setdefault(member, []).append(view)
    passes: dict[tuple[str, ...], list[int]] = {}
    for member, views in by_member.items():
        passes.setdefault(tuple(views), []).append(member)
    return passes

"""`python -m ml_infer.tune [overrides]` (= `python -m ml_infer mode=tune`): choose a TTA policy
and an ensemble on the calibration split, and write them as presets a later run names.

    python -m ml_infer.tune data=textures            # -> presets/{tta,ensemble,strategy}/tuned.yaml
    python -m ml_infer data=textures strategy=tuned  # the tuned TTA x tuned ensemble

Reads only the calibration split (the data's val split, `data.val_root`, or
`calibration.holdout_fraction` of the test split): the outputs of every checkpoint of
`ensemble.checkpoints` under every registered augmentation's views, from the prediction store.
The scored split's images and labels are never read by a selection.

- TTA: greedy forward selection of views (`selection.greedy_policy`) among those not screened
  out as label-changing (`label_preserving`); every hand preset in conf/tta/ is scored the same
  way, and when one without a screened-out view scores better on the calibration split, it is
  written instead (the tuned policy is never worse there).
- Ensemble (several checkpoints): Caruana selection with replacement (`selection.caruana`),
  written as checkpoints and weights.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from ml_infer.aggregate import Predictions
from ml_infer.assemble import StoreKeys, assemble
from ml_infer.augment import Views
from ml_infer.bank import expand_checkpoint_paths
from ml_infer.config import conf_dir, instantiate_named, options
from ml_infer.errors import UserError, one_of
from ml_infer.evaluate import build_views, load_inputs, plain_predictor
from ml_infer.outputs import atomic_write, sweep_dir, write_json
from ml_infer.runners import build_runner
from ml_infer.selection import OBJECTIVES, caruana, greedy_policy, objective
from ml_infer.shift import shift_of
from ml_infer.store import open_store

log = logging.getLogger(__name__)

IDENTITY = "identity"


@dataclasses.dataclass
class Tuned:
    """What a tuning chose, its scores on the calibration split, and the files it wrote."""

    metrics: dict[str, Any]
    written: list[Path]


def tune(cfg: DictConfig, run_dir: Path) -> Tuned:
    """Chooses views and members on the calibration split; writes the presets and the run's
    `metrics.json` (what was chosen, how every candidate and hand preset scored)."""
    settings = cfg.tune
    if settings.objective not in OBJECTIVES:
        raise one_of("tune.objective", settings.objective, OBJECTIVES)
    name = str(settings.name)
    if not name.isidentifier():
        raise UserError(f"tune.name must be a plain name (letters, digits, _), got {name!r}")
    clash = [group for group in ("tta", "ensemble", "strategy") if name in options_in_conf(group)]
    if clash:  # conf/ comes first on the search path: the preset would never be used
        raise UserError(
            f"tune.name={name!r} is already an option of conf/{clash[0]}/; choose another name"
        )
    for key in ("max_views", "ensemble_steps", "ensemble_init", "bags"):
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"tune.{key} must be a whole number >= 0, got {value!r}")
    if not shift_of(cfg).is_clean:
        raise UserError(
            f"mode=tune chooses on the clean calibration split; shift={cfg.shift.name} applies "
            "to scored images: tune without it, then score the presets under shift"
        )
    # Every augmentation but the crop views: those need photos read as their crops.
    candidates = [
        instantiate_named("augmentation", name, "augmentation") for name in options("augmentation")
    ]
    pool = Views([aug for aug in candidates if not aug.needs_corners])
    checkpoint_paths = expand_checkpoint_paths(cfg.ensemble.checkpoints)
    runner = build_runner("single", cfg.device)
    torch.manual_seed(cfg.seed)
    inputs = load_inputs(cfg, checkpoint_paths, with_calibration=True)
    assert inputs.split is not None
    calibration = inputs.split.calibration
    predictor = plain_predictor(cfg, inputs, pool, runner.device)
    log.info(
        "tuning on %d calibration images (%s): %d view(s) x %d checkpoint(s)",
        len(calibration),
        inputs.split.source,
        len(pool),
        len(inputs.members),
    )
    assembled = assemble(
        predictor,
        StoreKeys.of(predictor, inputs.members, calibration),
        open_store(cfg.engine.store, sweep_dir(), cfg.engine.store_dtype),
        runner,
        runner.loader(calibration, batch_size=cfg.data.batch_size, num_workers=0),
        progress=cfg.engine.progress,
        with_baseline=False,
    )
    assert assembled.logits is not None
    if not torch.isfinite(assembled.logits).all():
        raise UserError("a model gave NaN or infinite outputs on the calibration split")
    probs = assembled.logits.softmax(dim=-1)  # [M, K, n, C]
    labels = calibration.labels
    views = list(pool.names)
    started = time.perf_counter()
    per_view = probs.mean(dim=0)  # each view, the checkpoints averaged: [K, n, C]
    kept = (
        label_preserving(per_view, labels, views.index(IDENTITY))
        if settings.screen
        else list(range(len(views)))
    )
    policy = greedy_policy(per_view[kept], labels, settings.objective, int(settings.max_views))
    chosen_views = [views[kept[index]] for index in policy.chosen]
    hand = {  # the hand presets made of candidate views (not crop views or products)
        preset: _preset_score(preset, probs, views, labels, settings.objective)
        for preset in options_in_conf("tta")
        if set(_preset_views(preset)) <= set(views)
    }
    screened = {views[k] for k in range(len(views)) if k not in kept}
    eligible = [p for p in hand if not screened & set(_preset_views(p))] or ["none"]
    best_hand = min(eligible, key=lambda preset: hand[preset])
    found: dict[str, Any] = {
        "mode": "tune",
        "objective": settings.objective,
        "calibration_split": inputs.split.source,
        "calibration_n": len(calibration),
        "candidate_views": views,
        "view_scores": {
            view: objective(per_view[k], labels, settings.objective) for k, view in enumerate(views)
        },
        "hand_preset_scores": hand,
        "screened_out": [view for k, view in enumerate(views) if k not in kept],
        "tta_chosen_views": chosen_views,
        "tta_score": policy.score,
        "tta_trajectory": policy.trajectory,
    }
    tta_entries: list[Any] = [_view_entry(view) for view in chosen_views if view != IDENTITY]
    aggregation = "mean"
    if hand[best_hand] < policy.score - 1e-9:  # a tie keeps the tuned policy
        preset_cfg = OmegaConf.load(conf_dir() / "tta" / f"{best_hand}.yaml")
        tta_entries = list(preset_cfg.augmentations or [])
        aggregation = str(preset_cfg.aggregation)
        found["tta_chosen_views"] = ["(hand preset)", best_hand]
        found["tta_score"] = hand[best_hand]
    weights = None
    if len(inputs.members) > 1:
        identity = views.index(IDENTITY)
        weights = caruana(
            probs[:, identity],
            labels,
            settings.objective,
            steps=int(settings.ensemble_steps),
            init=int(settings.ensemble_init),
            bags=int(settings.bags),
            seed=int(cfg.seed),
        )
        merged = (probs[:, identity] * torch.tensor(weights).view(-1, 1, 1)).sum(dim=0)
        found["ensemble_weights"] = weights
        found["ensemble_score"] = objective(merged, labels, settings.objective)
        found["member_scores"] = {
            str(member.path): objective(probs[m, identity], labels, settings.objective)
            for m, member in enumerate(inputs.members)
        }
    found["search_s"] = time.perf_counter() - started
    provenance = {
        "written": datetime.datetime.now().isoformat(timespec="seconds"),
        "data": f"{cfg.data.name}, calibration split: {inputs.split.source}",
        "calibration_images": len(calibration),
        "objective": f"{settings.objective} on the calibration split",
        "checkpoints": [
            {"path": str(member.path), "sha256": member.sha256} for member in inputs.members
        ],
    }
    written = write_presets(
        Path(str(settings.presets_dir)),
        name,
        tta_entries,
        aggregation,
        inputs.members,
        weights,
        provenance | {"tta_val_score": found["tta_score"]},
        found.get("ensemble_score"),
    )
    found["presets"] = [str(path) for path in written]
    write_json(run_dir / "metrics.json", found)
    return Tuned(found, written)


def label_preserving(per_view: Tensor, labels: Tensor, identity: int) -> list[int]:
    """The views whose accuracy alone is not significantly below the identity's on these
    images (McNemar p < 0.05 and lower), identity first: a view that alone scores far below
    it changes labels on this data (a mirrored 3 is no 3), whatever averaging it in does to a
    small split's NLL."""
    from ml_infer.metrics import mcnemar_p_value

    right = per_view.argmax(dim=-1) == labels  # [K, n]
    kept = [identity]
    for k in range(len(per_view)):
        if k == identity:
            continue
        worse = right[k].double().mean() < right[identity].double().mean()
        if not (worse and mcnemar_p_value(right[k], right[identity]) < 0.05):
            kept.append(k)
    return kept


def options_in_conf(group: str) -> list[str]:
    """The hand-written options of a group (conf/ only, not earlier tunings' presets)."""
    return sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))


def _preset_views(preset: str) -> tuple[str, ...]:
    preset_cfg = OmegaConf.load(conf_dir() / "tta" / f"{preset}.yaml")
    return tuple(
        build_views(
            preset_cfg.augmentations or [], OmegaConf.select(preset_cfg, "compose", default="sum")
        ).names
    )


def _preset_score(preset: str, probs: Tensor, views: list[str], labels: Tensor, name: str) -> float:
    """A hand TTA preset on the calibration split: its views, its aggregation per checkpoint,
    the checkpoints averaged."""
    preset_cfg = OmegaConf.load(conf_dir() / "tta" / f"{preset}.yaml")
    preset_views = _preset_views(preset)
    aggregator = instantiate_named("tta_aggregation", preset_cfg.aggregation, "TTA aggregation")
    indices = [views.index(view) for view in preset_views]
    per_member = torch.stack(
        [aggregator(Predictions.from_probs(member[indices])).probs for member in probs]
    )
    return objective(per_member.mean(dim=0), labels, name)


def _view_entry(view: str) -> Any:
    """A view as a `tta.augmentations` entry: a geometric view by its augmentation's name, an
    intensity view as its augmentation with that one factor."""
    if view in options("augmentation"):
        return view
    augmentation, _, factor = view.rpartition("_")
    loaded = OmegaConf.to_container(
        OmegaConf.load(conf_dir() / "augmentation" / f"{augmentation}.yaml")
    )
    target = loaded.get("_target_") if isinstance(loaded, dict) else None
    return {"_target_": str(target), "factors": [float(factor)]}


def write_presets(
    presets_dir: Path,
    name: str,
    tta_entries: list[Any],
    aggregation: str,
    members: list[Any],
    weights: list[float] | None,
    provenance: dict[str, Any],
    ensemble_score: float | None,
) -> list[Path]:
    """<presets_dir>/tta/<name>.yaml, ensemble/<name>.yaml (the checkpoints, weighted when
    several were selected among) and strategy/<name>.yaml (the two together), each whole."""
    tta = {"augmentations": tta_entries, "aggregation": aggregation, "provenance": provenance}
    # Always written, with the checkpoints tuned on: `ensemble=single` would name fold 0 of
    # runs_dir, not the checkpoint the policy was chosen for.
    kept = [
        (str(member.path), w)
        for member, w in zip(members, weights or [1.0] * len(members), strict=True)
        if w
    ]
    ensemble = {
        "checkpoints": [path for path, _ in kept],
        "aggregation": "weighted" if weights is not None else "soft_voting",
        "weights": [round(w, 6) for _, w in kept] if weights is not None else None,
        "allow_mixed_architectures": False,
        "provenance": provenance | {"ensemble_val_score": ensemble_score},
    }
    strategy = {
        "defaults": [{"override /tta": name}, {"override /ensemble": name}],
        "strategy": {
            "name": name,
            "precision": "fp32",
            "autocast_dtype": "auto",
            "runner": "single",
        },
    }
    files = [
        (presets_dir / "tta" / f"{name}.yaml", _escaped(tta), "TTA policy", False),
        (presets_dir / "ensemble" / f"{name}.yaml", _escaped(ensemble), "ensemble", False),
        (presets_dir / "strategy" / f"{name}.yaml", _escaped(strategy), "strategy", True),
    ]  # escaped (or refused) before any file is written: all three or none
    return [_write(path, content, what, package) for path, content, what, package in files]


def _write(path: Path, content: dict[str, Any], what: str, package: bool = False) -> Path:
    import yaml

    header = f"# {what} written by `python -m ml_infer.tune` (see provenance)\n"
    if package:
        header = "# @package _global_\n" + header
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as handle:
        handle.write(header + yaml.safe_dump(content, sort_keys=False))
    return path


def _escaped(value: Any) -> Any:
    """Strings with `${` escaped, so that Hydra reads a path as that text, never an
    interpolation; a backslash before `${` cannot be written so that it stays text, and is
    refused."""
    if isinstance(value, str):
        if "\\${" in value:
            raise UserError(
                f"{value!r} has a backslash before '${{', which a preset cannot hold as text; "
                "rename it"
            )
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


def main() -> None:
    """`python -m ml_infer.tune ...` is `python -m ml_infer mode=tune ...`."""
    import runpy

    sys.argv = [sys.argv[0], "mode=tune", *sys.argv[1:]]
    runpy.run_module("ml_infer", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

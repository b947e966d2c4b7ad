"""The `standard` baseline every run is compared with, on the same test images.

The baseline is the run's first checkpoint, fp32, no views. A run that is itself standard is its
own baseline. In a sweep, the baseline's per-sample correctness is stored in
`<sweep>/baselines/` under a key of everything that decides it (checkpoint bytes, raw or EMA
weights, architecture, input, data set and split, engine settings), and later jobs of the sweep
reuse it instead of running it again; jobs that run at the same time (joblib) may each compute
it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ml_infer.aggregate import SoftVoting
from ml_infer.augment import Views
from ml_infer.bank import Classifier
from ml_infer.config import plain_dict
from ml_infer.data import TensorImages
from ml_infer.outputs import write_json
from ml_infer.predictor import EngineSettings, Predictor
from ml_infer.runners import DatasetPredictions, Runner

log = logging.getLogger(__name__)


def correct_by_position(result: DatasetPredictions) -> torch.Tensor:
    """Per-sample correctness [N] in data-set order (a multi-process gather may reorder samples)."""
    correct = torch.empty(len(result.labels), dtype=torch.bool)
    correct[result.positions] = result.preds == result.labels
    return correct


class BaselineCache:
    """Baseline correctness files in a directory, one per baseline identity."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @staticmethod
    def identity(
        cfg: DictConfig, engine: EngineSettings, first_member: Classifier, n_images: int
    ) -> dict[str, Any]:
        return {
            "checkpoint_sha256": first_member.sha256,
            "weights": first_member.weights,
            "model": first_member.model_config,
            "input": first_member.input_spec.to_dict(),
            "data": plain_dict(cfg.data.dataset),
            "split": cfg.data.split,
            "n": n_images,
            # Float rounding, and so a near-tie's class, can depend on how the forward runs.
            "engine": {"device": cfg.device, **dataclasses.asdict(engine)},
        }

    def path(self, identity: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
        return self.directory / f"standard_{key.hexdigest()[:16]}.json"

    def load(self, identity: dict[str, Any]) -> torch.Tensor | None:
        path = self.path(identity)
        if not path.is_file():
            return None
        correct = json.loads(path.read_text())["correct"]
        if len(correct) != identity["n"]:
            return None
        return torch.tensor(correct, dtype=torch.bool)

    def store(self, identity: dict[str, Any], correct: torch.Tensor) -> None:
        write_json(self.path(identity), identity | {"correct": correct.int().tolist()})


def standard_baseline(
    cfg: DictConfig,
    engine: EngineSettings,
    predictor: Predictor,
    members: Sequence[Classifier],
    dataset: TensorImages,
    runner: Runner,
    result: DatasetPredictions,
    cache: BaselineCache | None,
) -> torch.Tensor | None:
    """Per-sample correctness of `standard` (on the main process; None on the others).

    Collective under several processes: every process calls it, and they agree on whether the
    baseline must be computed.
    """
    first = members[0]
    identity = BaselineCache.identity(cfg, engine, first, len(dataset))
    if predictor.forward_passes_per_image == 1 and predictor.autocast_dtype is None:
        baseline = correct_by_position(result) if runner.is_main_process else None
    else:
        cached = cache.load(identity) if cache is not None and runner.is_main_process else None
        if runner.agree(cached is not None):
            return cached
        baseline = compute_standard(cfg, engine, first, dataset, runner)
    if runner.is_main_process and cache is not None and baseline is not None:
        cache.store(identity, baseline)
    return baseline


def compute_standard(
    cfg: DictConfig,
    engine: EngineSettings,
    first: Classifier,
    dataset: TensorImages,
    runner: Runner,
) -> torch.Tensor | None:
    log.info("computing the standard baseline (%s, 1 view, fp32) for the comparison", first.path)
    standard = Predictor(
        [first.model],
        Views([]),
        SoftVoting(),
        SoftVoting(),
        first.input_spec,
        device=runner.device,
        engine=engine,
        member_names=[f"checkpoint {first.path}"],
    )
    result = runner.predict(
        standard,
        dataset,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        warmup_batches=0,
        progress=False,
    )
    return correct_by_position(result) if runner.is_main_process else None

"""The task behind `python -m ml_infer`: evaluate a strategy, write its files, log it.

    compose (Hydra) -> start the MLflow run -> evaluate -> record -> log and end the MLflow run

`run_evaluation(cfg, output_dir)` is that flow as a plain function, for tests and notebooks.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ml_infer.errors import UserError
from ml_infer.evaluate import Evaluation, evaluate
from ml_infer.record import write_run
from ml_infer.tracking import LiveRun, TrackingFailed, log_evaluation, preflight


class NotLogged(UserError):
    """The run's files are complete and written; logging them (tracking.required) failed."""


def run_evaluation(cfg: DictConfig, output_dir: str | Path | None = None) -> dict[str, Any]:
    """Evaluates the configured strategy, writes its files into `output_dir` (default: the Hydra
    run directory) and logs it to the tracking store; returns what `metrics.json` holds (empty
    on the helper processes of a multi-process run)."""
    run_dir = Path(output_dir) if output_dir is not None else hydra_run_dir()
    if cfg.mode == "tune":  # chooses presets; nothing is scored or tracked
        from ml_infer.tune import tune

        return tune(cfg, run_dir).metrics
    if cfg.get("tracking") is not None and cfg.tracking.get("required", False):
        preflight(cfg.tracking)  # a store that cannot be used fails the run before any work
    started_at = _now()
    live = LiveRun.start(cfg, run_dir, started_at)  # RUNNING in MLflow from now
    try:
        evaluation = _evaluate(cfg)
        if evaluation is None:
            return {}
        evaluation.metrics |= {"started_at": started_at, "ended_at": _now()}  # the run's span
        write_run(evaluation, run_dir)
        log_evaluation(cfg, evaluation.metrics, run_dir, live)
    except TrackingFailed as error:  # tracking.required: the files are written, the run pending
        raise NotLogged(str(error)) from None
    except BaseException as error:
        if live is not None:
            live.stopped(error)  # FAILED, or KILLED by a signal
        raise
    return evaluation.metrics


def _evaluate(cfg: DictConfig) -> Evaluation | None:
    if cfg.get("cascade") is not None:
        from ml_infer.cascade_eval import evaluate_cascade

        return evaluate_cascade(cfg)
    return evaluate(cfg)


def hydra_run_dir() -> Path:
    """This job's run directory (Hydra's `runtime.output_dir`)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise UserError("run_evaluation() outside a Hydra run needs an output_dir")
    return Path(HydraConfig.get().runtime.output_dir)


def _now() -> str:
    """The time in UTC, to the millisecond, as ISO 8601 text."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")

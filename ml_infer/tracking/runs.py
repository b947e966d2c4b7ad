"""One evaluated strategy as one MLflow run (its fields: tracking.fields), its artifacts, and a
marker in its run directory saying whether it reached MLflow (`mlflow_run.json`) or why not
(`mlflow_pending.json`, which `--sync` reads to log it later).

The run is live: `LiveRun.start` creates it RUNNING when the evaluation starts, `log_evaluation`
fills it and ends it FINISHED, and `LiveRun.stopped` ends it FAILED or KILLED when the
evaluation does not finish.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ml_infer.config import plain_dict, process_rank, run_label
from ml_infer.errors import Interrupted, UserError, brief, received_interrupt
from ml_infer.filedata import read_json_object
from ml_infer.outputs import (
    MLFLOW_PENDING_FILE,
    MLFLOW_RUN_FILE,
    current_sweep_id,
    sweep_dir,
    write_json,
)
from ml_infer.tracking.fields import (
    dataset_input,
    mlflow_context_tags,
    numeric_metrics,
    run_params,
    run_tags,
)
from ml_infer.tracking.store import (
    _MAX_PARAM_LENGTH,
    PARENT_RUN_FILE,
    TrackingSettings,
    _client,
    _experiment_id,
    _patiently,
    _report_failure,
    _summary_cause,
    error_text,
)

log = logging.getLogger(__name__)


def _job_overrides() -> str:
    """The command-line overrides that made this run (a sweep's label for it), if under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return run_label(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else ""


# Files of a run directory that its MLflow run carries.
RUN_ARTIFACTS = (
    "metrics.json",
    "predictions.csv",
    "resolved_config.yaml",
    "confusion_matrix.png",
    "fixed_broken.png",
    "reliability.png",
    "calibration_split.csv",
)


@dataclass
class RunRecord:
    """Everything one MLflow run of a run directory holds, assembled before the store is
    contacted (so that only talking to the store counts as a store failure)."""

    run_dir: Path
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifacts: list[Path] = field(default_factory=list)
    dataset: dict[str, str] | None = None  # the scored data as an MLflow dataset input
    span_ms: tuple[int | None, int | None] = (None, None)  # when the evaluation started, ended

    @classmethod
    def assemble(
        cls,
        run_dir: Path,
        config: Mapping[str, Any],
        metrics: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: str | None,
    ) -> RunRecord:
        tags = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
        if parent:
            tags["mlflow.parentRunId"] = parent
        tags["run_dir"] = str(run_dir.resolve())
        return cls(
            run_dir=run_dir,
            tags=tags,
            params=run_params(config, metrics),
            metrics=numeric_metrics(metrics),
            artifacts=[run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).is_file()],
            dataset=dataset_input(config, metrics),
            span_ms=(_epoch_ms(metrics.get("started_at")), _epoch_ms(metrics.get("ended_at"))),
        )


@dataclass
class LiveRun:
    """The MLflow run of an evaluation in progress: RUNNING from its start, so that the UI shows
    it. `run_id` is None when the store failed at the start (`start_error`): the run is then
    logged by `--sync`, as one whose store failed at its end."""

    tracking: TrackingSettings
    run_id: str | None = None
    start_error: Exception | None = None

    @classmethod
    def start(cls, cfg: DictConfig, run_dir: Path, started_at: str) -> LiveRun | None:
        """Creates the run, tagged with what is known before the evaluation (strategy, data,
        source, user, the sweep's parent); None when tracking is off, and on the helper
        processes of a multi-process run (rank 0 logs). A store that fails is one warning, or
        TrackingFailed when tracking is required (before any work)."""
        tracking = TrackingSettings.of(cfg.get("tracking"))
        if tracking is None or process_rank() > 0:
            return None
        live = cls(tracking)
        predicting = cfg.mode == "predict"  # named as metrics.json will name it
        data = f"folder/{cfg.predict.root}" if predicting else f"{cfg.data.name}/{cfg.data.split}"
        tags = mlflow_context_tags() | {
            "strategy": str(cfg.strategy.name),
            "data": data,
            "run_dir": str(run_dir.resolve()),
        }
        if overrides := _job_overrides():
            tags["overrides"] = overrides[:_MAX_PARAM_LENGTH]
        if parent := _parent_run_id():
            tags["mlflow.parentRunId"] = parent
        try:
            client = _client(tracking)
            run = _patiently(
                client.create_run,
                _patiently(_experiment_id, client, tracking),
                start_time=_epoch_ms(started_at),
                tags=tags,
                run_name=tracking.run_name,
            )
            live.run_id = run.info.run_id
        except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
            live.start_error = error
            _report_failure(tracking, "starting the run", error)
        return live

    def stopped(self, error: BaseException) -> None:
        """Ends the run KILLED (a signal, Ctrl-C) or FAILED (anything else), its `error` tag
        saying why. Quietly: the error that stopped the evaluation is what the user hears of."""
        if self.run_id is None:
            return
        # a library may have turned the signal into its own error (torch.load: a RuntimeError)
        interrupted = error if isinstance(error, Interrupted) else received_interrupt()
        if interrupted is not None:
            status, why = "KILLED", f"interrupted by {interrupted.signal_name}"
        elif isinstance(error, KeyboardInterrupt):
            status, why = "KILLED", "interrupted"
        else:
            why = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
            status = "FAILED"
        # The status first: a second Ctrl-C while a slow server answers stops what is left.
        try:
            client = _client(self.tracking)
            client.set_terminated(self.run_id, status)
            client.set_tag(self.run_id, "error", brief(why, _MAX_PARAM_LENGTH))
        except BaseException:  # noqa: BLE001 - the error that stopped the run is the one to raise
            pass


def log_evaluation(
    cfg: DictConfig, metrics: Mapping[str, Any], run_dir: Path, live: LiveRun | None = None
) -> str | None:
    """Logs one evaluated strategy into its MLflow run (`live`'s, or one made now), nested under
    the sweep's parent run, if any, and ends it FINISHED.

    Returns the run id, or None when tracking is off or failed (and was not required). The run
    directory records the outcome: `mlflow_run.json` (the run id), or `mlflow_pending.json` (why
    not, and the tags to log later with `python -m ml_infer.report SWEEP_DIR --sync`).
    """
    tracking = live.tracking if live is not None else TrackingSettings.of(cfg.get("tracking"))
    if tracking is None:
        return None
    config = plain_dict(cfg)
    tags = mlflow_context_tags() | run_tags(metrics, _job_overrides())
    record = RunRecord.assemble(run_dir, config, metrics, tags, _parent_run_id())
    # the live run, named before the store is contacted: a store that fails now leaves it
    # for --sync to delete and log again
    created = {"run_id": live.run_id} if live is not None and live.run_id else {}
    try:
        run_id = _log_run(tracking, record, created)
    except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
        _mark_pending(tracking, record, error, created.get("run_id"))
        if live is None or live.start_error is None:  # a failed start warned already
            _report_failure(tracking, "logging the run", error)
        return None
    _mark_logged(tracking, run_dir, run_id)
    return run_id


def _marker_base(tracking: TrackingSettings) -> dict[str, Any]:

    return {
        "uri": tracking.uri,
        "experiment": tracking.experiment,
        "sweep_id": current_sweep_id(),
        "cwd": os.getcwd(),
    }


def _write_marker(path: Path, payload: Mapping[str, Any]) -> None:
    """A tracking marker of a run directory; one that cannot be written costs a warning only."""
    try:
        write_json(path, payload)
    except OSError as error:
        log.warning("cannot write %s (%s)", path, error.strerror or error)


def _mark_logged(tracking: TrackingSettings, run_dir: Path, run_id: str, **extra: Any) -> None:

    _write_marker(run_dir / MLFLOW_RUN_FILE, {"run_id": run_id, **_marker_base(tracking), **extra})
    with contextlib.suppress(OSError):
        (run_dir / MLFLOW_PENDING_FILE).unlink(missing_ok=True)


def _mark_pending(
    tracking: TrackingSettings, record: RunRecord, error: Exception, partial_run_id: str | None
) -> None:

    _write_marker(
        record.run_dir / MLFLOW_PENDING_FILE,
        {
            "reason": error_text(error),
            "cause": _summary_cause(error),
            **_marker_base(tracking),
            "run_name": tracking.run_name,
            "partial_run_id": partial_run_id,  # created before the store failed: deleted by sync
            "tags": record.tags,
        },
    )


def _log_run(tracking: TrackingSettings, record: RunRecord, created: dict[str, str]) -> str:
    """Logs everything of `record` into the MLflow run `created["run_id"]` (a live run), or into
    one created now, and ends it FINISHED; `created["run_id"]` names the run as soon as it
    exists, so that a run the store failed midway can be cleaned up."""
    from mlflow.entities import Metric, Param, RunTag

    run_id = created.get("run_id")
    client = _client(tracking)
    started, ended = record.span_ms
    tags = [RunTag(k, v) for k, v in record.tags.items()] if run_id else []
    if run_id is None:
        run = _patiently(
            client.create_run,
            _patiently(_experiment_id, client, tracking),
            start_time=started,
            tags=record.tags,
            run_name=tracking.run_name,
        )
        run_id = run.info.run_id
    created["run_id"] = run_id
    try:
        if record.dataset is not None:
            _patiently(client.log_inputs, run_id, [_mlflow_dataset(record.dataset)])
        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in record.params.items()]
        metric_list = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
        for start in range(0, max(len(param_list), len(metric_list), len(tags)), 100):
            _patiently(
                client.log_batch,
                run_id,
                metrics=metric_list[start : start + 100],
                params=param_list[start : start + 100],
                tags=tags[start : start + 100],
            )
        for artifact in record.artifacts:
            client.log_artifact(run_id, str(artifact))
        _patiently(client.set_terminated, run_id, "FINISHED", end_time=ended)
    except Exception:
        # the store may be gone: the original failure is what to report
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    log.info(
        "logged MLflow run %s to %s (experiment %r)", run_id, tracking.uri, tracking.experiment
    )
    return run_id


def _epoch_ms(timestamp: Any) -> int | None:
    """An ISO 8601 time of metrics.json in milliseconds since 1970 (None if it is not one).

    >>> _epoch_ms("1970-01-01T00:00:01.500+00:00"), _epoch_ms("yesterday"), _epoch_ms(3)
    (1500, None, None)
    """
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(timestamp).timestamp() * 1000)
    except (TypeError, ValueError):
        return None


def _mlflow_dataset(fields: Mapping[str, str]) -> Any:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", "test")])


def _read_parent_marker(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's parent-run marker, read as data; None if missing or not a marker."""
    try:
        marker = read_json_object(sweep_dir / PARENT_RUN_FILE)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker.get("run_id"), str) else None


def _write_parent_marker(sweep_dir: Path, marker: Mapping[str, Any]) -> None:

    write_json(sweep_dir / PARENT_RUN_FILE, marker)


def _parent_run_id() -> str | None:
    """A sweep's jobs find the parent run in a file of the sweep directory (any launcher)."""
    shared = sweep_dir()
    marker = _read_parent_marker(shared) if shared is not None else None
    return marker["run_id"] if marker else None

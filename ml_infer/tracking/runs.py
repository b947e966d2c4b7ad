"""One evaluated strategy as one MLflow run: params, tags, metrics, artifacts, and a marker in its
run directory saying whether it reached MLflow (`mlflow_run.json`) or why not
(`mlflow_pending.json`, which `--sync` reads to log it later).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ml_infer.config import plain_dict, run_label
from ml_infer.filedata import read_json_object
from ml_infer.outputs import (
    MLFLOW_PENDING_FILE,
    MLFLOW_RUN_FILE,
    current_sweep_id,
    sweep_dir,
    write_json,
)
from ml_infer.tracking.store import (
    _MAX_PARAM_LENGTH,
    PARENT_RUN_FILE,
    TrackingSettings,
    _client,
    _experiment_id,
    _report_failure,
    _summary_cause,
    error_text,
)

log = logging.getLogger(__name__)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists become JSON.

    >>> flatten({"tta": {"augmentations": ["hflip"], "aggregation": "mean"}, "seed": 0})
    {'tta.augmentations': '["hflip"]', 'tta.aggregation': 'mean', 'seed': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, prefix=f"{name}.")
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


def run_params(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, str]:
    """Params of a run: its resolved config (a plain mapping), flattened, plus the view and
    model counts and the precision that ran."""
    params = flatten({k: v for k, v in config.items() if k != "hydra"})
    params["tta.views"] = str(metrics.get("views"))
    params["ensemble.models"] = str(metrics.get("models"))
    params["precision.effective"] = str(metrics.get("precision"))
    return {k: v[:_MAX_PARAM_LENGTH] for k, v in params.items()}


def run_tags(
    metrics: Mapping[str, Any], overrides: str = "", host: str | None = None
) -> dict[str, str]:
    checkpoints = metrics.get("checkpoint_sha256") or []
    tags = {
        "strategy": str(metrics.get("strategy")),
        "data": f"{metrics.get('data')}/{metrics.get('split')}",
        "checkpoint_sha256": ",".join(map(str, checkpoints))[:_MAX_PARAM_LENGTH],
        "host": host or platform.node(),
        "device": str(metrics.get("device")),
    }
    commit, dirty = git_state()
    if commit:
        tags["git_commit"] = commit
        tags["git_dirty"] = str(dirty).lower()
    if overrides:
        tags["overrides"] = overrides[:_MAX_PARAM_LENGTH]
    return tags


def _job_overrides() -> str:
    """The command-line overrides that made this run (a sweep's label for it), if under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return run_label(list(HydraConfig.get().overrides.task)) if HydraConfig.initialized() else ""


def git_state() -> tuple[str | None, bool]:
    """The commit of the ml_infer checkout this code runs from, and whether it has local changes
    (None outside a git checkout, e.g. when installed from a wheel)."""
    package_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package_dir), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, dirty


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json as MLflow metrics; a mapping of numbers (per_view_accuracy,
    per_member_accuracy) as one metric per entry, e.g. `per_view_accuracy.horizontal_flip`.

    >>> numeric_metrics({"accuracy": 0.9, "ok": True, "per_view_accuracy": {"identity": 0.9}})
    {'accuracy': 0.9, 'per_view_accuracy.identity': 0.9}
    """
    found: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, Mapping):
            for name, number in value.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    found[f"{key}.{_metric_name(str(name))}"] = float(number)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = float(value)
    return found


def _metric_name(name: str) -> str:
    """A checkpoint path or view name as an MLflow metric key (letters, digits, _ - . / only).

    >>> _metric_name("runs/digits/fold_0/weights/best.pt")
    'runs/digits/fold_0/weights/best.pt'
    >>> _metric_name("my fold (1).pt")
    'my_fold__1_.pt'
    """
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


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
        )


def log_evaluation(cfg: DictConfig, metrics: Mapping[str, Any], run_dir: Path) -> str | None:
    """Logs one evaluated strategy as an MLflow run (nested under the sweep's parent run, if any).

    Returns the run id, or None when tracking is off or failed (and was not required). The run
    directory records the outcome: `mlflow_run.json` (the run id), or `mlflow_pending.json` (why
    not, and the tags to log later with `python -m ml_infer.report SWEEP_DIR --sync`).
    """
    tracking = TrackingSettings.of(cfg.get("tracking"))
    if tracking is None:
        return None
    config = plain_dict(cfg)
    record = RunRecord.assemble(
        run_dir, config, metrics, run_tags(metrics, _job_overrides()), _parent_run_id()
    )
    created: dict[str, str] = {}
    try:
        run_id = _log_run(tracking, record, created)
    except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
        _mark_pending(tracking, record, error, created.get("run_id"))
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
    """Creates the MLflow run of `record` and logs everything into it; `created["run_id"]` names
    the run as soon as it exists, so that a run the store failed midway can be cleaned up."""
    import time

    from mlflow.entities import Metric, Param

    client = _client(tracking)
    experiment_id = _experiment_id(client, tracking)
    run = client.create_run(experiment_id, tags=record.tags, run_name=tracking.run_name)
    run_id = created["run_id"] = run.info.run_id
    try:
        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in record.params.items()]
        metric_list = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
        for start in range(0, max(len(param_list), len(metric_list)), 100):
            client.log_batch(
                run_id,
                metrics=metric_list[start : start + 100],
                params=param_list[start : start + 100],
            )
        for artifact in record.artifacts:
            client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        # the store may be gone: the original failure is what to report
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    log.info(
        "logged MLflow run %s to %s (experiment %r)", run_id, tracking.uri, tracking.experiment
    )
    return run_id


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

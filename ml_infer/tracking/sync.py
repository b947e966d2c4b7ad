"""Runs that missed live logging, logged later from their run directories
(`python -m ml_infer.report SWEEP_DIR --sync`), and an MLflow experiment's runs read back for the
report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_infer.config import run_label
from ml_infer.errors import UserError, brief
from ml_infer.filedata import read_json_object
from ml_infer.outputs import (
    read_overrides,
    sweep_id_of,
)
from ml_infer.sweeplock import acquire_sweep_lock, release_sweep_lock
from ml_infer.tracking.fields import CONFIGURATION_COUNTS, run_tags
from ml_infer.tracking.runs import (
    RunRecord,
    _log_run,
    _mark_logged,
    _read_parent_marker,
    _write_parent_marker,
)
from ml_infer.tracking.store import (
    TrackingFailed,
    TrackingSettings,
    _absolute_uri,
    _client,
    _quiet_mlflow_env,
    _summary_cause,
    check_reachable,
    error_text,
    preflight,
)
from ml_infer.tracking.sweep import (
    _finish_parent,
    _start_parent,
    tracking_outcome,
)

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    uri: str | None = None
    parent_run_id: str | None = None
    parent_status: str | None = None
    logged: list[tuple[Path, str]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def sync_sweep(
    sweep_dir: Path, tracking_uri: str | None = None, say: Callable[[str], None] = print
) -> SyncResult:
    """Logs the runs of the sweep in `sweep_dir` that missed live logging (`mlflow_pending.json`)
    from their run directories, nested under the sweep's parent run (made if there is none in
    the store), marks each as logged, and closes the parent FAILED: a sweep with runs that missed
    live logging is FAILED. Idempotent: runs already logged are not logged again.

    `tracking_uri` overrides the URI the sweep recorded. Holds the sweep directory's lock while
    it runs (a running sweep, or another sync, is refused). A store that does not answer is a
    TrackingFailed; a run that cannot be logged is listed in `failed`, and stays pending.
    """
    sweep_id = sweep_id_of(sweep_dir)
    lock = acquire_sweep_lock(sweep_dir, sweep_id or "-", "python -m ml_infer.report --sync")
    try:
        return _sync_locked(sweep_dir, sweep_id, tracking_uri, say)
    finally:
        release_sweep_lock(lock)


def _sync_locked(
    sweep_dir: Path, sweep_id: str | None, tracking_uri: str | None, say: Callable[[str], None]
) -> SyncResult:
    import yaml

    result = SyncResult()
    outcome = tracking_outcome(sweep_dir, sweep_id)
    parent = _read_parent_marker(sweep_dir)
    if not outcome.pending and (parent is None or parent.get("closed", True)):
        return result
    first = next(iter(outcome.pending.values()), None) or parent or {}
    recorded = _absolute_uri(str(first.get("uri")), first.get("cwd"))
    result.uri = tracking_uri or recorded

    # Each run: its metrics, resolved config and tags, read as data.
    records: list[tuple[RunRecord, TrackingSettings, dict[str, Any]]] = []
    for run_dir, marker in outcome.pending.items():
        try:
            metrics = read_json_object(run_dir / "metrics.json")
            config = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
            if not isinstance(config, dict):
                raise ValueError("resolved_config.yaml does not hold a mapping")
        except (OSError, ValueError, UnicodeDecodeError, yaml.YAMLError) as error:
            result.skipped.append((run_dir, brief(error)))
            continue
        tags = marker.get("tags")
        if not (isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())):
            tags = run_tags(metrics, _label(read_overrides(run_dir)), str(metrics.get("host")))
        settings = TrackingSettings.of(config.get("tracking") or {}, result.uri)
        if settings is None:
            settings = TrackingSettings(uri=result.uri, experiment=str(marker.get("experiment")))
        records.append((RunRecord.assemble(run_dir, config, metrics, tags, None), settings, marker))
    store = records[0][1] if records else TrackingSettings(result.uri, str(first.get("experiment")))
    preflight({"backend": "mlflow", "uri": result.uri, "experiment": store.experiment})

    # The parent: the one the sweep made, if this store has it; else a new one.
    client = _client(store)
    parent_id = parent["run_id"] if parent else None
    if parent_id and not _run_exists(client, parent_id):
        parent_id = None
    if parent_id is None:
        parent_id = _in_store(
            store,
            "creating the sweep's parent run",
            _start_parent,
            store,
            sweep_dir,
            _sweep_overrides(sweep_dir),
        )
        parent = {"run_id": parent_id, "uri": result.uri, "sweep_id": sweep_id, "closed": False}
        _write_parent_marker(sweep_dir, parent)
        say(f"made a parent run {parent_id} for sweep {sweep_dir}")
    result.parent_run_id = parent_id
    parent = parent or {}

    for record, settings, marker in records:
        record.tags["mlflow.parentRunId"] = parent_id
        record.tags["logged_by"] = "python -m ml_infer.report --sync"
        partial = marker.get("partial_run_id")
        if isinstance(partial, str) and _run_exists(client, partial):
            # what live logging had begun before the store failed
            _in_store(store, "deleting a run left half-logged", client.delete_run, partial)
        try:
            run_id = _log_run(settings, record, {})
        except Exception as error:  # noqa: BLE001 - this run's files or the store: others go on
            result.failed.append((record.run_dir, error_text(error)))
            continue
        _mark_logged(settings, record.run_dir, run_id, sweep_id=sweep_id, synced=True)
        result.logged.append((record.run_dir, run_id))
        say(f"logged {record.run_dir.name} as MLflow run {run_id}")

    if not result.failed and (result.logged or not parent.get("closed", False)):
        missed = bool(outcome.pending)
        result.parent_status = "FAILED" if missed else str(parent.get("status") or "FAILED")
        _in_store(
            store,
            "closing the sweep's parent run",
            _finish_parent,
            store,
            parent_id,
            sweep_dir,
            result.parent_status,
        )
        _write_parent_marker(sweep_dir, parent | {"status": result.parent_status, "closed": True})
    return result


def _in_store(
    tracking: TrackingSettings, action: str, function: Callable[..., Any], *args: Any
) -> Any:
    """A step of --sync that only talks to the store: its failure is one short TrackingFailed."""
    try:
        return function(*args)
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - network, database, permissions
        raise TrackingFailed(
            f"MLflow tracking to {tracking.uri} failed while {action}: {error_text(error)}",
            _summary_cause(error),
        ) from None


def _label(overrides: list[str] | None) -> str:

    return run_label(overrides) if overrides else ""


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return bool(client.get_run(run_id).info.lifecycle_stage == "active")
    except MlflowException:
        return False


def _sweep_overrides(sweep_dir: Path) -> list[str]:
    """The sweep's command-line overrides, from its multirun.yaml read as data ([] if unknown)."""
    import yaml

    try:
        config = yaml.safe_load((sweep_dir / "multirun.yaml").read_text())
        overrides = config["hydra"]["overrides"]["task"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return []
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def runs_of_experiment(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Rows for the report: each finished strategy run's metrics and the params it compares."""
    _quiet_mlflow_env()
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise UserError(
                f"no MLflow experiment {experiment!r} at {tracking_uri}; found: {', '.join(names)}"
            )
        runs = client.search_runs(
            [found.experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time ASC"],
        )
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
        raise TrackingFailed(
            f"tracking store {tracking_uri} cannot be used: {error_text(error)}",
            _summary_cause(error),
        ) from None
    rows = []
    for run in runs:
        if run.data.tags.get("sweep") == "true" or "accuracy" not in run.data.metrics:
            continue  # sweep parents and mode=predict runs have nothing to compare
        params = run.data.params
        rows.append(
            dict(run.data.metrics)
            | {
                "run": run.data.tags.get("overrides") or run.info.run_name,
                "run_id": run.info.run_id,
                "strategy": params.get("strategy.name", run.data.tags.get("strategy")),
                "tta_aggregation": params.get("tta.aggregation"),
                "ensemble_aggregation": params.get("ensemble.aggregation"),
                "data": params.get("data.name"),
                "split": params.get("data.split"),
                "checkpoint_sha256": run.data.tags.get("checkpoint_sha256", "").split(","),
                "forward_passes_per_image": int(
                    run.data.metrics.get("forward_passes_per_image", 0)
                ),
                # The shift: its name is a param; a corruption that changed no pixel did not apply.
                "shift": params.get("shift.name", "none"),
                "severity": int(run.data.metrics.get("severity", 0)),
                "shift_applied": run.data.metrics.get("shift_mean_abs_change", 0.0) > 0,
            }
            | _counts(params, run.data.metrics)
        )
    return rows


def _counts(params: dict[str, str], metrics: dict[str, float]) -> dict[str, int | None]:
    """The configuration counts of a run: params (metrics in runs logged before they moved).

    >>> _counts({"tta.views": "10", "n": "360"}, {"models": 1.0})["views"], _counts({}, {})["n"]
    (10, None)
    """
    found: dict[str, int | None] = {}
    for name in CONFIGURATION_COUNTS:
        param = {"views": "tta.views", "models": "ensemble.models"}.get(name, name)
        value = params.get(param, metrics.get(name))
        try:
            found[name] = int(float(value)) if value is not None else None
        except ValueError:
            found[name] = None
    return found

"""MLflow runs, the sweep's parent run, the end-of-sweep report. The only module importing mlflow.

One MLflow run per evaluated strategy: params are the flattened resolved config (plus
`tta.views` and `ensemble.models`), tags name the strategy, data, checkpoint digests, git commit
and host, metrics are every number in `metrics.json`, artifacts are the resolved config,
`predictions.csv` and a confusion-matrix PNG. A multirun gets a parent run, made by the
`SweepTracking` callback registered in `conf/hydra/default.yaml` (so it works under every
launcher), with each strategy run nested under it; when the sweep ends, the comparison report
is written to the sweep directory and logged to the parent run.

Tracking never costs the user their results: it runs after the local files are written, and a
failing store is one warning naming its URI (`tracking.required=true` makes it an error).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ml_infer.errors import UserError, exit_with

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run.json"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_HTTP_TIMEOUT_S = 3.0


class TrackingFailed(UserError):
    """The tracking store could not be reached or written."""


def enabled(tracking: Any) -> bool:
    return tracking is not None and tracking.get("backend", "none") == "mlflow"


def _quiet_mlflow_env() -> None:
    """An unreachable server should fail in seconds, not after MLflow's minutes of retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def check_reachable(uri: str) -> None:
    """Fails fast on an http(s) URI nobody answers, and on a sqlite file that cannot be created."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname, port), timeout=_HTTP_TIMEOUT_S).close()
        except OSError as error:
            raise TrackingFailed(f"tracking server {uri} is unreachable ({error})") from None
    elif parsed.scheme == "sqlite":
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingFailed(
                f"tracking store {uri}: cannot create {database.parent} ({error})"
            ) from None


def _client(tracking: Any):
    _quiet_mlflow_env()
    check_reachable(tracking.uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri)


def _experiment_id(client: Any, tracking: Any) -> str:
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(
        tracking.experiment, artifact_location=_artifact_location(tracking)
    )


def _artifact_location(tracking: Any) -> str | None:
    """Artifacts of an embedded sqlite store go beside the database, not into ./mlruns."""
    if tracking.get("artifact_location"):
        return str(tracking.artifact_location)
    if tracking.uri.startswith("sqlite:///"):
        database = Path(tracking.uri.removeprefix("sqlite:///")).resolve()
        return (database.parent / "mlartifacts").as_uri()
    return None  # a server decides where its artifacts go


def guarded(tracking: Any, action: str, function, *args: Any, **kwargs: Any) -> Any:
    """Runs a tracking step; a failure is a warning, or an error when tracking.required is set."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # any store failure: network, database, permissions
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        message = f"MLflow tracking to {tracking.uri} failed while {action}: {reason}"
        if tracking.get("required", False):
            raise TrackingFailed(message) from None
        log.warning("%s; results are in the run directory only", message)
        return None


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


def run_params(cfg: DictConfig, metrics: Mapping[str, Any]) -> dict[str, str]:
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    params = flatten(config)
    params["tta.views"] = str(metrics["views"])
    params["ensemble.models"] = str(metrics["models"])
    params["precision.effective"] = str(metrics["precision"])
    return {k: v[:_MAX_PARAM_LENGTH] for k, v in params.items()}


def run_tags(cfg: DictConfig, metrics: Mapping[str, Any]) -> dict[str, str]:
    tags = {
        "strategy": str(metrics["strategy"]),
        "data": f"{metrics['data']}/{metrics['split']}",
        "checkpoint_sha256": ",".join(metrics["checkpoint_sha256"])[:_MAX_PARAM_LENGTH],
        "host": platform.node(),
        "device": str(metrics["device"]),
    }
    commit, dirty = git_state()
    if commit:
        tags["git_commit"] = commit
        tags["git_dirty"] = str(dirty).lower()
    overrides = _job_overrides()
    if overrides:
        tags["overrides"] = overrides[:_MAX_PARAM_LENGTH]
    return tags


def _job_overrides() -> str:
    """The command-line overrides that made this run (a sweep's label for it), if under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    from ml_infer.config import run_label

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
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def log_evaluation(cfg: DictConfig, metrics: Mapping[str, Any], run_dir: Path) -> str | None:
    """Logs one evaluated strategy as an MLflow run (nested under the sweep's parent run, if any).

    Returns the run id, or None when tracking is off or failed (and was not required). What is
    logged is assembled first, so that only talking to the store is treated as a store failure.
    """
    tracking = cfg.get("tracking")
    if not enabled(tracking):
        return None
    tags = run_tags(cfg, metrics)
    parent = _parent_run_id()
    if parent:
        tags["mlflow.parentRunId"] = parent
    tags["run_dir"] = str(run_dir.resolve())
    params = run_params(cfg, metrics)
    values = numeric_metrics(metrics)
    artifacts = [run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).is_file()]
    return guarded(tracking, "logging the run", _log_run, tracking, tags, params, values, artifacts)


# Files of a run directory that its MLflow run carries.
RUN_ARTIFACTS = ("metrics.json", "predictions.csv", "resolved_config.yaml", "confusion_matrix.png")


def _log_run(
    tracking: Any,
    tags: dict[str, str],
    params: dict[str, str],
    values: dict[str, float],
    artifacts: list[Path],
) -> str:
    import time

    from mlflow.entities import Metric, Param

    client = _client(tracking)
    experiment_id = _experiment_id(client, tracking)
    run = client.create_run(experiment_id, tags=tags, run_name=str(tracking.run_name))
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in params.items()]
        metric_list = [Metric(k, v, now, 0) for k, v in values.items()]
        for start in range(0, max(len(param_list), len(metric_list)), 100):
            client.log_batch(
                run_id,
                metrics=metric_list[start : start + 100],
                params=param_list[start : start + 100],
            )
        for artifact in artifacts:
            client.log_artifact(run_id, str(artifact))
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    log.info(
        "logged MLflow run %s to %s (experiment %r)", run_id, tracking.uri, tracking.experiment
    )
    return run_id


def _parent_run_id() -> str | None:
    """A sweep's jobs find the parent run in a file of the sweep directory (any launcher)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    marker = Path(HydraConfig.get().sweep.dir) / PARENT_RUN_FILE
    return json.loads(marker.read_text())["run_id"] if marker.is_file() else None


def _side_process() -> bool:
    """A rank other than 0 of a torchrun / accelerate launch: it neither reports nor tracks."""
    from ml_infer.config import process_rank

    return process_rank() > 0


_failed_jobs: list[Path] = []


def sweep_failures() -> list[Path]:
    """Run directories of the last sweep whose job failed on bad input (empty when none did)."""
    return list(_failed_jobs)


class SweepTracking(Callback):
    """Opens the sweep's parent MLflow run; when the sweep ends, writes and logs the comparison,
    lists the jobs that failed, and closes the parent run (FAILED if any job did)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _failed_jobs.clear()
        if _side_process():
            return
        from ml_infer.outputs import start_sweep

        start_sweep(Path(config.hydra.sweep.dir))
        tracking = config.get("tracking")
        if not enabled(tracking):
            return
        marker = Path(config.hydra.sweep.dir) / PARENT_RUN_FILE
        marker.unlink(missing_ok=True)  # a reused sweep dir must not nest runs under an old parent
        try:
            run_id = guarded(
                tracking, "creating the sweep's parent run", self._start_parent, tracking, config
            )
        except TrackingFailed as error:
            exit_with(error)
        if run_id:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"run_id": run_id, "uri": tracking.uri}))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ml_infer.outputs import JOB_ERROR_FILE, read_job_error, sweep_id_of
        from ml_infer.report import markdown_table, write_comparison

        if _side_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_id = sweep_id_of(sweep_dir)
        errors = {
            path.parent: read_job_error(path.parent)
            for path in sweep_dir.glob(f"*/{JOB_ERROR_FILE}")
        }
        _failed_jobs[:] = sorted(
            job for job, (_, job_sweep) in errors.items() if job_sweep == sweep_id
        )
        try:
            rows = write_comparison(sweep_dir)
            if rows:
                print(f"\nComparison of {len(rows)} runs ({sweep_dir / 'comparison.md'}):\n")
                print(markdown_table(rows), flush=True)
            for job_dir in _failed_jobs:
                error = errors[job_dir][0]
                print(f"error: run {job_dir.name} failed: {error}", file=sys.stderr, flush=True)
        finally:
            tracking = config.get("tracking")
            marker = sweep_dir / PARENT_RUN_FILE
            if enabled(tracking) and marker.is_file():
                run_id = json.loads(marker.read_text())["run_id"]
                status = "FAILED" if _failed_jobs else "FINISHED"
                guarded(
                    tracking,
                    "closing the sweep's parent run",
                    self._finish_parent,
                    tracking,
                    run_id,
                    sweep_dir,
                    status,
                )

    @staticmethod
    def _start_parent(tracking: Any, config: DictConfig) -> str:
        client = _client(tracking)
        experiment_id = _experiment_id(client, tracking)
        overrides = " ".join(config.hydra.overrides.task)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep {Path(config.hydra.sweep.dir).name}",
            tags={
                "sweep": "true",
                "sweep_overrides": overrides[:_MAX_PARAM_LENGTH],
                "host": platform.node(),
            },
        )
        return run.info.run_id

    @staticmethod
    def _finish_parent(tracking: Any, run_id: str, sweep_dir: Path, status: str) -> None:
        client = _client(tracking)
        for name in ("comparison.md", "comparison.csv", "pareto.png"):
            if (sweep_dir / name).is_file():
                client.log_artifact(run_id, str(sweep_dir / name))
        client.set_tag(run_id, "sweep_dir", str(sweep_dir.resolve()))
        client.set_terminated(run_id, status)
        log.info("closed the sweep's MLflow parent run %s", run_id)


def runs_of_experiment(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """Rows for the report: each finished strategy run's metrics and the params it compares."""
    _quiet_mlflow_env()
    check_reachable(tracking_uri)
    from mlflow.tracking import MlflowClient

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
                "views": int(float(params.get("tta.views", "nan")))
                if "tta.views" in params
                else None,
                "models": int(float(params["ensemble.models"]))
                if "ensemble.models" in params
                else None,
                "tta_aggregation": params.get("tta.aggregation"),
                "ensemble_aggregation": params.get("ensemble.aggregation"),
                "data": params.get("data.name"),
                "split": params.get("data.split"),
                "checkpoint_sha256": run.data.tags.get("checkpoint_sha256", "").split(","),
                "forward_passes_per_image": int(
                    run.data.metrics.get("forward_passes_per_image", 0)
                ),
            }
        )
    return rows

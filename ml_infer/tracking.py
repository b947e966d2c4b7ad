"""MLflow runs, the sweep's parent run, the end-of-sweep report. The only module importing mlflow.

One MLflow run per evaluated strategy: params are the flattened resolved config (plus
`tta.views` and `ensemble.models`), tags name the strategy, data, checkpoint digests, git commit
and host, metrics are every number in `metrics.json`, artifacts are the resolved config,
`predictions.csv` and a confusion-matrix PNG. A multirun gets a parent run, made by the
`SweepTracking` callback registered in `conf/hydra/default.yaml` (so it works under every
launcher), with each strategy run nested under it; when the sweep ends, the comparison report
is written to the sweep directory and logged to the parent run.

Tracking never costs the user their results: it runs after the local files are written, and a
failing store is one warning naming its URI (`tracking.required=true` makes it an error). Each
run directory records whether its run reached MLflow (`mlflow_run.json`) or not and why
(`mlflow_pending.json`); `sync_sweep` (`python -m ml_infer.report SWEEP_DIR --sync`) logs the
runs that missed live logging once the store answers again.

The sweep callback also owns the sweep directory while the sweep runs (`.sweep.lock`, see
`ml_infer.outputs.acquire_sweep_lock`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import urllib.parse
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ml_infer.config import plain_dict
from ml_infer.errors import UserError, brief, exit_with

log = logging.getLogger(__name__)

PARENT_RUN_FILE = "mlflow_parent_run.json"
_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
_HTTP_TIMEOUT_S = 3.0


class TrackingFailed(UserError):
    """The tracking store could not be reached or written. `cause` is the shortest account of
    why (e.g. "connection refused"), for summaries."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message


# --- one short line from third-party text (errors.brief: first line, first sentence) ----------


_OS_ERROR_TEXT = re.compile(r"\[Errno -?\d+\] ([^\"'()\[\]]+)")
_API_REQUEST = re.compile(r"API request to (\S+?)(?:\?\S*)? failed with exception (.*)", re.S)
# What requests / urllib3 say, deep inside MLflow's message, when a server is gone or stalls.
_NETWORK_FAILURES = (
    "Connection refused",
    "Connection reset by peer",
    "Remote end closed connection without response",
    "Connection aborted",
    "Read timed out",
    "Name or service not known",
    "Temporary failure in name resolution",
    "No route to host",
    "Network is unreachable",
)


def error_cause(error: BaseException) -> str | None:
    """The shortest account of a network failure ("connection refused"), found in an OS error
    or in the text MLflow wraps around one; None for other failures.

    >>> error_cause(ConnectionRefusedError(111, "Connection refused"))
    'connection refused'
    >>> error_cause(RuntimeError("API request to http://h/api failed with exception "
    ...     "HTTPConnectionPool(...): Max retries exceeded (Caused by ProtocolError('Connection "
    ...     "aborted.', RemoteDisconnected('Remote end closed connection without response')))"))
    'remote end closed connection without response'
    """
    if isinstance(error, TrackingFailed):
        return error.cause
    text = str(error)
    for phrase in _NETWORK_FAILURES:
        if phrase.lower() in text.lower():
            return phrase.lower()
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    match = _OS_ERROR_TEXT.search(text)
    return match.group(1).strip().lower() if match else None


def error_text(error: BaseException) -> str:
    """What a warning or error quotes of a tracking failure: one short line.

    >>> error_text(RuntimeError("API request to http://h/api/get?x=1 failed with exception "
    ...     "HTTPConnectionPool(host='h', port=80): Max retries exceeded with url: /api/get?x=1 "
    ...     "(Caused by NewConnectionError(...: [Errno 111] Connection refused'))"))
    'API request to http://h/api/get failed (connection refused)'
    """
    match = _API_REQUEST.match(str(error).strip())
    if match:
        why = error_cause(error) or brief(match.group(2), 120)
        return f"API request to {match.group(1)} failed ({why})"
    return brief(error) or type(error).__name__


def _summary_cause(error: BaseException) -> str:
    """The cause a sweep's summary line quotes: the network failure, else the short text."""
    return error_cause(error) or error_text(error)


# --- settings and the store ---------------------------------------------------------------------


@dataclass(frozen=True)
class TrackingSettings:
    """The `tracking` config group as plain values (from a live config or a run's files)."""

    uri: str
    experiment: str
    run_name: str = "run"
    artifact_location: str | None = None
    required: bool = False

    @classmethod
    def of(cls, tracking: Any, uri: str | None = None) -> TrackingSettings | None:
        """From a `tracking` config (DictConfig or plain mapping); None when tracking is off."""
        if not enabled(tracking):
            return None
        artifact_location = tracking.get("artifact_location")
        return cls(
            uri=str(uri or tracking.get("uri")),
            experiment=str(tracking.get("experiment")),
            run_name=str(tracking.get("run_name") or "run"),
            artifact_location=str(artifact_location) if artifact_location else None,
            required=bool(tracking.get("required", False)),
        )


def enabled(tracking: Any) -> bool:
    return isinstance(tracking, Mapping) and tracking.get("backend", "none") == "mlflow"


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
            cause = error_cause(error) or brief(error) or type(error).__name__
            raise TrackingFailed(f"tracking server {uri} is unreachable ({cause})", cause) from None
    elif parsed.scheme == "sqlite":
        database = Path(uri.removeprefix("sqlite:///"))
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            cause = error.strerror or brief(error)
            raise TrackingFailed(
                f"tracking store {uri}: cannot create {database.parent} ({cause})", cause
            ) from None


def _client(tracking: TrackingSettings):
    _quiet_mlflow_env()
    check_reachable(tracking.uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.uri)


def _experiment_id(client: Any, tracking: TrackingSettings) -> str:
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(
        tracking.experiment, artifact_location=_artifact_location(tracking)
    )


def _artifact_location(tracking: TrackingSettings) -> str | None:
    """Artifacts of an embedded sqlite store go beside the database, not into ./mlruns."""
    if tracking.artifact_location:
        return tracking.artifact_location
    if tracking.uri.startswith("sqlite:///"):
        database = Path(tracking.uri.removeprefix("sqlite:///")).resolve()
        return (database.parent / "mlartifacts").as_uri()
    return None  # a server decides where its artifacts go


def _absolute_uri(uri: str, cwd: str | None) -> str:
    """A relative sqlite URI (sqlite:///outputs/mlflow.db) as seen from the directory `cwd`
    that a run was started in.

    >>> _absolute_uri("sqlite:///outputs/mlflow.db", "/work")
    'sqlite:////work/outputs/mlflow.db'
    >>> _absolute_uri("sqlite:////db/m.db", "/work"), _absolute_uri("http://h:5000", "/work")
    ('sqlite:////db/m.db', 'http://h:5000')
    """
    if cwd and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(cwd) / uri.removeprefix("sqlite:///"))
    return uri


def preflight(tracking: Any) -> None:
    """Opens the store (a client and one cheap query) so that a store that cannot be used is a
    short TrackingFailed before any work, e.g. `tracking store sqlite:////x/corrupt.db cannot be
    used: (sqlite3.DatabaseError) file is not a database`. Nothing to do when tracking is off."""
    settings = TrackingSettings.of(tracking)
    if settings is None:
        return
    try:
        _client(settings).get_experiment_by_name(settings.experiment)
    except TrackingFailed:
        raise
    except Exception as error:  # any store failure: network, database, permissions
        raise TrackingFailed(
            f"tracking store {settings.uri} cannot be used: {error_text(error)}",
            _summary_cause(error),
        ) from None


def _report_failure(tracking: TrackingSettings, action: str, error: Exception) -> str:
    """One warning line naming the URI, or TrackingFailed when tracking is required. Returns
    the line."""
    message = f"MLflow tracking to {tracking.uri} failed while {action}: {error_text(error)}"
    if tracking.required:
        raise TrackingFailed(message, _summary_cause(error)) from None
    log.warning("%s; results are in the run directory only", message)
    return message


def guarded(
    tracking: TrackingSettings, action: str, function: Callable[..., Any], *args: Any, **kw: Any
) -> Any:
    """Runs a tracking step; a failure is a warning, or an error when tracking.required is set."""
    try:
        return function(*args, **kw)
    except Exception as error:  # any store failure: network, database, permissions
        _report_failure(tracking, action, error)
        return None


# --- what a run logs ----------------------------------------------------------------------------


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


# Files of a run directory that its MLflow run carries.
RUN_ARTIFACTS = ("metrics.json", "predictions.csv", "resolved_config.yaml", "confusion_matrix.png")


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
    except Exception as error:  # any store failure: network, database, permissions
        _mark_pending(tracking, record, error, created.get("run_id"))
        _report_failure(tracking, "logging the run", error)
        return None
    _mark_logged(tracking, run_dir, run_id)
    return run_id


def _marker_base(tracking: TrackingSettings) -> dict[str, Any]:
    from ml_infer.outputs import current_sweep_id

    return {
        "uri": tracking.uri,
        "experiment": tracking.experiment,
        "sweep_id": current_sweep_id(),
        "cwd": os.getcwd(),
    }


def _write_marker(path: Path, payload: Mapping[str, Any]) -> None:
    """A tracking marker of a run directory; one that cannot be written costs a warning only."""
    from ml_infer.outputs import write_json

    try:
        write_json(path, payload)
    except OSError as error:
        log.warning("cannot write %s (%s)", path, error.strerror or error)


def _mark_logged(tracking: TrackingSettings, run_dir: Path, run_id: str, **extra: Any) -> None:
    from ml_infer.outputs import MLFLOW_PENDING_FILE, MLFLOW_RUN_FILE

    _write_marker(run_dir / MLFLOW_RUN_FILE, {"run_id": run_id, **_marker_base(tracking), **extra})
    with contextlib.suppress(OSError):
        (run_dir / MLFLOW_PENDING_FILE).unlink(missing_ok=True)


def _mark_pending(
    tracking: TrackingSettings, record: RunRecord, error: Exception, partial_run_id: str | None
) -> None:
    from ml_infer.outputs import MLFLOW_PENDING_FILE

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
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # the store is gone: the original failure is what to report
            pass
        raise
    log.info(
        "logged MLflow run %s to %s (experiment %r)", run_id, tracking.uri, tracking.experiment
    )
    return run_id


def _read_parent_marker(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's parent-run marker, read as data; None if missing or not a marker."""
    from ml_infer.outputs import read_json_object

    try:
        marker = read_json_object(sweep_dir / PARENT_RUN_FILE)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker.get("run_id"), str) else None


def _write_parent_marker(sweep_dir: Path, marker: Mapping[str, Any]) -> None:
    from ml_infer.outputs import write_json

    write_json(sweep_dir / PARENT_RUN_FILE, marker)


def _parent_run_id() -> str | None:
    """A sweep's jobs find the parent run in a file of the sweep directory (any launcher)."""
    from ml_infer.outputs import sweep_dir

    shared = sweep_dir()
    marker = _read_parent_marker(shared) if shared is not None else None
    return marker["run_id"] if marker else None


def _side_process() -> bool:
    """A rank other than 0 of a torchrun / accelerate launch: it neither reports nor tracks."""
    from ml_infer.config import process_rank

    return process_rank() > 0


# --- the sweep ----------------------------------------------------------------------------------

_failed_jobs: list[Path] = []


def sweep_failures() -> list[Path]:
    """Run directories of the last sweep whose job failed on bad input (empty when none did)."""
    return list(_failed_jobs)


@dataclass
class TrackingOutcome:
    """Which runs of a sweep reached MLflow: the run dirs of all tracked runs, and of those that
    missed live logging with their markers (`mlflow_pending.json`)."""

    tracked: list[Path]
    pending: dict[Path, dict[str, Any]]

    def summary(self, sweep_dir: Path) -> str | None:
        """The one line that ends a sweep with runs that are not logged (None when all are)."""
        if not self.pending:
            return None
        uris = Counter(str(marker.get("uri")) for marker in self.pending.values())
        causes = Counter(str(marker.get("cause")) for marker in self.pending.values())
        uri = uris.most_common(1)[0][0]
        cause = causes.most_common(1)[0][0]
        if len(causes) > 1:
            cause += ", and other reasons"
        return (
            f"warning: {len(self.pending)} of {len(self.tracked)} runs were not logged to {uri} "
            f"({cause}); log them later with: python -m ml_infer.report {sweep_dir} --sync"
        )


def tracking_outcome(sweep_dir: Path, sweep_id: str | None) -> TrackingOutcome:
    """The tracking markers of the runs of sweep `sweep_id` in `sweep_dir` (read as data)."""
    from ml_infer.outputs import MLFLOW_PENDING_FILE, MLFLOW_RUN_FILE, read_json_object
    from ml_infer.report import job_order

    tracked: list[Path] = []
    pending: dict[Path, dict[str, Any]] = {}
    for job_dir in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=job_order):
        for name in (MLFLOW_RUN_FILE, MLFLOW_PENDING_FILE):
            try:
                marker = read_json_object(job_dir / name)
            except (OSError, ValueError):
                continue
            if sweep_id and marker.get("sweep_id") != sweep_id:
                continue
            tracked.append(job_dir)
            if name == MLFLOW_PENDING_FILE:
                pending[job_dir] = marker
            break  # mlflow_run.json wins: a run logged by --sync may keep a stale pending file
    return TrackingOutcome(tracked, pending)


def _exit_on_signal(signal_number: int, frame: Any) -> None:
    raise SystemExit(128 + signal_number)


def _exit(error: UserError) -> None:
    """exit_with, made to exit even under HYDRA_FULL_ERROR=1: Hydra's callback runner turns an
    exception raised in a callback into a warning, and the sweep would go on."""
    try:
        exit_with(error)
    except UserError:
        import traceback

        traceback.print_exc()
        raise SystemExit(2) from None


class SweepTracking(Callback):
    """Locks the sweep directory and opens the sweep's parent MLflow run; when the sweep ends,
    writes and logs the comparison, lists the jobs that failed and the runs that were not logged,
    closes the parent run (FAILED if any job failed or missed logging), and unlocks."""

    def __init__(self) -> None:
        self._lock: Path | None = None
        self._previous_handlers: dict[int, Any] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _failed_jobs.clear()
        if _side_process():
            return  # ranks > 0 run in a scratch dir: no lock, no parent run
        from ml_infer.outputs import (
            acquire_sweep_lock,
            new_sweep_id,
            release_all_sweep_locks,
            start_sweep,
        )

        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_id = new_sweep_id()
        release_all_sweep_locks()  # left by an earlier multirun of this process that did not end
        try:
            self._lock = acquire_sweep_lock(sweep_dir, sweep_id)
        except UserError as error:
            _exit(error)
        self._exit_cleanly_on_signals()
        start_sweep(sweep_dir, sweep_id)
        tracking = TrackingSettings.of(config.get("tracking"))
        marker = sweep_dir / PARENT_RUN_FILE
        marker.unlink(missing_ok=True)  # a reused sweep dir must not nest runs under an old parent
        if tracking is None:
            return
        try:
            run_id = guarded(
                tracking,
                "creating the sweep's parent run",
                _start_parent,
                tracking,
                sweep_dir,
                list(config.hydra.overrides.task),
            )
        except TrackingFailed as error:
            self._unlock()
            _exit(error)
        if run_id:
            _write_parent_marker(
                sweep_dir,
                {
                    "run_id": run_id,
                    "uri": tracking.uri,
                    "experiment": tracking.experiment,
                    "sweep_id": sweep_id,
                    "cwd": os.getcwd(),
                },
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ml_infer.outputs import JOB_ERROR_FILE, read_job_error, sweep_id_of
        from ml_infer.report import markdown_table, write_comparison

        if _side_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_id = sweep_id_of(sweep_dir)
        summary = None
        try:
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
                summary = self._close_parent(config, sweep_dir, sweep_id)
        finally:
            self._unlock()
        if summary:
            print(summary, file=sys.stderr, flush=True)

    def _close_parent(self, config: DictConfig, sweep_dir: Path, sweep_id: str | None) -> str:
        """Closes the parent run; returns the line that ends the sweep when runs are not logged."""
        tracking = TrackingSettings.of(config.get("tracking"))
        if tracking is None:
            return ""
        outcome = tracking_outcome(sweep_dir, sweep_id)
        summary = outcome.summary(sweep_dir) or ""
        marker = _read_parent_marker(sweep_dir)
        if marker is None:
            return summary
        status = "FAILED" if _failed_jobs or outcome.pending else "FINISHED"
        marker |= {"status": status, "closed": False}
        try:
            _finish_parent(tracking, marker["run_id"], sweep_dir, status)
        except Exception as error:  # the store is (still) gone
            if not summary:  # the summary line already says what to run
                log.warning(
                    "MLflow tracking to %s failed while closing the sweep's parent run: %s; "
                    "close it later with: python -m ml_infer.report %s --sync",
                    tracking.uri,
                    error_text(error),
                    sweep_dir,
                )
        else:
            marker["closed"] = True
        _write_parent_marker(sweep_dir, marker)
        return summary

    def _exit_cleanly_on_signals(self) -> None:
        """SIGTERM / SIGHUP left at their default would end the process without cleanup; make
        them a SystemExit so that the lock is released (a handler set by someone else stays)."""
        for number in (signal.SIGTERM, signal.SIGHUP):
            try:
                if signal.getsignal(number) is signal.SIG_DFL:
                    self._previous_handlers[number] = signal.signal(number, _exit_on_signal)
            except ValueError:  # not the main thread: leave signals alone
                return

    def _unlock(self) -> None:
        from ml_infer.outputs import release_sweep_lock

        for number, handler in self._previous_handlers.items():
            try:
                signal.signal(number, handler)
            except ValueError:
                pass
        self._previous_handlers.clear()
        if self._lock is not None:
            release_sweep_lock(self._lock)
            self._lock = None


def _start_parent(tracking: TrackingSettings, sweep_dir: Path, overrides: list[str]) -> str:
    """The sweep's parent run, named after the sweep directory, tagged with its overrides."""
    client = _client(tracking)
    experiment_id = _experiment_id(client, tracking)
    joined = " ".join(overrides)
    run = client.create_run(
        experiment_id,
        run_name=f"sweep {sweep_dir.name}",
        tags={
            "sweep": "true",
            "sweep_overrides": joined[:_MAX_PARAM_LENGTH],
            "host": platform.node(),
        },
    )
    return run.info.run_id


def _finish_parent(tracking: TrackingSettings, run_id: str, sweep_dir: Path, status: str) -> None:
    client = _client(tracking)
    for name in ("comparison.md", "comparison.csv", "pareto.png"):
        if (sweep_dir / name).is_file():
            client.log_artifact(run_id, str(sweep_dir / name))
    client.set_tag(run_id, "sweep_dir", str(sweep_dir.resolve()))
    client.set_terminated(run_id, status)
    log.info("closed the sweep's MLflow parent run %s (%s)", run_id, status)


# --- logging a sweep's missing runs later (python -m ml_infer.report SWEEP_DIR --sync) -------


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
    from ml_infer.outputs import (
        acquire_sweep_lock,
        release_sweep_lock,
        sweep_id_of,
    )

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

    from ml_infer.outputs import read_json_object, read_overrides

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
        except Exception as error:  # this run's files or the store: the others still go
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


def _in_store(tracking: TrackingSettings, action: str, function: Callable[..., Any], *args: Any):
    """A step of --sync that only talks to the store: its failure is one short TrackingFailed."""
    try:
        return function(*args)
    except UserError:
        raise
    except Exception as error:  # network, database, permissions
        raise TrackingFailed(
            f"MLflow tracking to {tracking.uri} failed while {action}: {error_text(error)}",
            _summary_cause(error),
        ) from None


def _label(overrides: list[str] | None) -> str:
    from ml_infer.config import run_label

    return run_label(overrides) if overrides else ""


def _run_exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
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


# --- the report from an MLflow experiment -------------------------------------------------------


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
    except Exception as error:  # any store failure: network, database, permissions
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

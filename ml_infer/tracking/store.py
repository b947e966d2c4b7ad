"""The tracking store: its settings, reaching it, and the one short line that says why it failed.

Tracking never costs the user their results: a failing store is one warning naming its URI,
or, with `tracking.required=true`, an error raised before any work (`preflight`).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_infer.errors import UserError, brief

log = logging.getLogger(__name__)

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


PARENT_RUN_FILE = "mlflow_parent_run.json"


_MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


_HTTP_TIMEOUT_S = 3.0


class TrackingFailed(UserError):
    """The tracking store could not be reached or written. `cause` is the shortest account of
    why (e.g. "connection refused"), for summaries."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.cause = cause or message


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
    """An unreachable server should fail in seconds, not after MLflow's minutes of retries; and
    MLflow's own progress chatter ("Creating initial MLflow database tables...") stays out of
    the run's output (its warnings and errors do not)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("alembic").setLevel(logging.WARNING)


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


# MLflow 3's UI opens an experiment of this kind on its runs table, not on the GenAI (traces)
# view; MLflow 2 shows the tag as any other.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")


def _experiment_id(client: Any, tracking: TrackingSettings) -> str:
    experiment = client.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return client.create_experiment(
            tracking.experiment,
            artifact_location=_artifact_location(tracking),
            tags=dict([EXPERIMENT_KIND_TAG]),
        )
    if EXPERIMENT_KIND_TAG[0] not in experiment.tags:  # made by an earlier ml_infer: kind it
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND_TAG)
    return experiment.experiment_id


def _patiently(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call`, tried again while a sqlite store answers "database is locked": the jobs of a
    parallel launcher write one sqlite file at once, and sqlite waits only 5 s for its lock."""
    for wait_s in (0.5, 1.0, 2.0, 4.0, 8.0):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if "database is locked" not in str(error):
                raise
            log.info("the tracking store is locked by another process; trying again")
            time.sleep(wait_s)
    return call(*args, **kwargs)


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
    except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
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
    except Exception as error:  # noqa: BLE001 - any store failure: network, database, ...
        _report_failure(tracking, action, error)
        return None

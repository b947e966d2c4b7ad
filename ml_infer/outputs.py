"""The files an evaluation leaves in its run directory (a contract: tests and users read them).

Every file is written to `<name>.partial` and renamed into place, so a reader sees either no
file or a whole one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_infer.errors import UserError

# A sweep job whose input is bad leaves this file in its run directory instead of results.
JOB_ERROR_FILE = "error.txt"

# Whether a run reached MLflow: the logged run's id, or why it could not be logged (and what
# `python -m ml_infer.report SWEEP_DIR --sync` needs to log it later).
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_PENDING_FILE = "mlflow_pending.json"


@contextlib.contextmanager
def atomic_write(path: Path, newline: str | None = None) -> Iterator[Any]:
    """Opens `path.partial` for writing and renames it to `path` once the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        with partial.open("w", newline=newline) as handle:
            yield handle
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


# Everything an evaluation writes, metrics.json last: a run directory reused for a new run
# must not keep files of the old one beside the new ones.
RESULT_FILES = (
    "skipped_files.csv",
    "resolved_config.yaml",
    "predictions.csv",
    "confusion_matrix.png",
    "metrics.json",
    MLFLOW_RUN_FILE,
    MLFLOW_PENDING_FILE,
    JOB_ERROR_FILE,
)


# A sweep writes a fresh id here when it starts; each of its jobs stamps the id into its
# metrics.json and error.txt, so that a sweep directory reused by a later sweep is reported for
# the later sweep's runs only (jobs on other machines read it from the shared sweep directory).
SWEEP_ID_FILE = ".sweep_id"


def new_sweep_id() -> str:
    import uuid

    return uuid.uuid4().hex


def start_sweep(sweep_dir: Path, sweep_id: str | None = None) -> str:
    """Writes the id (a new one by default) of the sweep about to run in `sweep_dir`; returns it."""
    sweep_id = sweep_id or new_sweep_id()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_ID_FILE).write_text(f"{sweep_id}\n")
    return sweep_id


def sweep_id_of(sweep_dir: Path) -> str | None:
    """The id of the sweep that last started in `sweep_dir` (None before any did)."""
    try:
        return (sweep_dir / SWEEP_ID_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


# A running sweep holds this file in its sweep directory (JSON: pid, host, started, sweep_id), so
# that a second sweep started into the same directory is refused instead of overwriting its runs.
SWEEP_LOCK_FILE = ".sweep.lock"

# Locks this process holds: lock file -> what it wrote there. Released on any exit.
_held_locks: dict[Path, dict[str, Any]] = {}


class SweepDirInUse(UserError):
    """Another sweep (or a --sync of it) holds the sweep directory."""


def acquire_sweep_lock(sweep_dir: Path, sweep_id: str, purpose: str = "sweep") -> Path:
    """Takes `sweep_dir`'s lock for this process, or raises SweepDirInUse naming its holder.

    The lock file is created with O_CREAT | O_EXCL. A lock left by a process of this host that
    no longer runs is stale and taken over with one warning line on stderr; a lock held from
    another host cannot be checked from here and counts as held. The lock is released by
    `release_sweep_lock` and, failing that, when this process exits (atexit: a normal exit,
    sys.exit, an uncaught KeyboardInterrupt or SystemExit).
    """
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = (sweep_dir / SWEEP_LOCK_FILE).resolve()
    owner = {
        "pid": os.getpid(),
        "host": _host(),
        "started": _now(),
        "sweep_id": sweep_id,
        "purpose": purpose,
        "pid_start": _process_start_time(os.getpid()),
    }
    with _directory_guard(path.parent):
        for _ in range(5):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None:
                    raise SweepDirInUse(
                        f"sweep directory {sweep_dir} is locked by {path}, which cannot be read; "
                        "remove that file if no sweep is running there, or choose another "
                        "hydra.sweep.dir"
                    ) from None
                state = _holder_state(holder)
                if state == "running":
                    raise SweepDirInUse(_in_use_message(sweep_dir, path, holder)) from None
                if state == "dead":
                    print(
                        f"warning: taking over the lock of sweep directory {sweep_dir} from "
                        f"{_describe(holder)}, which is no longer running",
                        file=sys.stderr,
                        flush=True,
                    )
                if _read_lock(path) == holder:
                    path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(owner) + "\n")
            break
        else:
            raise SweepDirInUse(f"sweep directory {sweep_dir} is being locked by another process")
    if not _held_locks:
        import atexit

        atexit.register(release_all_sweep_locks)
    _held_locks[path] = owner
    return path


def release_sweep_lock(path: Path) -> bool:
    """Removes the lock file if this process holds it (same pid, host and sweep); True if so."""
    path = path.resolve()
    owner = _held_locks.pop(path, None)
    if owner is None:
        return False
    with _directory_guard(path.parent):
        holder = _read_lock(path)
        if holder is None or any(holder.get(k) != owner[k] for k in ("pid", "host", "sweep_id")):
            return False
        path.unlink(missing_ok=True)
    return True


def release_all_sweep_locks() -> None:
    for path in list(_held_locks):
        with contextlib.suppress(OSError):
            release_sweep_lock(path)


def _in_use_message(sweep_dir: Path, path: Path, holder: Mapping[str, Any]) -> str:
    what = (
        "another sweep"
        if holder.get("purpose", "sweep") == "sweep"
        else (f"another process ({holder.get('purpose')})")
    )
    message = f"sweep directory {sweep_dir} is in use by {what} ({_describe(holder)})"
    if holder.get("host") != _host():
        message += (
            f"; it holds the lock from another host, so whether it still runs cannot be checked "
            f"from here: wait for it to finish, remove {path} if it is gone, or choose another "
            "hydra.sweep.dir"
        )
    else:
        message += "; wait for it to finish or choose another hydra.sweep.dir"
    return message


def _describe(holder: Mapping[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"


def _read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's holder, or None when the file is unreadable or not a lock (data: json only).

    A file just created by a process that has not yet written it reads as empty: retried briefly.
    """
    import time

    for attempt in range(5):
        try:
            holder = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, ValueError):
            holder = None
        if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
            return holder
        time.sleep(0.1 * (attempt + 1))
    return None


def _holder_state(holder: Mapping[str, Any]) -> str:
    """Whether the holder still runs ("running"), is stale ("dead"), or the file vanished."""
    if not holder:
        return "gone"
    if holder.get("host") != _host():
        return "running"  # another machine's process: nothing here can tell
    pid = holder["pid"]
    if pid == os.getpid():
        # this very process: held now, or left by an earlier multirun of it that never ended
        held = any(
            owner.get("sweep_id") == holder.get("sweep_id") for owner in _held_locks.values()
        )
        return "running" if held else "dead"
    return "running" if _process_alive(pid, holder.get("pid_start")) else "dead"


def _process_alive(pid: int, started: Any) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, start_time = stat
    if state in ("Z", "X"):
        return False  # exited, waiting to be reaped
    return not (isinstance(started, int) and start_time != started)  # else: the pid was reused


def _process_start_time(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from Linux's /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _host() -> str:
    import platform

    return platform.node()


def _now() -> str:
    import datetime

    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _directory_guard(directory: Path) -> Iterator[None]:
    """Serialises lock checks and takeovers of one directory between processes of this host
    (flock on the directory; released by the kernel even if the process dies). Where flock is
    not available the O_EXCL creation alone decides."""
    try:
        import fcntl

        descriptor = os.open(directory, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _multirun_job() -> Any:
    """Hydra's runtime config of this job when it runs as part of a multirun, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get()
    return None


def sweep_dir() -> Path | None:
    """The directory that the jobs of this job's multirun share, or None outside a multirun."""
    job = _multirun_job()
    return Path(job.sweep.dir) if job is not None else None


def sweep_job_dir() -> Path | None:
    """This job's run directory when it runs as part of a multirun, else None."""
    job = _multirun_job()
    return Path(job.runtime.output_dir) if job is not None else None


def current_sweep_id() -> str | None:
    """The id of the sweep this job belongs to (None outside a sweep)."""
    shared = sweep_dir()
    return sweep_id_of(shared) if shared is not None else None


def write_job_error(job_dir: Path, error: Exception) -> None:
    """A failed sweep job's error.txt: the message, then the sweep's id."""
    sweep_id = current_sweep_id()
    (job_dir / JOB_ERROR_FILE).write_text(
        f"{error}\n" + (f"sweep {sweep_id}\n" if sweep_id else "")
    )


def read_job_error(job_dir: Path) -> tuple[str, str | None]:
    """(message, sweep id or None) of a failed job's error.txt."""
    lines = (job_dir / JOB_ERROR_FILE).read_text().splitlines()
    sweep_id = next(
        (line.split(" ", 1)[1] for line in lines[1:] if line.startswith("sweep ")), None
    )
    return (lines[0] if lines else ""), sweep_id


def read_overrides(run_dir: Path) -> list[str] | None:
    """The command-line overrides of a run (its `.hydra/overrides.yaml`, read as data: a
    `${...}` in it stays text); None when the file is missing, unreadable or not a list of
    strings."""
    import yaml

    try:
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(overrides, list) and all(isinstance(o, str) for o in overrides):
        return overrides
    return None


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ValueError naming what is wrong with it otherwise
    (OSError when it cannot be read)."""
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"{path.name} is not text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path.name} is not valid JSON ({error.msg}, line {error.lineno})"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path.name} holds a {type(payload).__name__}, not a JSON object")
    return payload


def remove_stale_results(run_dir: Path) -> None:
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)


def write_resolved_config(path: Path, cfg: Any) -> None:
    """The run's config, every interpolation resolved (.hydra/config.yaml keeps them)."""
    from omegaconf import OmegaConf

    with atomic_write(path) as handle:
        handle.write(OmegaConf.to_yaml(cfg, resolve=True))


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_write(path) as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")


def write_predictions(path: Path, result: Any, dataset: Any, classes: Sequence[str]) -> None:
    """Labelled data, one row per image: id, true and predicted class, each class's probability."""
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([dataset.id_name, "label", "pred", *(f"prob_{name}" for name in classes)])
        for position, label, pred, probs in _rows_in_data_order(result):
            writer.writerow(
                [
                    dataset.sample_ids[position],
                    classes[label],
                    classes[pred],
                    *(f"{p:.6g}" for p in probs),
                ]
            )


def write_unlabelled_predictions(
    path: Path, result: Any, dataset: Any, classes: Sequence[str]
) -> None:
    """Unlabelled data: path, predicted class, its probability, the entropy (nats), each class's
    probability."""
    import math

    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [dataset.id_name, "pred", "prob", "entropy", *(f"prob_{name}" for name in classes)]
        )
        for position, _, pred, probs in _rows_in_data_order(result):
            entropy = -sum(p * math.log(p) for p in probs if p > 0)
            writer.writerow(
                [
                    dataset.sample_ids[position],
                    classes[pred],
                    f"{probs[pred]:.6g}",
                    f"{entropy:.6g}",
                    *(f"{p:.6g}" for p in probs),
                ]
            )


def write_skipped(path: Path, skipped: Sequence[Any]) -> None:
    """The files of the data root that were not used, and why (written only when there are any)."""
    if not skipped:
        return
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([entry.path, entry.reason] for entry in skipped)


def _rows_in_data_order(result: Any) -> Iterator[tuple[int, int, int, list[float]]]:
    order = result.positions.argsort()
    positions = result.positions[order].tolist()
    labels = result.labels[order].tolist()
    preds = result.preds[order].tolist()
    probs = result.probs[order].tolist()
    yield from zip(positions, labels, preds, probs)

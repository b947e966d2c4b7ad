"""A sweep owns its directory while it runs: a lock file, taken before the first job.

A second sweep started into a locked directory is refused with one line naming the holder; a
lock left by a process of this host that no longer runs is stale and taken over with a warning;
a lock taken on another host (a shared file system) cannot be checked and counts as held.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ml_infer.errors import UserError

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
    owner = _held_locks.get(path)
    if owner is None:
        return False
    with _directory_guard(path.parent):
        holder = _read_lock(path)
        ours = holder is not None and all(
            holder.get(k) == owner[k] for k in ("pid", "host", "sweep_id")
        )
        if ours:
            path.unlink(missing_ok=True)
    # Forgotten only once it is gone: a signal before this leaves it to the atexit hook.
    _held_locks.pop(path, None)
    return ours


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

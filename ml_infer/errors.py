"""The exception types that mean "stop and tell the user", and how they are told.

Entry points print a `UserError` as a single line and exit 2; an `Interrupted` run (SIGINT,
SIGTERM) says so in one line and exits 130 / 143; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import NoReturn


class UserError(ValueError):
    """Bad input: the message names the bad value and, where there is a list, the valid ones."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop (SIGINT or SIGTERM). A KeyboardInterrupt, so that it passes
    the `except Exception` handlers of Hydra and of libraries, and cleanup code still runs."""

    def __init__(self, signal_number: int) -> None:
        self.signal_name = signal.Signals(signal_number).name
        self.exit_code = 128 + signal_number
        super().__init__(self.signal_name)


def one_of(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> UserError:
    """The standard "unknown X" error.

    >>> str(one_of("aggregation", "avg", ["max", "mean"]))
    "unknown aggregation 'avg'; valid: max, mean"
    """
    return UserError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


def brief(text: object, limit: int = 200) -> str:
    """A third-party message cut to its first line and first sentence, at most `limit` characters.

    >>> brief("PytorchStreamReader failed reading zip archive: failed finding central directory. "
    ...       "This is a bug, please report it to PyTorch.")
    'PytorchStreamReader failed reading zip archive: failed finding central directory'
    >>> brief("(sqlite3.DatabaseError) file is not a database\\n[SQL: SELECT 1]")
    '(sqlite3.DatabaseError) file is not a database'
    """
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    first = re.split(r"(?<=[a-z0-9)\]'\"])\.\s+(?=[A-Z(\[])", first, maxsplit=1)[0].rstrip(".")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def exit_with(error: UserError) -> NoReturn:
    """One line on stderr and exit code 2; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    message = " ".join(str(error).split())
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# The signal that stopped this process, once one has: a library that catches the Interrupted
# raised inside it (torch.load re-raises it as a RuntimeError) must not turn it into bad input.
_received: list[int] = []


def received_interrupt() -> Interrupted | None:
    """The Interrupted this process was stopped by, if a signal has arrived."""
    return Interrupted(_received[0]) if _received else None


def raise_if_interrupted() -> None:
    """Raises the Interrupted a signal asked for, if one arrived: the handler's own raise can be
    swallowed where Python cannot propagate it (a finaliser, `__del__`, running when the signal
    came), so long loops and the entry point check again."""
    interrupted = received_interrupt()
    if interrupted is not None:
        raise interrupted


def stop_on_signals() -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread (each time one arrives)."""

    def handler(signal_number: int, frame: FrameType | None) -> None:
        _received.append(signal_number)
        raise Interrupted(signal_number)

    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, handler)


def exit_interrupted(interrupted: Interrupted, what: str) -> NoReturn:
    """One line saying the run stopped, and the shell's exit code for the signal (130, 143)."""
    print(f"error: interrupted by {interrupted.signal_name}; {what}", file=sys.stderr, flush=True)
    sys.exit(interrupted.exit_code)


def run_as_command(main: Callable[[], object]) -> NoReturn:
    """Runs an entry point as a shell command: the process ends with its exit code.

    Once the command is done, its files closed, the exit handlers run (logging's flush among
    them) and stdout and stderr flushed, the process ends at once: Python's own teardown of the
    thousands of modules torch imports writes nothing and takes about a second (`python -c
    "import torch"` takes 1 s longer than the same ending in `os._exit(0)`). Where other threads
    or child processes still run, or the command ends in a traceback, Python ends as usual.
    """
    try:
        main()
        code = 0
    except SystemExit as stop:
        code = _exit_code(stop.code)
    multiprocessing = sys.modules.get("multiprocessing")
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or (multiprocessing is not None and multiprocessing.active_children()):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # what C and C++ code wrote into stdio's buffers
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(code)


def _exit_code(code: object) -> int:
    """What the shell sees of `sys.exit(code)`: None is 0, a message is printed and 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr, flush=True)
    return 1

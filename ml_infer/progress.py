"""Progress of a long loop, readable wherever stderr goes.

On a terminal: a tqdm bar counting images (not batches), with the forward passes done beside it.
In a log file (SLURM, nohup, CI, a pipe): no bar, but one line every `every_s` seconds with the
images done of the total, the forward passes done, the rate and the time left, e.g.

  [ml_infer] forward passes: 1,536/3,600 images (43%), 15,360 forward passes, 812 images/s, 3 s left
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """Counts `unit` done of `total`; `passes_per_unit` forward passes each (views x models)."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        *,
        unit: str = "images",
        passes_per_unit: int = 1,
        show: bool = True,
        every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.passes_per_unit, self.every_s = passes_per_unit, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = self.last_line = time.monotonic()
        self.bar: Any = None
        self.lines = show and not _is_terminal(self.stream)
        if show and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", leave=False, file=self.stream)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if self.passes_per_unit > 1:
                self.bar.set_postfix_str(f"{self.done * self.passes_per_unit:,} forward passes")
        elif self.lines and time.monotonic() - self.last_line >= self.every_s:
            self.last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        """The log line for what is done so far."""
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.done:,}/{self.total:,} {self.unit}" if self.total else f"{self.done:,}"]
        if self.total:
            parts[0] += f" ({100 * self.done / self.total:.0f}%)"
        if self.passes_per_unit > 1:
            parts.append(f"{self.done * self.passes_per_unit:,} forward passes")
        parts.append(f"{rate:,.0f} {self.unit}/s")
        if self.total and rate > 0:
            parts.append(f"{_duration((self.total - self.done) / rate)} left")
        return f"[ml_infer] {self.desc}: {', '.join(parts)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _duration(seconds: float) -> str:
    """
    >>> _duration(3.2), _duration(75), _duration(3725)
    ('3 s', '1:15', '1:02:05')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02}:{seconds:02}" if hours else f"{minutes}:{seconds:02}"

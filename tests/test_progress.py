"""Progress that survives a log file: a bar over images on a terminal, else a line every N
seconds (images done / total, forward passes, rate, time left)."""

from __future__ import annotations

import io
import json
import re

import pytest

from ml_infer.progress import Progress

from .conftest import run_cli

LINE = re.compile(
    r"\[ml_infer\] forward passes: ([\d,]+)/([\d,]+) images \((\d+)%\), ([\d,]+) forward passes, "
    r"[\d,]+ images/s, [\d:]+( s)? left"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def number(text: str) -> int:
    return int(text.replace(",", ""))


def test_a_log_gets_a_line_per_interval_with_images_passes_rate_and_time_left():
    log = io.StringIO()
    with Progress("forward passes", 3000, passes_per_unit=10, every_s=0.0, stream=log) as bar:
        bar.update(1000)
        bar.update(2000)
    lines = log.getvalue().splitlines()
    found = [LINE.fullmatch(line) for line in lines]
    assert all(found) and len(found) == 2, lines
    assert [(number(m[1]), number(m[2]), m[3], number(m[4])) for m in found if m] == [
        (1000, 3000, "33", 10_000),
        (3000, 3000, "100", 30_000),
    ]


def test_no_line_before_the_interval_and_none_when_switched_off():
    log = io.StringIO()
    with Progress("forward passes", 10, every_s=3600.0, stream=log) as bar:
        bar.update(5)
    with Progress("forward passes", 10, every_s=0.0, show=False, stream=log) as bar:
        bar.update(5)
    assert log.getvalue() == ""


def test_a_terminal_gets_a_bar_counting_images_not_batches():
    terminal = Terminal()
    with Progress("forward passes", 300, passes_per_unit=4, stream=terminal) as bar:
        for _ in range(3):
            bar.update(100)
    shown = terminal.getvalue()
    assert "[ml_infer]" not in shown  # no log lines on a terminal
    assert "300/300" in shown and "images" in shown and "1,200 forward passes" in shown


@pytest.mark.slow
def test_a_run_logging_to_a_pipe_reports_its_passes_and_timing(runs_dir, tmp_path):
    result = run_cli(
        [
            "ml_infer",
            "strategy=tta",
            f"runs_dir={runs_dir}",
            "tracking=none",
            f"hydra.run.dir={tmp_path / 'run'}",
            "engine.progress_every_s=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result.stdout.strip().splitlines()[-1] == f"  results in {tmp_path / 'run'}"
    passes = [m for line in result.stderr.splitlines() if (m := LINE.fullmatch(line))]
    assert passes, result.stderr[-2000:]
    last = passes[-1]
    assert number(last[1]) == number(last[2]) == metrics["n"]
    assert number(last[4]) == metrics["n"] * metrics["forward_passes_per_image"]
    timing = [
        line for line in result.stderr.splitlines() if "] timing (the strategy beside" in line
    ]
    assert timing and timing[-1].split(": ")[1].startswith(f"{metrics['timed_passes']}/")

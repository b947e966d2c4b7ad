"""A sweep owns its directory: `.sweep.lock` refuses a second sweep into it, a stale lock is taken
over, and the lock goes when the sweep ends, however it ends. The report reads a sweep's files as
data and skips the run directories it cannot use."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_infer.report import collect_runs
from ml_infer.sweeplock import (
    SWEEP_LOCK_FILE,
    SweepDirInUse,
    acquire_sweep_lock,
    release_sweep_lock,
)

from .conftest import REPO, run_cli

LOCK_MESSAGE = (
    r"error: sweep directory {dir} is in use by another sweep \(pid {pid} on host {host}, since "
    r"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\); wait for it to finish or choose another hydra\.sweep\.dir"
)


def sweep_args(runs_dir: Path, sweep_dir: Path, strategies: str = "standard,ensemble") -> list:
    return [
        "-m",
        "ml_infer",
        "-m",
        f"strategy={strategies}",
        "tracking=none",
        f"runs_dir={runs_dir}",
        f"hydra.sweep.dir={sweep_dir}",
        "engine.min_timing_s=0",
    ]


def popen_sweep(runs_dir: Path, sweep_dir: Path, strategies: str = "standard,ensemble"):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen(
        [sys.executable, *sweep_args(runs_dir, sweep_dir, strategies)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_lock(sweep_dir: Path, pid: int, host: str | None = None) -> Path:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = sweep_dir / SWEEP_LOCK_FILE
    holder = {
        "pid": pid,
        "host": host or platform.node(),
        "started": "2026-01-02 03:04:05",
        "sweep_id": "earlier",
    }
    lock.write_text(json.dumps(holder))
    return lock


# --- the lock, in process -----------------------------------------------------------------------


def test_the_lock_is_exclusive_and_only_its_holder_releases_it(tmp_path):
    lock = acquire_sweep_lock(tmp_path / "sweep", "first")
    holder = json.loads(lock.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == platform.node()
    assert holder["sweep_id"] == "first" and re.fullmatch(r"[\d-]+ [\d:]+", holder["started"])
    with pytest.raises(SweepDirInUse, match=f"in use by another sweep \\(pid {os.getpid()} "):
        acquire_sweep_lock(tmp_path / "sweep", "second")
    assert json.loads(lock.read_text())["sweep_id"] == "first"
    assert release_sweep_lock(lock) and not lock.exists()

    # A lock another process has taken since is not ours to remove.
    lock = acquire_sweep_lock(tmp_path / "sweep", "third")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]) as other:
        try:
            write_lock(tmp_path / "sweep", other.pid)
            assert not release_sweep_lock(lock)
            assert json.loads(lock.read_text())["pid"] == other.pid
            with pytest.raises(SweepDirInUse, match=f"pid {other.pid} on host"):
                acquire_sweep_lock(tmp_path / "sweep", "fourth")
        finally:
            other.kill()


def test_a_stale_lock_is_taken_over_with_one_warning(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    lock = acquire_sweep_lock(tmp_path, "new")
    assert json.loads(lock.read_text())["sweep_id"] == "new"
    warning = capsys.readouterr().err.strip().splitlines()
    assert warning == [
        f"warning: taking over the lock of sweep directory {tmp_path} from pid {pid} on host "
        f"{platform.node()}, since 2026-01-02 03:04:05, which is no longer running"
    ]
    assert release_sweep_lock(lock)


@pytest.mark.slow
def test_a_lock_from_another_host_or_unreadable_counts_as_held(tmp_path):
    lock = write_lock(tmp_path, dead_pid(), host="elsewhere.example")
    with pytest.raises(SweepDirInUse) as refused:
        acquire_sweep_lock(tmp_path, "new")
    assert "on host elsewhere.example" in str(refused.value)
    assert "another host" in str(refused.value) and str(lock) in str(refused.value)
    lock.write_text("not json")
    with pytest.raises(SweepDirInUse, match="cannot be read"):
        acquire_sweep_lock(tmp_path, "new")
    assert lock.read_text() == "not json"


# --- sweeps, as a user starts them ---------------------------------------------------------------


@pytest.mark.slow
def test_two_sweeps_started_at_once_into_one_directory(runs_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    first, second = popen_sweep(runs_dir, sweep_dir), popen_sweep(runs_dir, sweep_dir)
    outputs = {process.pid: process.communicate(timeout=600) for process in (first, second)}
    codes = {process.pid: process.returncode for process in (first, second)}
    assert sorted(codes.values()) == [0, 2], outputs
    winner = next(pid for pid, code in codes.items() if code == 0)
    loser = next(pid for pid, code in codes.items() if code == 2)

    refusal = outputs[loser][1].strip().splitlines()
    assert len(refusal) == 1, outputs[loser][1]
    expected = LOCK_MESSAGE.format(
        dir=re.escape(str(sweep_dir)), pid=winner, host=re.escape(platform.node())
    )
    assert re.fullmatch(expected, refusal[0]), refusal[0]

    # The directory holds the winner's sweep only, under one sweep id.
    sweep_id = (sweep_dir / ".sweep_id").read_text().strip()
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and p.name != "store")
    assert runs == ["0_standard", "1_ensemble"]
    assert {json.loads((sweep_dir / r / "metrics.json").read_text())["sweep_id"] for r in runs} == {
        sweep_id
    }
    table = (sweep_dir / "comparison.md").read_text().splitlines()
    assert len(table) == 4 and "| standard |" in table[2] and "| ensemble |" in table[3]
    assert "Traceback" not in "".join(outputs[winner] + outputs[loser])
    assert not (sweep_dir / SWEEP_LOCK_FILE).exists()


@pytest.mark.slow
def test_a_sweep_into_a_locked_directory_writes_nothing_there(runs_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / ".sweep_id").write_text("previous\n")
    for host in (None, "elsewhere.example"):
        lock = write_lock(sweep_dir, os.getpid(), host)  # this test's process: alive
        before = sorted(p.name for p in sweep_dir.iterdir())
        result = run_cli(sweep_args(runs_dir, sweep_dir, "standard")[1:])
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "is in use by another sweep (pid" in lines[0]
        assert f"(pid {os.getpid()} on host {host or platform.node()}, since 2026-01-02" in lines[0]
        if host:
            assert "another host" in lines[0] and f"remove {lock}" in lines[0]
        assert sorted(p.name for p in sweep_dir.iterdir()) == before  # no multirun.yaml, no runs
        assert (sweep_dir / ".sweep_id").read_text() == "previous\n"
        assert json.loads(lock.read_text())["pid"] == os.getpid()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over_and_the_lock_goes_when_the_sweep_ends(runs_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    pid = dead_pid()
    write_lock(sweep_dir, pid)
    result = run_cli(sweep_args(runs_dir, sweep_dir, "standard")[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if "lock" in line]
    assert warnings == [
        f"warning: taking over the lock of sweep directory {sweep_dir} from pid {pid} on host "
        f"{platform.node()}, since 2026-01-02 03:04:05, which is no longer running"
    ]
    assert (sweep_dir / "0_standard" / "metrics.json").is_file()
    assert not (sweep_dir / SWEEP_LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_sweep_stopped_by_a_signal_releases_its_lock(stop, runs_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    process = popen_sweep(runs_dir, sweep_dir, "ensemble,tta_ensemble")
    deadline = time.monotonic() + 120
    while not (sweep_dir / ".sweep_id").is_file():  # written once the lock is held
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    assert (sweep_dir / SWEEP_LOCK_FILE).is_file()
    process.send_signal(stop)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert not (sweep_dir / SWEEP_LOCK_FILE).exists(), stderr[-2000:]


# --- the report reads files as data --------------------------------------------------------------


def hand_made_metrics(strategy: str, accuracy: float, speed: float) -> dict:
    return {
        "strategy": strategy,
        "data": "digits",
        "split": "test",
        "accuracy": accuracy,
        "accuracy_ci95_low": accuracy - 0.02,
        "accuracy_ci95_high": min(1.0, accuracy + 0.01),
        "images_per_s": speed,
        "forward_passes_per_image": 1 if strategy == "standard" else 10,
        "views": 1 if strategy == "standard" else 10,
        "models": 1,
        "checkpoint_sha256": ["a"],
    }


def make_run(sweep_dir: Path, name: str, metrics: object, overrides: str | None) -> Path:
    run_dir = sweep_dir / name
    (run_dir / ".hydra").mkdir(parents=True)
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (run_dir / "metrics.json").write_text(text)
    if overrides is not None:
        (run_dir / ".hydra" / "overrides.yaml").write_text(overrides)
    return run_dir


@pytest.fixture()
def hand_made_sweep(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    make_run(
        sweep, "0_standard", hand_made_metrics("standard", 0.98, 1000.0), "- strategy=standard\n"
    )
    make_run(
        sweep,
        "1_tta",
        hand_made_metrics("tta", 0.99, 100.0),
        "- x=${oc.env:HOME}\n- strategy=tta\n",
    )
    make_run(sweep, "2_tta", hand_made_metrics("tta", 0.97, 90.0), "{unclosed: [\n")
    make_run(sweep, "3_tta", hand_made_metrics("tta", 0.96, 80.0), "a: mapping\n")
    make_run(sweep, "4_broken", '{"accuracy": 0.9,', "- strategy=tta\n")
    make_run(sweep, "5_list", "[1, 2]", None)
    make_run(sweep, "6_text", hand_made_metrics("tta", 0.9, 50.0) | {"accuracy": "high"}, None)
    (sweep / "7_binary").mkdir()
    (sweep / "7_binary" / "metrics.json").write_bytes(b"\xff\xfe\x00garbage")
    make_run(sweep, "8_unlabelled", hand_made_metrics("tta", 0.95, 70.0), None)
    return sweep


def test_the_report_reads_labels_as_data_and_skips_unreadable_runs(hand_made_sweep, capsys):
    rows = collect_runs(hand_made_sweep)
    labels = [row["run"] for row in rows]
    assert labels == ["strategy=standard", "x=${oc.env:HOME} strategy=tta", "8_unlabelled"]
    assert os.environ["HOME"] not in " ".join(labels)
    skipped = capsys.readouterr().err.strip().splitlines()
    assert skipped == [
        f"warning: skipping run {hand_made_sweep / '2_tta'}: .hydra/overrides.yaml is not a YAML "
        "list of overrides",
        f"warning: skipping run {hand_made_sweep / '3_tta'}: .hydra/overrides.yaml is not a YAML "
        "list of overrides",
        f"warning: skipping run {hand_made_sweep / '4_broken'}: metrics.json is not valid JSON "
        "(Expecting property name enclosed in double quotes, line 1)",
        f"warning: skipping run {hand_made_sweep / '5_list'}: metrics.json holds a list, not a "
        "JSON object",
        f"warning: skipping run {hand_made_sweep / '6_text'}: metrics.json has accuracy='high', "
        "not a number",
        f"warning: skipping run {hand_made_sweep / '7_binary'}: metrics.json is not text "
        "(invalid start byte)",
    ]


@pytest.mark.slow
def test_python_m_ml_infer_report_on_a_sweep_with_unreadable_runs(hand_made_sweep):
    result = run_cli(["ml_infer.report", str(hand_made_sweep)])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 6
    assert all(line.startswith("warning: skipping run ") for line in result.stderr.splitlines())
    table = (hand_made_sweep / "comparison.md").read_text()
    assert "| x=${oc.env:HOME} strategy=tta | tta |" in table
    assert os.environ["HOME"] not in table
    assert table.count("\n") == 2 + 3
    assert f"wrote {hand_made_sweep / 'comparison.md'}, comparison.csv, pareto.png" in result.stdout


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"data": ["x"]}, "has data=['x'], not a name"),
        (
            {"checkpoint_sha256": [{"a": 1}]},
            "has checkpoint_sha256=[{'a': 1}], not a list of digests",
        ),
        ({"accuracy_ci95_high": None}, "accuracy_ci95_low / accuracy_ci95_high without the other"),
        (
            {"accuracy_delta_vs_standard": 0.01},
            "has accuracy_delta_vs_standard without its interval",
        ),
        ({"accuracy_ci95_low": float("nan")}, "has accuracy_ci95_low=nan, not a number in [0, 1]"),
        ({"accuracy": None}, "has accuracy=None, not a number"),
        ({"images_per_s": "fast"}, "has images_per_s='fast', not a number"),
        ({"nll": float("inf")}, "has nll=inf, not a finite number"),
        ({"nll": -0.5}, "has nll=-0.5, not a number in [0, inf]"),
        ({"accuracy": 1.5}, "has accuracy=1.5, not a number in [0, 1]"),
        ({"views": True}, "has views=True, not a number"),
        (
            {"accuracy_ci95_low": 0.99, "accuracy_ci95_high": 0.9},
            "has accuracy_ci95_low above accuracy_ci95_high",
        ),
    ],
)
def test_metrics_of_the_wrong_shape_are_skipped_not_a_traceback(change, why, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_standard", hand_made_metrics("standard", 0.98, 1000.0), None)
    metrics = hand_made_metrics("tta", 0.99, 100.0) | change
    if change.get("accuracy_ci95_high", 0) is None:
        metrics = {k: v for k, v in metrics.items() if k != "accuracy_ci95_high"}
        metrics["accuracy_ci95_low"] = 0.9
    make_run(sweep, "1_tta", metrics, None)
    rows = collect_runs(sweep)
    assert [row["strategy"] for row in rows] == ["standard"]
    assert why in capsys.readouterr().err

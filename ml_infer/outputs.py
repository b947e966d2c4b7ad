"""The files an evaluation leaves in its run directory (a contract: tests and users read them).

Every file is written to `<name>.partial` and renamed into place, so a reader sees either no
file or a whole one.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

# A sweep job whose input is bad leaves this file in its run directory instead of results.
JOB_ERROR_FILE = "error.txt"

# Whether a run reached MLflow: the logged run's id, or why it could not be logged (and what
# `python -m ml_infer.report SWEEP_DIR --sync` needs to log it later).
MLFLOW_RUN_FILE = "mlflow_run.json"
MLFLOW_PENDING_FILE = "mlflow_pending.json"

# Every file the sweep report may write into a sweep directory (and the sweep's parent run logs).
REPORT_FILES = (
    "comparison.md",
    "comparison.csv",
    "pareto.png",
    "risk_coverage.png",
    "reliability.png",
    "per_class_delta.csv",
    "per_class_delta.png",
    "shift.csv",
    "shift_heatmap.png",
    "shift_severity.png",
)


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
    "fixed_broken.png",
    "reliability.png",
    "calibration_split.csv",
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
    """A failed sweep job's error.txt: the message (one line), then the sweep's id."""
    sweep_id = current_sweep_id()
    message = " ".join(str(error).split())
    (job_dir / JOB_ERROR_FILE).write_text(
        f"{message}\n" + (f"sweep {sweep_id}\n" if sweep_id else "")
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


def remove_stale_results(run_dir: Path) -> None:
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with atomic_write(path) as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")


def job_order(run_dir: Path) -> tuple[int, str]:
    """Sweep jobs by number (`<n>_<strategy>`), then by name."""
    prefix = run_dir.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else 1 << 30, run_dir.name)


def failed_jobs(sweep_dir: Path, sweep_id: str | None) -> list[tuple[Path, str]]:
    """(run directory, message) of each job of sweep `sweep_id` that failed on bad input, in job
    order: what decides a sweep's exit code and its list of failures."""
    failures = []
    for path in sweep_dir.glob(f"*/{JOB_ERROR_FILE}"):
        message, job_sweep = read_job_error(path.parent)
        if job_sweep == sweep_id:
            failures.append((path.parent, message))
    return sorted(failures, key=lambda failure: job_order(failure[0]))

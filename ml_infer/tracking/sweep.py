"""A sweep's parent MLflow run: opened when the sweep starts, closed when it ends.

`MLflowSweep` is a Hydra callback (registered in `conf/hydra/default.yaml`, so it works under
every launcher): the jobs find the parent run through `mlflow_parent_run.json` in the sweep
directory and nest their runs under it. When the sweep ends it uploads the comparison files the
report callback wrote, and closes the parent FINISHED, or FAILED when a job failed or a run
missed logging (the summary line then says how to log those runs later).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ml_infer.config import process_rank
from ml_infer.errors import UserError, exit_with
from ml_infer.filedata import read_json_object
from ml_infer.outputs import (
    MLFLOW_PENDING_FILE,
    MLFLOW_RUN_FILE,
    REPORT_FILES,
    failed_jobs,
    job_order,
    sweep_id_of,
)
from ml_infer.plots import pareto_front
from ml_infer.tracking.fields import mlflow_context_tags
from ml_infer.tracking.runs import _read_parent_marker, _write_parent_marker
from ml_infer.tracking.store import (
    _MAX_PARAM_LENGTH,
    PARENT_RUN_FILE,
    TrackingFailed,
    TrackingSettings,
    _absolute_uri,
    _client,
    _experiment_id,
    error_text,
    guarded,
)

log = logging.getLogger(__name__)


def _side_process() -> bool:
    """A rank other than 0 of a torchrun / accelerate launch: it neither reports nor tracks."""
    return process_rank() > 0


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


def _exit(error: UserError) -> None:
    """exit_with, made to exit even under HYDRA_FULL_ERROR=1: Hydra's callback runner turns an
    exception raised in a callback into a warning, and the sweep would go on."""
    try:
        exit_with(error)
    except UserError:
        import traceback

        traceback.print_exc()
        raise SystemExit(2) from None


class MLflowSweep(Callback):
    """Opens the sweep's parent MLflow run when the sweep starts; when it ends, uploads the
    comparison files, closes the parent (FAILED if any job failed or a run missed logging) and
    prints the one line that says how to log the missed runs later. MLflow only: the sweep
    directory's lock and id are the entry point's, the comparison is the report callback's."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        tracking = TrackingSettings.of(config.get("tracking"))
        if _side_process():
            return  # ranks > 0 run in a scratch dir: no parent run
        sweep_dir = Path(config.hydra.sweep.dir)
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
            _exit(error)
        if run_id:
            _write_parent_marker(
                sweep_dir,
                {
                    "run_id": run_id,
                    "uri": tracking.uri,
                    "experiment": tracking.experiment,
                    "sweep_id": sweep_id_of(sweep_dir),
                    "cwd": os.getcwd(),
                },
            )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if _side_process():
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        summary = self._close_parent(config, sweep_dir, sweep_id_of(sweep_dir))
        if summary:
            print(summary, file=sys.stderr, flush=True)

    @staticmethod
    def _close_parent(config: DictConfig, sweep_dir: Path, sweep_id: str | None) -> str:
        """Closes the parent run; returns the line that ends the sweep when runs are not logged."""
        tracking = TrackingSettings.of(config.get("tracking"))
        if tracking is None:
            return ""
        outcome = tracking_outcome(sweep_dir, sweep_id)
        summary = outcome.summary(sweep_dir) or ""
        marker = _read_parent_marker(sweep_dir)
        if marker is not None:
            failed = bool(failed_jobs(sweep_dir, sweep_id))
            status = "FAILED" if failed or outcome.pending else "FINISHED"
            marker |= {"status": status, "closed": False}
            try:
                _finish_parent(tracking, marker["run_id"], sweep_dir, status)
            except Exception as error:  # noqa: BLE001 - the store is (still) gone
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


def end_interrupted_parent(sweep_dir: Path) -> None:
    """A sweep stopped by a signal: its parent run ends KILLED. Quietly: the signal is what the
    user hears of, and a store that does not answer leaves the parent for `--sync` to close."""
    marker = _read_parent_marker(sweep_dir)
    if marker is None or marker.get("closed") or marker.get("sweep_id") != sweep_id_of(sweep_dir):
        return
    uri = _absolute_uri(str(marker.get("uri")), marker.get("cwd"))
    with contextlib.suppress(Exception):
        _client(TrackingSettings(uri, str(marker.get("experiment")))).set_terminated(
            marker["run_id"], "KILLED"
        )
        _write_parent_marker(sweep_dir, marker | {"status": "KILLED", "closed": True})


def _start_parent(tracking: TrackingSettings, sweep_dir: Path, overrides: list[str]) -> str:
    """The sweep's parent run, named after the sweep directory, tagged with its overrides."""
    client = _client(tracking)
    experiment_id = _experiment_id(client, tracking)
    joined = " ".join(overrides)
    run = client.create_run(
        experiment_id,
        run_name=f"sweep {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={
            **mlflow_context_tags(),
            "sweep": "true",
            "sweep_overrides": joined[:_MAX_PARAM_LENGTH],
            "host": platform.node(),
        },
    )
    return run.info.run_id


def _finish_parent(tracking: TrackingSettings, run_id: str, sweep_dir: Path, status: str) -> None:
    client = _client(tracking)
    for name in REPORT_FILES:
        if (sweep_dir / name).is_file():
            client.log_artifact(run_id, str(sweep_dir / name))
    metrics, tags = sweep_summary(sweep_dir / "comparison.csv")
    for key, value in tags.items():
        client.set_tag(run_id, key, value[:_MAX_PARAM_LENGTH])
    for key, number in metrics.items():
        client.log_metric(run_id, key, number)
    client.set_tag(run_id, "sweep_dir", str(sweep_dir.resolve()))
    client.set_terminated(run_id, status)
    log.info("closed the sweep's MLflow parent run %s (%s)", run_id, status)


def sweep_summary(comparison_csv: Path) -> tuple[dict[str, float], dict[str, str]]:
    """What the sweep's parent run shows of its runs (read from the report's comparison.csv, as
    data): the best run by accuracy and by NLL, their figures, and the Pareto front of accuracy
    against relative cost (forward passes per image where no run measured its cost)."""
    try:
        with comparison_csv.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}, {}
    scored: list[tuple[dict[str, str], float]] = [
        (row, accuracy) for row in rows if (accuracy := _number(row, "accuracy")) is not None
    ]
    if not scored:
        return {}, {}
    best_row, best_accuracy = max(scored, key=lambda pair: pair[1])
    metrics: dict[str, float] = {"best_accuracy": best_accuracy}
    tags = {"best_by_accuracy": _name(best_row), "runs_compared": str(len(scored))}
    with_nll = [(row, nll) for row, _ in scored if (nll := _number(row, "nll")) is not None]
    if with_nll:
        best_nll_row, best_nll = min(with_nll, key=lambda pair: pair[1])
        metrics["best_nll"] = best_nll
        tags["best_by_nll"] = _name(best_nll_row)
    costs = [_number(row, "relative_cost") for row, _ in scored]
    if any(cost is None for cost in costs):
        costs = [_number(row, "forward_passes_per_image") for row, _ in scored]
    if all(cost is not None for cost in costs):
        points = [(float(cost or 0), accuracy) for cost, (_, accuracy) in zip(costs, scored)]
        tags["pareto_front"] = ", ".join(_name(scored[i][0]) for i in pareto_front(points))
    return metrics, tags


def _number(row: dict[str, str], key: str) -> float | None:
    try:
        value = float(row.get(key) or "nan")
    except ValueError:
        return None
    return None if math.isnan(value) or math.isinf(value) else value


def _name(row: dict[str, str]) -> str:
    return row.get("run") or row.get("strategy") or "?"

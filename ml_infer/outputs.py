"""The files an evaluation leaves in its run directory (a contract: tests and users read them).

Every file is written to `<name>.partial` and renamed into place, so a reader sees either no
file or a whole one.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# A sweep job whose input is bad leaves this file in its run directory instead of results.
JOB_ERROR_FILE = "error.txt"


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
    JOB_ERROR_FILE,
)


# A sweep writes a fresh id here when it starts; each of its jobs stamps the id into its
# metrics.json and error.txt, so that a sweep directory reused by a later sweep is reported for
# the later sweep's runs only (jobs on other machines read it from the shared sweep directory).
SWEEP_ID_FILE = ".sweep_id"


def start_sweep(sweep_dir: Path) -> str:
    """Writes a new id for the sweep about to run in `sweep_dir`, and returns it."""
    import uuid

    sweep_id = uuid.uuid4().hex
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

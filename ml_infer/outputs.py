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

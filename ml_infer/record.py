"""The files of one evaluated run, written into its run directory (a contract: tests and users
read them): `resolved_config.yaml`, `skipped_files.csv`, `predictions.csv`,
`confusion_matrix.png`, `fixed_broken.png`, with calibration or conformal sets
`reliability.png` and `calibration_split.csv`, and `metrics.json` last, each whole or not at all.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import Tensor

from ml_infer.confusion import plot_confusion_matrix
from ml_infer.evaluate import Evaluation
from ml_infer.imagesets import SkippedFile, TensorImages
from ml_infer.outputs import atomic_write, remove_stale_results, write_json
from ml_infer.passes import DatasetPredictions
from ml_infer.plots import plot_fixed_broken
from ml_infer.posthoc import PostHoc
from ml_infer.reliability import plot_reliability


def write_resolved_config(path: Path, cfg: DictConfig) -> None:
    """The run's config, every interpolation resolved (.hydra/config.yaml keeps them)."""
    from omegaconf import OmegaConf

    with atomic_write(path) as handle:
        handle.write(OmegaConf.to_yaml(cfg, resolve=True))


UNCERTAINTY_COLUMNS = ("entropy", "mutual_information", "disagreement")


def write_predictions(
    path: Path,
    result: DatasetPredictions,
    dataset: TensorImages,
    classes: Sequence[str],
    uncertainty: Mapping[str, Tensor],
    posthoc: PostHoc | None = None,
) -> None:
    """Labelled data, one row per image: id, true and predicted class, each class's
    probability, then its uncertainty (entropy of the merged prediction in nats; mutual
    information and disagreement between views/members, 0 for a single one), then what
    calibration and conformal sets add (`posthoc_columns`)."""
    columns = [uncertainty[name].tolist() for name in UNCERTAINTY_COLUMNS]
    extra_names, extra = posthoc_columns(posthoc, classes)
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                dataset.id_name,
                "label",
                "pred",
                *(f"prob_{name}" for name in classes),
                *UNCERTAINTY_COLUMNS,
                *extra_names,
            ]
        )
        for position, label, pred, probs in _rows_in_data_order(result):
            writer.writerow(
                [
                    dataset.sample_ids[position],
                    classes[label],
                    classes[pred],
                    *(f"{p:.6g}" for p in probs),
                    *(f"{column[position]:.6g}" for column in columns),
                    *(column[position] for column in extra),
                ]
            )


def posthoc_columns(
    posthoc: PostHoc | None, classes: Sequence[str]
) -> tuple[list[str], list[list[str]]]:
    """With calibration: `pred_calibrated` and `prob_calibrated` (its calibrated probability);
    with conformal sets: `prediction_set` (class names joined by "|") and `set_size`. Columns
    are in data-set position order."""
    if posthoc is None:
        return [], []
    names: list[str] = []
    columns: list[list[str]] = []
    if posthoc.metrics.get("calibration_method", "none") != "none":
        calibrated = posthoc.calibrated
        chosen = calibrated.probs.gather(1, calibrated.preds.view(-1, 1)).squeeze(1)
        names += ["pred_calibrated", "prob_calibrated"]
        columns += [
            [classes[k] for k in calibrated.preds.tolist()],
            [f"{p:.6g}" for p in chosen.tolist()],
        ]
    if posthoc.sets is not None:
        members = posthoc.sets.tolist()
        names += ["prediction_set", "set_size"]
        columns += [
            ["|".join(name for name, inside in zip(classes, row) if inside) for row in members],
            [str(sum(row)) for row in members],
        ]
    return names, columns


def write_calibration_split(path: Path, id_name: str, ids: Sequence[object], source: str) -> None:
    """The images calibration and conformal sets were fitted on (none of them is scored)."""
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([id_name, "source"])
        writer.writerows([sample_id, source] for sample_id in ids)


def write_unlabelled_predictions(
    path: Path,
    result: DatasetPredictions,
    dataset: TensorImages,
    classes: Sequence[str],
    posthoc: PostHoc | None = None,
) -> None:
    """Unlabelled data: path, predicted class, its probability, the entropy (nats), each class's
    probability, then what calibration and conformal sets add (`posthoc_columns`)."""
    import math

    extra_names, extra = posthoc_columns(posthoc, classes)
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                dataset.id_name,
                "pred",
                "prob",
                "entropy",
                *(f"prob_{name}" for name in classes),
                *extra_names,
            ]
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
                    *(column[position] for column in extra),
                ]
            )


def write_skipped(path: Path, skipped: Sequence[SkippedFile]) -> None:
    """The files of the data root that were not used, and why (written only when there are any)."""
    if not skipped:
        return
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows([entry.path, entry.reason] for entry in skipped)


def _rows_in_data_order(
    result: DatasetPredictions,
) -> Iterator[tuple[int, int, int, list[float]]]:
    order = result.positions.argsort()
    positions = result.positions[order].tolist()
    labels = result.labels[order].tolist()
    preds = result.preds[order].tolist()
    probs = result.probs[order].tolist()
    yield from zip(positions, labels, preds, probs)


def write_run(evaluation: Evaluation, run_dir: Path) -> None:
    """Every file of the run; a run directory reused for a new run first loses the old files."""
    remove_stale_results(run_dir)
    write_resolved_config(run_dir / "resolved_config.yaml", evaluation.config)
    write_skipped(run_dir / "skipped_files.csv", evaluation.dataset.skipped)
    result, dataset, classes = evaluation.predictions, evaluation.dataset, evaluation.classes
    posthoc, metrics = evaluation.posthoc, evaluation.metrics
    if evaluation.calibration_ids is not None:
        write_calibration_split(
            run_dir / "calibration_split.csv",
            dataset.id_name,
            evaluation.calibration_ids,
            str(metrics.get("calibration_split")),
        )
    if evaluation.mode == "predict":
        write_unlabelled_predictions(run_dir / "predictions.csv", result, dataset, classes, posthoc)
    else:
        write_predictions(
            run_dir / "predictions.csv", result, dataset, classes, evaluation.uncertainty, posthoc
        )
        if "reliability" in metrics:
            eces = {"raw": metrics["ece"], "calibrated": metrics.get("ece_calibrated", math.nan)}
            plot_reliability(
                metrics["reliability"], eces, evaluation.title, run_dir / "reliability.png"
            )
        plot_confusion_matrix(
            result.labels, result.preds, classes, run_dir / "confusion_matrix.png", evaluation.title
        )
        if evaluation.baseline_preds is not None:
            plot_fixed_broken(
                _ImagesAt(dataset),
                result.labels.tolist(),
                result.preds.tolist(),
                evaluation.baseline_preds.tolist(),
                classes,
                dataset.sample_ids,
                run_dir / "fixed_broken.png",
                f"{evaluation.title}: images fixed and broken against standard",
            )
    write_json(run_dir / "metrics.json", evaluation.metrics)


class _ImagesAt:
    """`dataset.pixels(i)` as `images[i]`: the montage decodes only the images it shows (of a
    photo read as its crops, the centre one)."""

    def __init__(self, dataset: TensorImages):
        self.dataset = dataset

    def __getitem__(self, position: int) -> Any:
        image = self.dataset.pixels(position)
        return image[0] if image.dim() == 4 else image

"""The files of one evaluated run, written into its run directory (a contract: tests and users
read them): `resolved_config.yaml`, `skipped_files.csv`, `predictions.csv`,
`confusion_matrix.png`, `fixed_broken.png`, and `metrics.json` last, each whole or not at all.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig
from torch import Tensor

from ml_infer.data import TensorImages
from ml_infer.evaluate import Evaluation
from ml_infer.folders import SkippedFile
from ml_infer.outputs import atomic_write, remove_stale_results, write_json
from ml_infer.passes import DatasetPredictions
from ml_infer.plots import plot_confusion_matrix, plot_fixed_broken


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
) -> None:
    """Labelled data, one row per image: id, true and predicted class, each class's
    probability, then its uncertainty (entropy of the merged prediction in nats; mutual
    information and disagreement between views/members, 0 for a single one)."""
    columns = [uncertainty[name].tolist() for name in UNCERTAINTY_COLUMNS]
    with atomic_write(path, newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                dataset.id_name,
                "label",
                "pred",
                *(f"prob_{name}" for name in classes),
                *UNCERTAINTY_COLUMNS,
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
                ]
            )


def write_unlabelled_predictions(
    path: Path, result: DatasetPredictions, dataset: TensorImages, classes: Sequence[str]
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
    if evaluation.mode == "predict":
        write_unlabelled_predictions(run_dir / "predictions.csv", result, dataset, classes)
    else:
        write_predictions(
            run_dir / "predictions.csv", result, dataset, classes, evaluation.uncertainty
        )
        plot_confusion_matrix(
            result.labels, result.preds, classes, run_dir / "confusion_matrix.png", evaluation.title
        )
        if evaluation.baseline_preds is not None:
            plot_fixed_broken(
                dataset.pixels(),
                result.labels.tolist(),
                result.preds.tolist(),
                evaluation.baseline_preds.tolist(),
                classes,
                dataset.sample_ids,
                run_dir / "fixed_broken.png",
                f"{evaluation.title}: images fixed and broken against standard",
            )
    write_json(run_dir / "metrics.json", evaluation.metrics)

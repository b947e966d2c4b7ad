"""A run's confusion matrix as a picture (confusion_matrix.png): shares and counts, and the
per-class recall or, with many classes, the most confused pairs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_infer.plots import subplots


def plot_confusion_matrix(
    labels: Any, preds: Any, classes: Sequence[str], path: Path, title: str
) -> None:
    """confusion_matrix.png: `confusion_figure(...)`, saved."""
    figure = confusion_figure(labels, preds, classes, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def confusion_figure(labels: Any, preds: Any, classes: Sequence[str], title: str) -> Any:
    """The confusion matrix coloured by the share of each true class (so that the errors off the
    diagonal show, however large the classes), every cell labelled with its count; beside it
    each class's recall. Past 30 classes, cells are not labelled and the 20 most confused pairs
    are listed instead of the recalls."""
    import numpy as np

    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(preds)), 1)
    images = matrix.sum(axis=1)
    shares = matrix / np.maximum(images, 1)[:, None]
    size = max(4.0, 0.45 * min(n, 60) + 2)
    figure, (axes, side) = subplots(
        1, 2, figsize=(size + 4.5, size), gridspec_kw={"width_ratios": [size, 4]}
    )
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, label="share of the true class")
    axes.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true (rows coloured by share, labelled by count)")
    axes.set_title(title, fontsize=9)
    if n <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                color = "white" if shares[i, j] > 0.5 else "black"
                axes.text(j, i, str(count), ha="center", va="center", fontsize=7, color=color)
        present = images > 0
        recall = np.where(present, np.diag(matrix) / np.maximum(images, 1), 0.0)
        bars = side.barh(
            range(n), recall, color=["tab:blue" if p else "lightgray" for p in present]
        )
        side.bar_label(bars, [f"{r:.3f}" if p else "" for r, p in zip(recall, present)], fontsize=7)
        side.set_yticks(range(n), classes)
        side.invert_yaxis()
        side.set_xlim(0, 1.15)  # room for the labels of full bars
        side.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        side.set_xlabel("recall (share of the class predicted right)")
        side.set_title("per-class recall", fontsize=9)
        for i in np.flatnonzero(~present):
            side.text(0.02, i, "no images", va="center", fontsize=7, color="gray")
    else:
        off = matrix.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(off, axis=None)[::-1][:20]
        pairs = [np.unravel_index(k, off.shape) for k in order if off.flat[k] > 0]
        side.axis("off")
        side.set_title("the 20 most confused pairs", fontsize=9)
        side.text(
            0.0,
            1.0,
            "\n".join(
                [f"{'true':<14} {'predicted':<14} {'images':>6}"]
                + [f"{classes[i][:14]:<14} {classes[j][:14]:<14} {off[i, j]:>6}" for i, j in pairs]
            ),
            family="monospace",
            fontsize=8,
            va="top",
            transform=side.transAxes,
        )
    figure.tight_layout()
    return figure

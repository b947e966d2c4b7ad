"""The pictures of a sweep under shift: each strategy's accuracy change against `standard` per
corruption (a heatmap), and accuracy and ECE against severity (one line per strategy)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ml_infer.plots import subplots


def plot_shift_heatmap(summary: dict[str, Any], path: Path) -> None:
    """Strategy x corruption: accuracy change against standard in points, mean over severities."""
    strategies = [s for s in summary["strategies"] if "delta_per_corruption" in s]
    corruptions = summary["corruptions"]
    values = [
        [100 * s["delta_per_corruption"].get(c, math.nan) for c in corruptions] for s in strategies
    ]
    finite = [abs(v) for row in values for v in row if not math.isnan(v)]
    limit = max([*finite, 0.5])
    figure, axes = subplots(
        figsize=(max(7.0, 3.0 + 0.8 * len(corruptions)), max(3.5, 1.8 + 0.5 * len(strategies)))
    )
    image = axes.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            text = "n/a" if math.isnan(value) else f"{value:+.1f}"
            axes.text(j, i, text, ha="center", va="center", fontsize=7)
    axes.set_xticks(range(len(corruptions)), corruptions, rotation=40, ha="right", fontsize=8)
    axes.set_yticks(range(len(strategies)), [s["strategy"] for s in strategies], fontsize=8)
    axes.set_xlabel("corruption")
    axes.set_ylabel("strategy")
    axes.set_title("accuracy change vs standard under shift\n(points, mean over severities)")
    figure.colorbar(image, ax=axes, label="accuracy - standard's (points)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def plot_shift_severity(summary: dict[str, Any], path: Path) -> None:
    """Accuracy and ECE against severity (0: clean), mean over corruptions, per strategy."""
    figure, (accuracy_axes, ece_axes) = subplots(1, 2, figsize=(12, 5))
    severities = [0, *summary["severities"]]
    for strategy in summary["strategies"]:
        accuracy = [strategy["clean_accuracy"]] + [
            strategy["accuracy_by_severity"][s] for s in summary["severities"]
        ]
        ece = [strategy["clean_ece"]] + [
            strategy["ece_by_severity"][s] for s in summary["severities"]
        ]
        accuracy_axes.plot(severities, accuracy, marker="o", label=strategy["strategy"])
        ece_axes.plot(severities, ece, marker="o", label=strategy["strategy"])
    for axes, name in ((accuracy_axes, "accuracy"), (ece_axes, "ECE")):
        axes.set_xlabel("severity (0: clean)")
        axes.set_ylabel(f"{name}, mean over corruptions")
        axes.set_xticks(severities)
        axes.grid(alpha=0.3)
    accuracy_axes.set_title("accuracy under shift")
    ece_axes.set_title("calibration error under shift")
    ece_axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)

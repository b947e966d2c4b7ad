"""Reliability diagrams: how often a strategy is right against how sure it says it is, per
equal-width confidence bin (the bins of `metrics.reliability_bins`, kept in metrics.json).

`plot_reliability` draws one run, raw beside calibrated, with each bin's image count;
`plot_reliability_overlay` draws every run of a sweep on one pair of axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_infer.plots import palette, subplots

Bins = Mapping[str, Sequence[float]]  # count, confidence, accuracy per bin


def plot_reliability(
    bins: Mapping[str, Bins], eces: Mapping[str, float], title: str, path: Path
) -> None:
    """One panel per kind ("raw", "calibrated"): accuracy bars per confidence bin against the
    diagonal, the gap to the bin's mean confidence hatched, and the bin's image count above it."""
    kinds = [kind for kind in ("raw", "calibrated") if kind in bins]
    figure, panels = subplots(1, len(kinds), figsize=(5.2 * len(kinds), 5.0), squeeze=False)
    for axes, kind in zip(panels[0], kinds, strict=True):
        counts, confidence, accuracy = (bins[kind][k] for k in ("count", "confidence", "accuracy"))
        width = 1.0 / len(counts)
        for j, (count, conf, acc) in enumerate(zip(counts, confidence, accuracy, strict=True)):
            if not count:
                continue
            left = j * width
            axes.bar(left, acc, width=width, align="edge", color="tab:blue", edgecolor="white")
            axes.bar(
                left,
                conf - acc,
                bottom=acc,
                width=width,
                align="edge",
                fill=False,
                hatch="///",
                edgecolor="tab:red",
                linewidth=0.8,
            )
            axes.text(
                left + width / 2, max(acc, conf) + 0.01, f"{int(count)}", ha="center", fontsize=6
            )
        axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.08)
        axes.set_xlabel("confidence (probability of the predicted class)")
        axes.set_ylabel("accuracy in the bin")
        ece = eces.get(kind, math.nan)
        axes.set_title(f"{kind}: ECE {ece:.4f} (hatched: gap to confidence)", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def plot_reliability_overlay(runs: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """Every run's reliability curve (accuracy against mean confidence, one point per non-empty
    bin, sized by its count): raw in the left panel, calibrated in the right when any run was
    calibrated. `runs` maps a run's label to its metrics.json `reliability` entry."""
    kinds = ["raw"] + (["calibrated"] if any("calibrated" in r for r in runs.values()) else [])
    figure, panels = subplots(1, len(kinds), figsize=(6.5 * len(kinds), 6.0), squeeze=False)
    colours = palette("tab20")
    for axes, kind in zip(panels[0], kinds, strict=True):
        for index, (label, reliability) in enumerate(sorted(runs.items())):
            if kind not in reliability:
                continue
            bins = reliability[kind]
            points = [
                (conf, acc, count)
                for count, conf, acc in zip(
                    bins["count"], bins["confidence"], bins["accuracy"], strict=True
                )
                if count
            ]
            if not points:
                continue
            total = sum(count for _, _, count in points)
            colour = colours[index % len(colours)]
            axes.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colour,
                linewidth=1.2,
                label=label[:40],
            )
            axes.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                color=colour,
                s=[8 + 200 * p[2] / total for p in points],
                alpha=0.6,
            )
        axes.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1.02)
        axes.set_xlabel("mean confidence in the bin")
        axes.set_ylabel("accuracy in the bin (point area: share of images)")
        axes.set_title(f"{kind} probabilities: on the diagonal = calibrated")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)

"""Per-class accuracy of a sweep's runs against `standard`: which classes a strategy helps and
which it hurts (`per_class_delta.csv`, `per_class_delta.png` in the sweep directory).

Each run's per-class accuracy (recall: the share of a class's images it gets right) comes from
its predictions.csv, read as text. A run is compared with the `standard` run on the same data,
split, corruption and severity; runs without such a `standard` run, or whose predictions cannot
be read, are left out.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path
from typing import Any

from ml_infer.plots import subplots
from ml_infer.sweepdir import read_predictions

CSV_COLUMNS = ("run", "strategy", "class", "images", "accuracy_standard", "accuracy", "delta")


def class_accuracy(row: dict[str, Any]) -> dict[str, tuple[int, float]] | None:
    """Per class name: (images, share predicted right), from the run's predictions.csv."""
    records = read_predictions(row)
    if not records:
        return None
    try:
        totals = Counter(record["label"] for record in records)
        right = Counter(record["label"] for record in records if record["label"] == record["pred"])
    except KeyError:
        return None
    # the checkpoint's order, as the probability columns give it; classes without images left out
    order = [key.removeprefix("prob_") for key in records[0] if key.startswith("prob_")]
    names = [name for name in order if name in totals] + sorted(set(totals) - set(order))
    return {name: (totals[name], right[name] / totals[name]) for name in names}


def _condition(row: dict[str, Any]) -> tuple[str, ...]:
    keys = ("data", "split", "shift", "severity")
    return tuple(str(row.get(key)) for key in keys)


def per_class_deltas(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per (run, class): the run's accuracy on the class, standard's, and the change;
    runs in the order given, classes in the checkpoint's order."""
    references: dict[tuple[str, ...], dict[str, tuple[int, float]]] = {}
    for row in rows:
        if row.get("strategy") == "standard" and _condition(row) not in references:
            accuracy = class_accuracy(row)
            if accuracy is not None:
                references[_condition(row)] = accuracy
    found = []
    for row in rows:
        reference = references.get(_condition(row))
        if row.get("strategy") == "standard" or reference is None:
            continue
        accuracy = class_accuracy(row)
        if accuracy is None:
            continue
        for name, (images, baseline) in reference.items():
            if name in accuracy:
                found.append(
                    {
                        "run": str(row.get("run", row.get("run_dir"))),
                        "strategy": row.get("strategy"),
                        "class": name,
                        "images": images,
                        "accuracy_standard": baseline,
                        "accuracy": accuracy[name][1],
                        "delta": accuracy[name][1] - baseline,
                    }
                )
    return found


def write_per_class_delta(out_dir: Path, rows: list[dict[str, Any]]) -> bool:
    """per_class_delta.csv and .png in `out_dir`; False (nothing written) without a run to
    compare with `standard`."""
    deltas = per_class_deltas(rows)
    if not deltas:
        return False
    with (out_dir / "per_class_delta.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(deltas)
    figure = per_class_delta_figure(deltas)
    figure.savefig(out_dir / "per_class_delta.png", dpi=110)
    return True


def per_class_delta_figure(deltas: list[dict[str, Any]]) -> Any:
    """Runs (rows) by classes (columns), coloured by the change in accuracy against standard:
    blue where the strategy gets more of the class right, red where fewer; cells labelled in
    points (percentage points) when there are at most 30 classes."""
    import numpy as np

    runs = list(dict.fromkeys(d["run"] for d in deltas))
    classes = list(dict.fromkeys(d["class"] for d in deltas))
    grid = np.full((len(runs), len(classes)), math.nan)
    for d in deltas:
        grid[runs.index(d["run"]), classes.index(d["class"])] = 100 * d["delta"]
    limit = max(1.0, float(np.nanmax(np.abs(grid))))
    width = min(24.0, max(6.0, 0.5 * len(classes) + 4))
    figure, axes = subplots(figsize=(width, max(2.5, 0.45 * len(runs) + 1.8)))
    image = axes.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    figure.colorbar(image, ax=axes, fraction=0.046, label="accuracy change (points)")
    axes.set_yticks(range(len(runs)), [run[:40] for run in runs])
    axes.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 10 else 0)
    axes.set_xlabel("class")
    if len(classes) <= 30:
        for (i, j), value in np.ndenumerate(grid):
            if not math.isnan(value):
                label = f"{value:+.1f}" if value else "0"
                color = "white" if abs(value) > 0.6 * limit else "black"
                axes.text(j, i, label, ha="center", va="center", fontsize=7, color=color)
    axes.set_title("Per-class accuracy against standard (percentage points)")
    figure.tight_layout()
    return figure

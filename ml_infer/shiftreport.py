"""The comparison under shift: what each strategy of a sweep keeps when the images are corrupted.

From the runs of a sweep over strategies x corruptions x severities (`+experiment=shift`), per
strategy: clean accuracy, mean accuracy under shift, mCE and relative mCE against `standard`
(Hendrycks & Dietterich 2019's corruption error, normalised by `standard` instead of AlexNet),
ECE clean and under shift, and at each severity the accuracy change against `standard` on the
same corrupted images, with a 95% bootstrap interval over images (an image's corruptions are
resampled together). A strategy is the run label less its shift overrides; its `standard` is
the one on the same data, split and first checkpoint.

Every figure of a strategy is taken over the (corruption, severity) cells that it and its
`standard` both ran, so that strategies are compared on the same corrupted images; cells either
lacks are named. Runs whose corruption did not apply to the images (saturation on gray images)
are left out and named. Everything is computed from the runs' metrics.json and predictions.csv.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ml_infer.config import CLEAN_SHIFT
from ml_infer.metrics import bootstrap_mean
from ml_infer.sweepdir import correct_by_id

Cell = tuple[str, int]  # (corruption, severity)


def is_clean_run(row: dict[str, Any]) -> bool:
    """A run on clean images: no shift, or severity 0."""
    return row.get("shift", CLEAN_SHIFT) == CLEAN_SHIFT or row.get("severity") == 0


def is_shift_sweep(rows: Sequence[dict[str, Any]]) -> bool:
    return any(row.get("shift_applied") for row in rows)


def clean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if is_clean_run(row)]


def strategy_label(row: dict[str, Any]) -> str:
    """The run's label without its shift overrides: what it is besides the corruption.

    >>> strategy_label({"run": "strategy=tta shift=pixelate shift.severity=2", "strategy": "tta"})
    'strategy=tta'
    """
    kept = [
        token
        for token in str(row.get("run", "")).split()
        if not token.lstrip("+~").startswith(("shift=", "shift."))
    ]
    return " ".join(kept) or str(row.get("strategy", "?"))


@dataclass
class StrategyUnderShift:
    """One strategy's runs: clean, and per (corruption, severity)."""

    label: str
    clean: dict[str, Any] | None = None
    cells: dict[Cell, dict[str, Any]] = field(default_factory=dict)

    @property
    def any_run(self) -> dict[str, Any]:
        return self.clean or next(iter(self.cells.values()), {})

    @property
    def baseline_key(self) -> tuple[Any, ...]:
        """Compared with the standard run on the same data, split and first checkpoint."""
        run = self.any_run
        return (run.get("data"), run.get("split"), (run.get("checkpoint_sha256") or [None])[0])


def group_runs(rows: Sequence[dict[str, Any]]) -> tuple[list[StrategyUnderShift], list[str]]:
    """The runs by strategy (in sweep order), and the corruptions that applied to no image."""
    groups: dict[str, StrategyUnderShift] = {}
    not_applied = set()
    for row in rows:
        label = strategy_label(row)
        group = groups.setdefault(label, StrategyUnderShift(label))
        if is_clean_run(row):
            group.clean = group.clean or row
        elif row.get("shift_applied") and isinstance(row.get("severity"), int):
            group.cells[(str(row["shift"]), row["severity"])] = row
        else:
            not_applied.add(str(row.get("shift")))
    return list(groups.values()), sorted(not_applied)


def paired_delta(
    group: StrategyUnderShift, standard: StrategyUnderShift, cells: list[Cell]
) -> tuple[float, float, float] | None:
    """Accuracy change against `standard` over `cells` (one severity's corruptions): the mean
    per image of (correct - standard's correct) averaged over the cells, with its 95% bootstrap
    interval over images; None when a run's predictions cannot be read."""
    per_image: dict[str, list[float]] = {}
    for cell in cells:
        mine, theirs = correct_by_id(group.cells[cell]), correct_by_id(standard.cells[cell])
        if mine is None or theirs is None:
            return None
        for image, correct in mine.items():
            if image in theirs:
                per_image.setdefault(image, []).append(float(correct) - float(theirs[image]))
    if not per_image:
        return None
    differences = torch.tensor([sum(d) / len(d) for d in per_image.values()], dtype=torch.float64)
    return bootstrap_mean(differences)


def corruption_errors(
    group: StrategyUnderShift, standard: StrategyUnderShift, cells: list[Cell]
) -> dict[str, Any]:
    """mCE and relative mCE in % of `standard`'s over `cells`, each with the number of
    corruptions it averages: those where `standard`'s summed error (for relative mCE: its rise
    over clean) is above zero."""
    ratios, relative = [], []
    for corruption in sorted({c for c, _ in cells}):
        severities = [s for c, s in cells if c == corruption]
        mine = [1 - group.cells[(corruption, s)]["accuracy"] for s in severities]
        theirs = [1 - standard.cells[(corruption, s)]["accuracy"] for s in severities]
        if sum(theirs) > 0:
            ratios.append(sum(mine) / sum(theirs))
        if group.clean and standard.clean:
            rise = sum(mine) - len(mine) * (1 - group.clean["accuracy"])
            standard_rise = sum(theirs) - len(theirs) * (1 - standard.clean["accuracy"])
            if standard_rise > 0:
                relative.append(rise / standard_rise)
    return {
        "mce": _percent(ratios),
        "mce_corruptions": len(ratios),
        "relative_mce": _percent(relative),
        "relative_mce_corruptions": len(relative),
    }


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy: the figures of the comparison under shift, and the long per-cell table."""
    groups, not_applied = group_runs(rows)
    standards: dict[tuple[Any, ...], StrategyUnderShift] = {}
    for group in groups:  # per data, split and checkpoint: the standard that ran the most cells
        known = standards.get(group.baseline_key)
        if group.any_run.get("strategy") == "standard" and (
            known is None or len(group.cells) > len(known.cells)
        ):
            standards[group.baseline_key] = group
    severities = sorted({s for g in groups for _, s in g.cells})
    corruptions = sorted({c for g in groups for c, _ in g.cells})
    strategies, long_table = [], []
    for group in groups:
        standard = standards.get(group.baseline_key)
        cells = sorted(
            cell
            for cell, run in group.cells.items()
            if _finite(run.get("accuracy"))
            and (standard is None or _finite(standard.cells.get(cell, {}).get("accuracy")))
        )
        expected = set(standard.cells if standard else group.cells)
        figures: dict[str, Any] = {
            "strategy": group.label,
            "clean_accuracy": (group.clean or {}).get("accuracy", math.nan),
            "clean_ece": (group.clean or {}).get("ece", math.nan),
            "accuracy_under_shift": _mean(group.cells[c]["accuracy"] for c in cells),
            "ece_under_shift": _mean(group.cells[c].get("ece") for c in cells),
            "missing_cells": sorted(expected - set(cells)),
            "per_corruption": {
                name: _mean(group.cells[c]["accuracy"] for c in cells if c[0] == name)
                for name in corruptions
            },
            "accuracy_by_severity": {
                s: _mean(group.cells[c]["accuracy"] for c in cells if c[1] == s) for s in severities
            },
            "ece_by_severity": {
                s: _mean(group.cells[c].get("ece") for c in cells if c[1] == s) for s in severities
            },
        }
        if standard is not None:
            figures |= corruption_errors(group, standard, cells)
            figures["delta"] = {
                s: paired_delta(group, standard, [c for c in cells if c[1] == s])
                for s in severities
            }
            figures["delta_per_corruption"] = {
                name: _mean(
                    group.cells[c]["accuracy"] - standard.cells[c]["accuracy"]
                    for c in cells
                    if c[0] == name
                )
                for name in corruptions
            }
        strategies.append(figures)
        for cell in cells:
            run, base = group.cells[cell], standard.cells[cell] if standard else None
            long_table.append(
                {
                    "strategy": group.label,
                    "corruption": cell[0],
                    "severity": cell[1],
                    "accuracy": run["accuracy"],
                    "ece": run.get("ece"),
                    "nll": run.get("nll"),
                    "delta_vs_standard": run["accuracy"] - base["accuracy"] if base else None,
                    "mean_abs_change": run.get("shift_mean_abs_change"),
                }
            )
    return {
        "strategies": strategies,
        "cells": long_table,
        "severities": severities,
        "corruptions": corruptions,
        "not_applied": not_applied,
        "has_standard": bool(standards),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Iterable[Any]) -> float:
    finite = [float(v) for v in values if _finite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _percent(ratios: list[float]) -> float:
    return 100 * sum(ratios) / len(ratios) if ratios else math.nan


def _cell(value: Any, fmt: str) -> str:
    return fmt.format(value) if _finite(value) else "-"


def markdown(summary: dict[str, Any]) -> str:
    """The "Under shift" section: the summary per strategy, then accuracy per corruption."""
    severities = summary["severities"]
    header = [
        "strategy",
        "clean accuracy",
        "accuracy under shift",
        "mCE % (corruptions)",
        "relative mCE % (corruptions)",
        "ECE clean",
        "ECE under shift",
        *(f"delta vs standard, severity {s} [95% CI]" for s in severities),
    ]
    lines = [
        "## Under shift",
        "",
        f"Means over corruptions and severities {', '.join(map(str, severities))}; mCE: "
        "corruption error relative to standard's (100 = as standard); deltas: accuracy change "
        "against standard on the same corrupted images, interval from a bootstrap over images.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for figures in summary["strategies"]:
        deltas = []
        for severity in severities:
            found = figures.get("delta", {}).get(severity)
            deltas.append(f"{found[0]:+.4f} [{found[1]:+.4f}, {found[2]:+.4f}]" if found else "-")
        cells = [
            figures["strategy"],
            _cell(figures["clean_accuracy"], "{:.4f}"),
            _cell(figures["accuracy_under_shift"], "{:.4f}"),
            _with_count(figures.get("mce"), figures.get("mce_corruptions")),
            _with_count(figures.get("relative_mce"), figures.get("relative_mce_corruptions")),
            _cell(figures["clean_ece"], "{:.4f}"),
            _cell(figures["ece_under_shift"], "{:.4f}"),
            *deltas,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    corruptions = summary["corruptions"]
    lines += [
        "",
        "Accuracy per corruption (mean over severities):",
        "",
        "| strategy | " + " | ".join(corruptions) + " |",
        "|" + "---|" * (len(corruptions) + 1),
    ]
    for figures in summary["strategies"]:
        row = [_cell(figures["per_corruption"][c], "{:.4f}") for c in corruptions]
        lines.append(f"| {figures['strategy']} | " + " | ".join(row) + " |")
    notes = [
        f"{figures['strategy']} lacks {', '.join(f'{c} {s}' for c, s in figures['missing_cells'])}"
        " (failed, missing or not a number): its figures leave those cells out."
        for figures in summary["strategies"]
        if figures["missing_cells"]
    ]
    if summary["not_applied"]:
        left_out = ", ".join(summary["not_applied"])
        notes.append(f"Not applied to these images (left out): {left_out}.")
    if not summary["has_standard"]:
        notes.append("No standard run in the sweep: no mCE and no deltas.")
    return "\n".join(lines + [line for note in notes for line in ("", note)]) + "\n"


def _with_count(value: Any, count: Any) -> str:
    return f"{value:.1f} ({count})" if _finite(value) else "-"

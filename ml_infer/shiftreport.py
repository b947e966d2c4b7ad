"""The comparison under shift: what each strategy of a sweep keeps when the images are corrupted.

From the runs of a sweep over strategies x corruptions x severities (`+experiment=shift`), per
strategy: clean accuracy, mean accuracy under shift, mCE and relative mCE against `standard`
(Hendrycks & Dietterich 2019's corruption error, normalised by `standard` instead of AlexNet),
ECE clean and under shift, and at each severity the accuracy change against `standard` on the
same corrupted images, with a 95% bootstrap interval over images (an image's corruptions are
resampled together). A strategy is the run label less its shift overrides.

Runs whose corruption did not apply to the images (saturation on gray images) are left out and
named. Everything is computed from the runs' metrics.json and predictions.csv.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CLEAN = "none"
BOOTSTRAP_SAMPLES = 2000


def is_shift_sweep(rows: Sequence[dict[str, Any]]) -> bool:
    return any(row.get("shift_applied") for row in rows)


def clean_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs on clean images (no shift, or severity 0)."""
    return [row for row in rows if row.get("shift", CLEAN) == CLEAN or row.get("severity") == 0]


def strategy_label(row: dict[str, Any]) -> str:
    """The run's label without its shift overrides: what it is besides the corruption.

    >>> strategy_label({"run": "strategy=tta shift=pixelate shift.severity=2", "strategy": "tta"})
    'strategy=tta'
    """
    kept = [
        token
        for token in str(row.get("run", "")).split()
        if not token.lstrip("+").startswith(("shift=", "shift."))
    ]
    return " ".join(kept) or str(row.get("strategy", "?"))


@dataclass
class StrategyUnderShift:
    """One strategy's runs: clean, and per (corruption, severity)."""

    label: str
    clean: dict[str, Any] | None = None
    cells: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)


def group_runs(rows: Sequence[dict[str, Any]]) -> tuple[list[StrategyUnderShift], list[str]]:
    """The runs by strategy (in sweep order), and the corruptions that applied to no image."""
    groups: dict[str, StrategyUnderShift] = {}
    not_applied = set()
    for row in rows:
        group = groups.setdefault(strategy_label(row), StrategyUnderShift(strategy_label(row)))
        if row.get("shift", CLEAN) == CLEAN or row.get("severity") == 0:
            group.clean = group.clean or row
        elif row.get("shift_applied"):
            group.cells[(str(row["shift"]), int(row["severity"]))] = row
        else:
            not_applied.add(str(row.get("shift")))
    return list(groups.values()), sorted(not_applied)


def correct_by_id(row: dict[str, Any]) -> dict[str, bool] | None:
    """Per image id (index or path): whether the run predicted its label; None if unreadable."""
    path = Path(str(row.get("run_dir", ""))) / "predictions.csv"
    try:
        with path.open(newline="") as handle:
            records = list(csv.DictReader(handle))
        key = "index" if records and "index" in records[0] else "path"
        return {record[key]: record["label"] == record["pred"] for record in records}
    except (OSError, KeyError, csv.Error):
        return None


def paired_delta(
    group: StrategyUnderShift, standard: StrategyUnderShift, severity: int, seed: int = 0
) -> tuple[float, float, float] | None:
    """Accuracy change against `standard` at `severity`, over the corruptions both ran: the
    mean per image of (correct - standard's correct) averaged over corruptions, and its 95%
    percentile bootstrap interval over images."""
    corruptions = sorted(c for (c, s) in group.cells if s == severity and (c, s) in standard.cells)
    per_image: dict[str, list[float]] = {}
    for corruption in corruptions:
        mine = correct_by_id(group.cells[(corruption, severity)])
        theirs = correct_by_id(standard.cells[(corruption, severity)])
        if mine is None or theirs is None:
            return None
        for image, correct in mine.items():
            if image in theirs:
                per_image.setdefault(image, []).append(float(correct) - float(theirs[image]))
    if not per_image:
        return None
    differences = torch.tensor([sum(d) / len(d) for d in per_image.values()], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    samples = torch.randint(
        len(differences), (BOOTSTRAP_SAMPLES, len(differences)), generator=generator
    )
    means = differences[samples].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(differences.mean()), low, high


def corruption_errors(
    group: StrategyUnderShift, standard: StrategyUnderShift
) -> tuple[float, float, int]:
    """mCE and relative mCE in % of `standard`'s, and over how many corruptions (those both
    ran at the same severities, where `standard`'s error sum, or its rise from clean, is > 0)."""
    ratios, relative = [], []
    for corruption in sorted({c for c, _ in group.cells}):
        severities = sorted(s for c, s in group.cells if c == corruption)
        if not all((corruption, s) in standard.cells for s in severities):
            continue
        mine = [1 - group.cells[(corruption, s)]["accuracy"] for s in severities]
        theirs = [1 - standard.cells[(corruption, s)]["accuracy"] for s in severities]
        if sum(theirs) > 0:
            ratios.append(sum(mine) / sum(theirs))
        if group.clean and standard.clean:
            rise = sum(mine) - len(mine) * (1 - group.clean["accuracy"])
            standard_rise = sum(theirs) - len(theirs) * (1 - standard.clean["accuracy"])
            if standard_rise > 0:
                relative.append(rise / standard_rise)
    return _percent(ratios), _percent(relative), len(ratios)


def _percent(ratios: list[float]) -> float:
    return 100 * sum(ratios) / len(ratios) if ratios else math.nan


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per strategy: the figures of the comparison under shift, and the long per-cell table."""
    groups, not_applied = group_runs(rows)
    standard = next((group for group in groups if _strategy_of(group) == "standard"), None)
    severities = sorted({s for g in groups for _, s in g.cells})
    corruptions = sorted({c for g in groups for c, _ in g.cells})
    strategies = []
    cells = []
    for group in groups:
        under = list(group.cells.values())
        figures: dict[str, Any] = {
            "strategy": group.label,
            "clean_accuracy": group.clean["accuracy"] if group.clean else math.nan,
            "accuracy_under_shift": _mean(r["accuracy"] for r in under),
            "clean_ece": group.clean.get("ece", math.nan) if group.clean else math.nan,
            "ece_under_shift": _mean(r.get("ece", math.nan) for r in under),
            "per_corruption": {
                c: _mean(r["accuracy"] for (name, _), r in group.cells.items() if name == c)
                for c in corruptions
            },
        }
        figures["accuracy_by_severity"] = {
            s: _mean(r["accuracy"] for (_, sev), r in group.cells.items() if sev == s)
            for s in severities
        }
        figures["ece_by_severity"] = {
            s: _mean(r.get("ece", math.nan) for (_, sev), r in group.cells.items() if sev == s)
            for s in severities
        }
        if standard is not None:
            figures["mce"], figures["relative_mce"], figures["mce_corruptions"] = corruption_errors(
                group, standard
            )
            figures["delta"] = {s: paired_delta(group, standard, s) for s in severities}
            figures["delta_per_corruption"] = {
                c: _mean(
                    r["accuracy"] - standard.cells[(c, s)]["accuracy"]
                    for (name, s), r in group.cells.items()
                    if name == c and (c, s) in standard.cells
                )
                for c in corruptions
            }
        strategies.append(figures)
        for (corruption, severity), row in sorted(group.cells.items()):
            base = standard.cells.get((corruption, severity)) if standard else None
            cells.append(
                {
                    "strategy": group.label,
                    "corruption": corruption,
                    "severity": severity,
                    "accuracy": row["accuracy"],
                    "ece": row.get("ece"),
                    "nll": row.get("nll"),
                    "delta_vs_standard": row["accuracy"] - base["accuracy"] if base else None,
                    "mean_abs_change": row.get("shift_mean_abs_change"),
                }
            )
    return {
        "strategies": strategies,
        "cells": cells,
        "severities": severities,
        "corruptions": corruptions,
        "not_applied": not_applied,
        "has_standard": standard is not None,
    }


def _strategy_of(group: StrategyUnderShift) -> Any:
    any_run = group.clean or next(iter(group.cells.values()), {})
    return any_run.get("strategy")


def _mean(values: Any) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(finite) / len(finite) if finite else math.nan


def _cell(value: Any, fmt: str) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "-" if missing else fmt.format(value)


def markdown(summary: dict[str, Any]) -> str:
    """The "Under shift" section: the summary per strategy, then accuracy per corruption."""
    severities = summary["severities"]
    header = [
        "strategy",
        "clean accuracy",
        "accuracy under shift",
        "mCE %",
        "relative mCE %",
        "ECE clean",
        "ECE under shift",
        *(f"delta vs standard, severity {s} [95% CI]" for s in severities),
    ]
    lines = [
        "## Under shift",
        "",
        "Mean over corruptions and severities 1-5; mCE: corruption error relative to standard's "
        "(100 = as standard); deltas: accuracy change against standard on the same corrupted "
        "images, interval from a bootstrap over images.",
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
            _cell(figures.get("mce"), "{:.1f}"),
            _cell(figures.get("relative_mce"), "{:.1f}"),
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
    if summary["not_applied"]:
        left_out = ", ".join(summary["not_applied"])
        lines += ["", f"Not applied to these images (left out): {left_out}."]
    if not summary["has_standard"]:
        lines += ["", "No standard run in the sweep: no mCE and no deltas."]
    return "\n".join(lines) + "\n"

"""A sweep directory's runs read back as data: each run's metrics.json (json), its label from
`.hydra/overrides.yaml` (yaml.safe_load: a `${...}` in it stays text), and its per-image
predictions for the risk-coverage curves. A run whose files cannot be read, or do not hold what
a run writes, is skipped with one line on stderr saying why.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from typing import Any

import torch

from ml_infer.config import run_label
from ml_infer.filedata import read_json_object
from ml_infer.metrics import aurc, risk_coverage
from ml_infer.outputs import job_order, read_overrides, sweep_id_of


def read_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every scored run's metrics under `sweep_dir`, in job order, labelled by its overrides.

    Runs without an accuracy (`mode=predict`) have nothing to compare and are left out, and so
    are runs of an earlier sweep into the same directory (another sweep id than the last one).
    A run directory whose metrics.json cannot be read or is not a run's metrics is skipped
    with one line on stderr naming it and why.
    """
    sweep_id = sweep_id_of(Path(sweep_dir))
    rows = []
    paths = sorted(Path(sweep_dir).glob("*/metrics.json"), key=lambda p: job_order(p.parent))
    for metrics_path in paths:
        run_dir = metrics_path.parent
        try:
            metrics = read_json_object(metrics_path)
        except (OSError, ValueError) as error:
            skip(run_dir, str(error) if isinstance(error, ValueError) else _os_reason(error))
            continue
        if "accuracy" not in metrics or (sweep_id and metrics.get("sweep_id") != sweep_id):
            continue
        problem = metrics_shape_problem(metrics)
        if problem:
            skip(run_dir, f"metrics.json {problem}")
            continue
        label = _run_label(run_dir)
        if label is None:
            skip(run_dir, ".hydra/overrides.yaml is not a YAML list of overrides")
            continue
        metrics["run"] = label
        metrics["run_dir"] = str(run_dir)
        rows.append(metrics)
    return rows


# Fields of metrics.json that the table, the CSV and the plot compute with, and the range a
# run's value lies in (None: unbounded). Only the relative cost (a run that could not time
# `standard` beside itself has none) and the AURC (a one-image test set has no curve) may be NaN.
_NUMERIC_FIELDS: dict[str, tuple[float | None, float | None]] = {
    "accuracy": (0, 1),
    "accuracy_ci95_low": (0, 1),
    "accuracy_ci95_high": (0, 1),
    "accuracy_delta_vs_standard": (-1, 1),
    "accuracy_delta_ci95_low": (-1, 1),
    "accuracy_delta_ci95_high": (-1, 1),
    "mcnemar_p_vs_standard": (0, 1),
    "macro_f1": (0, 1),
    "nll": (0, None),
    "ece": (0, 1),
    "images_per_s": (0, None),
    "forward_passes_per_image": (0, None),
    "views": (1, None),
    "models": (1, None),
    "relative_cost": (0, None),
    "relative_cost_iqr": (0, None),
    "flips_fixed": (0, None),
    "flips_broken": (0, None),
    "forward_passes_computed": (0, None),
    "aurc": (0, 1),
    "nll_calibrated": (0, None),
    "ece_calibrated": (0, 1),
    "ece_adaptive": (0, 1),
    "mean_set_size": (0, None),
    "coverage": (0, 1),
}
_MAY_BE_NAN = ("relative_cost", "relative_cost_iqr", "aurc")
_MAY_BE_INFINITE = ("images_per_s",)  # a loop too fast for the clock
_ROUNDING = 1e-9  # figures computed in floating point may pass a bound by a rounding step


def metrics_shape_problem(metrics: dict[str, Any]) -> str | None:
    """What is wrong with a run's metrics for the comparison, or None.

    >>> metrics_shape_problem({"accuracy": 0.9, "checkpoint_sha256": ["a"]}) is None
    True
    >>> metrics_shape_problem({"accuracy": "0.9"})
    "has accuracy='0.9', not a number"
    >>> metrics_shape_problem({"accuracy": 0.9, "accuracy_ci95_low": float("nan")})
    'has accuracy_ci95_low=nan, not a number in [0, 1]'
    """
    for name, (low, high) in _NUMERIC_FIELDS.items():
        if name not in metrics:
            continue
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"has {name}={value!r:.40}, not a number"
        if math.isnan(value) and name in _MAY_BE_NAN:
            continue
        too_low = low is not None and not value >= low - _ROUNDING
        if too_low or (high is not None and not value <= high + _ROUNDING):
            return f"has {name}={value!r:.40}, not a number in [{low}, {high or 'inf'}]"
        if math.isinf(value) and name in _MAY_BE_INFINITE:
            continue
        if math.isnan(value) or math.isinf(value):
            return f"has {name}={value!r:.40}, not a finite number"
    checkpoints = metrics.get("checkpoint_sha256")
    if checkpoints is not None and not (
        isinstance(checkpoints, list) and all(isinstance(c, str) for c in checkpoints)
    ):
        return f"has checkpoint_sha256={checkpoints!r:.40}, not a list of digests"
    for name in ("strategy", "data", "split", "tta_aggregation", "ensemble_aggregation", "shift"):
        value = metrics.get(name)
        if value is not None and not isinstance(value, str):
            return f"has {name}={value!r:.40}, not a name"
    severity = metrics.get("severity")
    if severity is not None and (isinstance(severity, bool) or not isinstance(severity, int)):
        return f"has severity={severity!r:.40}, not a whole number"
    if not isinstance(metrics.get("shift_applied", False), bool):
        return f"has shift_applied={metrics['shift_applied']!r:.40}, not true or false"
    if metrics.get("shift_applied") and severity is None:
        return "has a shift applied without its severity"
    for lower, upper in (
        ("accuracy_ci95_low", "accuracy_ci95_high"),
        ("accuracy_delta_ci95_low", "accuracy_delta_ci95_high"),
    ):
        if (lower in metrics) != (upper in metrics):
            return f"has one of {lower} / {upper} without the other"
        if lower in metrics and metrics[lower] > metrics[upper]:
            return f"has {lower} above {upper}"
    if "accuracy_delta_vs_standard" in metrics and "accuracy_delta_ci95_low" not in metrics:
        return "has accuracy_delta_vs_standard without its interval"
    return None


def skip(run_dir: Path, why: str) -> None:
    print(f"warning: skipping run {run_dir}: {why}", file=sys.stderr, flush=True)


def _os_reason(error: OSError) -> str:
    name = Path(error.filename).name if error.filename else "a file"
    return f"cannot read {name} ({error.strerror or error})"


def _run_label(run_dir: Path) -> str | None:
    """The run's overrides as a label (read as data: `x=${oc.env:HOME}` stays that text), the
    directory's name when it has none, or None when its overrides.yaml cannot be read as such."""
    if not (run_dir / ".hydra" / "overrides.yaml").exists():
        return run_dir.name
    overrides = read_overrides(run_dir)
    if overrides is None:
        return None
    return run_label(overrides) or run_dir.name


def risk_curves(rows: list[dict[str, Any]]) -> dict[str, tuple[list[float], float]]:
    """Per run (by its label): the selective risk at each coverage k/N, from its
    predictions.csv (confidence: the probability of the predicted class), and its AURC. Runs
    whose predictions cannot be read are left out."""

    curves: dict[str, tuple[list[float], float]] = {}
    for row in rows:
        records = read_predictions(row)
        try:
            confidence = [float(r[f"prob_{r['pred']}"]) for r in records or []]
            correct = [r["label"] == r["pred"] for r in records or []]
        except (KeyError, ValueError):
            continue
        if records is None or len(records) < 2:
            continue
        probs = torch.tensor(confidence, dtype=torch.float64).view(-1, 1)
        risks = risk_coverage(
            probs,
            torch.zeros(len(records), dtype=torch.long),
            torch.tensor([0 if c else 1 for c in correct]),
        )
        curves[str(row.get("run", row.get("run_dir")))] = (risks.tolist(), aurc(risks))
    return curves


def read_predictions(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The rows of a run's predictions.csv (read as text), or None when it cannot be read."""
    path = Path(str(row.get("run_dir", ""))) / "predictions.csv"
    try:
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None


def correct_by_id(row: dict[str, Any]) -> dict[str, bool] | None:
    """Per image id (the first column of predictions.csv: index or path): whether the run
    predicted the image's label; None when its predictions cannot be read."""
    records = read_predictions(row)
    if not records:
        return None
    id_column = next(iter(records[0]))
    try:
        return {record[id_column]: record["label"] == record["pred"] for record in records}
    except KeyError:
        return None


def reliability_of_runs(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run (by its label): the `reliability` bins of its metrics.json, for the sweep's
    overlay; runs without them, or with bins of the wrong shape, are left out."""
    found: dict[str, dict[str, Any]] = {}
    for row in rows:
        reliability = row.get("reliability")
        if not isinstance(reliability, dict) or "raw" not in reliability:
            continue
        if all(_bins_shaped(bins) for bins in reliability.values()):
            found[str(row.get("run", row.get("run_dir")))] = reliability
    return found


def _bins_shaped(bins: Any) -> bool:
    """{count, confidence, accuracy}: lists of one length; counts finite and >= 0 (not all 0);
    a counted bin's confidence and accuracy in [0, 1].

    >>> _bins_shaped({"count": [1, 0], "confidence": [0.5, float("nan")], "accuracy": [1, 0]})
    True
    >>> _bins_shaped({"count": [1], "confidence": ["x"], "accuracy": [1]})
    False
    >>> _bins_shaped({"count": [1, -1], "confidence": [0.5, 0.5], "accuracy": [1, 1]})
    False
    """
    if not isinstance(bins, dict):
        return False
    columns = [bins.get(key) for key in ("count", "confidence", "accuracy")]
    if not all(isinstance(column, list) for column in columns):
        return False
    counts, confidence, accuracy = columns
    assert isinstance(counts, list) and isinstance(confidence, list) and isinstance(accuracy, list)
    if not len(counts) == len(confidence) == len(accuracy) or not counts:
        return False
    if not all(_finite_number(c) and c >= 0 for c in counts) or sum(counts) <= 0:
        return False
    return all(
        _finite_number(conf) and _finite_number(acc) and 0 <= conf <= 1 and 0 <= acc <= 1
        for count, conf, acc in zip(counts, confidence, accuracy, strict=True)
        if count
    )


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

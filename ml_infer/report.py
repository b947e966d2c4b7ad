"""The comparison a user reads after a sweep: one row per evaluated run.

    python -m ml_infer.report outputs/multirun/2026-11-25/12-00-00   # a sweep directory

Reads each run's `metrics.json` (and its `.hydra/overrides.yaml` for a label) and writes
`comparison.md` and `comparison.csv` beside them.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TABLE_COLUMNS = (
    ("run", "{}"),
    ("strategy", "{}"),
    ("views", "{}"),
    ("models", "{}"),
    ("aggregation", "{}"),
    ("accuracy", "{:.4f}"),
    ("macro_f1", "{:.4f}"),
    ("nll", "{:.4f}"),
    ("ece", "{:.4f}"),
    ("images_per_s", "{:.0f}"),
    ("relative_cost", "{:.2f}x"),
    ("forward_passes_per_image", "{}"),
)


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every run's metrics under `sweep_dir`, in job order, labelled by its overrides."""
    rows = []
    for metrics_path in sorted(Path(sweep_dir).glob("*/metrics.json"), key=_job_order):
        metrics = json.loads(metrics_path.read_text())
        metrics["run"] = _run_label(metrics_path.parent)
        metrics["run_dir"] = str(metrics_path.parent)
        rows.append(metrics)
    return add_derived_columns(rows)


def add_derived_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`aggregation` (views/models), and `relative_cost`: standard's images/s over this run's."""
    baseline = next((r for r in rows if r.get("strategy") == "standard"), None)
    for row in rows:
        row["aggregation"] = (
            f"{row.get('tta_aggregation', '-')}/{row.get('ensemble_aggregation', '-')}"
        )
        if baseline is not None and row.get("images_per_s"):
            row["relative_cost"] = baseline["images_per_s"] / row["images_per_s"]
        else:
            row["relative_cost"] = math.nan
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        cells = []
        for name, fmt in TABLE_COLUMNS:
            value = row.get(name)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("-" if missing else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_comparison(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Writes comparison.md and comparison.csv into `sweep_dir`; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_runs(sweep_dir)
    if not rows:
        return rows
    (sweep_dir / "comparison.md").write_text(markdown_table(rows) + "\n")
    scalar_keys = [k for k, v in rows[0].items() if not isinstance(v, (list, dict))]
    with (sweep_dir / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=scalar_keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _job_order(metrics_path: Path) -> tuple[int, str]:
    prefix = metrics_path.parent.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else 1 << 30, metrics_path.parent.name)


def _run_label(run_dir: Path) -> str:
    overrides_path = run_dir / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        from omegaconf import OmegaConf

        overrides = [o for o in OmegaConf.load(overrides_path) if not str(o).startswith("hydra")]
        if overrides:
            return " ".join(str(o) for o in overrides)
    return run_dir.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ml_infer.report", description="Compare the runs of a sweep directory."
    )
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun directory")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: not a directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    rows = write_comparison(args.sweep_dir)
    if not rows:
        print(f"error: no run under {args.sweep_dir} has a metrics.json", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

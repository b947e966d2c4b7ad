"""The comparison a user reads after a sweep: a table, a CSV and an accuracy-vs-cost plot.

    python -m ml_infer.report outputs/multirun/2026-11-25/12-00-00     # a sweep directory
    python -m ml_infer.report ml_infer-digits --out outputs/report    # an MLflow experiment
    python -m ml_infer.report outputs/multirun/2026-11-25/12-00-00 --sync   # log missed runs

From a sweep directory it reads each run's `metrics.json` (labelled by its
`.hydra/overrides.yaml`); from an MLflow experiment, each finished strategy run's metrics and
params. It writes `comparison.md`, `comparison.csv` and `pareto.png`. Files are read as data
(json, yaml.safe_load: a `${...}` in them stays text); a run directory whose files cannot be
read, or do not hold what a run writes, is skipped with one line on stderr saying why.

`--sync` logs the runs of a sweep that missed live MLflow logging (the tracking store was down)
from their run directories, under the sweep's parent run, and closes that run FAILED.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ml_infer.config import process_rank
from ml_infer.errors import UserError
from ml_infer.outputs import REPORT_FILES, failed_jobs, sweep_id_of
from ml_infer.perclass import write_per_class_delta
from ml_infer.plots import plot_pareto, plot_risk_coverage
from ml_infer.reliability import plot_reliability_overlay
from ml_infer.shiftplots import plot_shift_heatmap, plot_shift_severity
from ml_infer.shiftreport import clean_rows, is_shift_sweep, summarise
from ml_infer.shiftreport import markdown as shift_markdown
from ml_infer.store import DiskStore
from ml_infer.sweepdir import read_runs, reliability_of_runs, risk_curves, skip
from ml_infer.tracking import runs_of_experiment, sync_sweep

TABLE_COLUMNS = (
    ("run", "{}"),
    ("strategy", "{}"),
    ("views", "{}"),
    ("models", "{}"),
    ("aggregation", "{}"),
    ("accuracy", "{:.4f}"),
    ("accuracy 95% CI", "{}"),
    ("delta vs standard [95% CI]", "{}"),
    ("McNemar p", "{:.3g}"),
    ("macro_f1", "{:.4f}"),
    ("nll", "{:.4f}"),
    ("ece", "{:.4f}"),
    ("nll_calibrated", "{:.4f}"),
    ("ece_calibrated", "{:.4f}"),
    ("set_size (coverage)", "{}"),
    ("images_per_s", "{:.0f}"),
    ("fixed/broken", "{}"),
    ("aurc", "{:.4f}"),
    ("relative_cost", "{:.2f}x"),
    ("relative_cost_iqr", "{:.2f}"),
    ("forward_passes_per_image", "{:.3g}"),
)


def collect_mlflow_runs(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """The finished strategy runs (not sweep parents) of an MLflow experiment, oldest first."""
    return add_derived_columns(runs_of_experiment(experiment, tracking_uri))


def baseline_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Runs are compared with the standard run on the same data, split and first checkpoint."""
    checkpoints = row.get("checkpoint_sha256") or [None]
    return (row.get("data"), row.get("split"), checkpoints[0])


def add_derived_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`aggregation`, interval strings, fixed/broken, and `relative_cost`: as each run measured
    it in its own process (strategy and standard timed side by side), or, for runs that did not
    (older runs), the images/s of the standard run with the same data, split and first
    checkpoint over this run's (NaN when there is none)."""
    standard_speed: dict[tuple[Any, ...], float] = {}
    for row in rows:
        if row.get("strategy") == "standard" and row.get("images_per_s"):
            standard_speed.setdefault(baseline_key(row), row["images_per_s"])
    for row in rows:
        row["aggregation"] = (
            f"{row.get('tta_aggregation', '-')}/{row.get('ensemble_aggregation', '-')}"
        )
        if "accuracy_ci95_low" in row:
            row["accuracy 95% CI"] = (
                f"{row['accuracy_ci95_low']:.4f}-{row['accuracy_ci95_high']:.4f}"
            )
        if "accuracy_delta_vs_standard" in row:
            row["delta vs standard [95% CI]"] = (
                f"{row['accuracy_delta_vs_standard']:+.4f} "
                f"[{row['accuracy_delta_ci95_low']:+.4f}, {row['accuracy_delta_ci95_high']:+.4f}]"
            )
        row["McNemar p"] = row.get("mcnemar_p_vs_standard")
        if "mean_set_size" in row and "coverage" in row:
            row["set_size (coverage)"] = f"{row['mean_set_size']:.2f} ({row['coverage']:.3f})"
        if "flips_fixed" in row:
            row["fixed/broken"] = f"+{row['flips_fixed']}/-{row.get('flips_broken', 0)}"
        measured = row.get("relative_cost")
        if isinstance(measured, (int, float)) and not math.isnan(measured):
            continue
        baseline_speed = standard_speed.get(baseline_key(row))
        if baseline_speed and row.get("images_per_s"):
            row["relative_cost"] = baseline_speed / row["images_per_s"]
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


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every scored run of the sweep's last sweep under `sweep_dir`, in job order, labelled by
    its overrides, with the comparison's columns (see `sweepdir.read_runs`)."""
    return add_derived_columns(read_runs(sweep_dir))


def write_comparison(
    out_dir: str | Path, rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Writes comparison.md, comparison.csv and pareto.png (and the plots the runs have data
    for) into `out_dir`, all together or none: each is made in a staging folder first, and
    moved in once all are made. Returns the rows; `rows` default to the runs found under
    `out_dir` (a sweep directory)."""
    out_dir = Path(out_dir)
    rows = collect_runs(out_dir) if rows is None else rows
    if not rows:
        return rows
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".report-", dir=out_dir))
    try:
        _write_report(stage, rows)
        made = sorted(path.name for path in stage.iterdir())
        for name in made:
            os.replace(stage / name, out_dir / name)
        for name in set(REPORT_FILES) - set(made):  # an earlier report's
            (out_dir / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return rows


def _write_report(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    compared = clean_rows(rows) if is_shift_sweep(rows) else rows  # one row per strategy
    (out_dir / "comparison.md").write_text(comparison_text(rows))
    columns: list[str] = []
    for row in rows:
        columns += [
            k for k, v in row.items() if not isinstance(v, (list, dict)) and k not in columns
        ]
    with (out_dir / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if compared:
        plot_pareto(compared, out_dir / "pareto.png")
    curves = risk_curves(compared)
    if curves:
        plot_risk_coverage(curves, out_dir / "risk_coverage.png")
    diagrams = reliability_of_runs(compared)
    if diagrams:
        plot_reliability_overlay(diagrams, out_dir / "reliability.png")
    write_per_class_delta(out_dir, rows)
    if is_shift_sweep(rows):
        write_shift_files(out_dir, summarise(rows))


def comparison_text(rows: list[dict[str, Any]]) -> str:
    """comparison.md: the table of runs (on clean images, in a sweep under shift), then the
    comparison under shift when the sweep has one."""
    if not is_shift_sweep(rows):
        return markdown_table(rows) + "\n"
    compared = clean_rows(rows)
    table = markdown_table(compared) + "\n\n" if compared else ""
    return table + shift_markdown(summarise(rows))


def write_shift_files(out_dir: Path, summary: dict[str, Any]) -> None:
    """shift.csv (per strategy, corruption and severity), shift_heatmap.png, shift_severity.png."""
    columns = list(summary["cells"][0]) if summary["cells"] else ["strategy"]
    with (out_dir / "shift.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary["cells"])
    if summary["has_standard"]:
        plot_shift_heatmap(summary, out_dir / "shift_heatmap.png")
    plot_shift_severity(summary, out_dir / "shift_severity.png")


def sweep_cost_line(rows: Sequence[dict[str, Any]]) -> str | None:
    """What the prediction store saved the sweep: forward passes computed for predictions (per
    image, all runs) against those the runs use, and the store's size on disk."""
    computed = [
        value for row in rows if isinstance(value := row.get("forward_passes_computed"), int)
    ]
    if len(computed) != len(rows):
        return None
    used = sum(float(row.get("forward_passes_per_image", 0)) for row in rows)
    stores = {str(row["store"]) for row in rows if row.get("store") not in (None, "off")}
    size = sum(DiskStore(Path(directory)).size_bytes() for directory in stores)
    where = (
        f"; the store holds {size / 2**20:.1f} MB in {', '.join(sorted(stores))}" if stores else ""
    )
    return (
        f"forward passes computed for predictions: {sum(computed)} per image over the sweep, "
        f"for {round(used, 1):g} that its runs use{where}"
    )


class SweepReport(Callback):
    """When a sweep ends: its comparison (comparison.md, comparison.csv, pareto.png in the sweep
    directory), the table printed, and each failed job listed on stderr. Needs no tracker."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if process_rank() > 0:
            return  # ranks > 0 of torchrun ran in a scratch directory
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows = write_comparison(sweep_dir)
        except OSError as error:
            print(f"error: cannot write the sweep's report: {error}", file=sys.stderr, flush=True)
            rows = []
        if rows:
            print(f"\nComparison of {len(rows)} runs ({sweep_dir / 'comparison.md'}):\n")
            print(comparison_text(rows), flush=True)
            cost = sweep_cost_line(rows)
            if cost:
                print(f"\n{cost}", flush=True)
            print(
                f"\nwrote {sweep_dir / 'comparison.md'} and {sweep_dir / 'pareto.png'}", flush=True
            )
        for job_dir, message in failed_jobs(sweep_dir, sweep_id_of(sweep_dir)):
            print(f"error: run {job_dir.name} failed: {message}", file=sys.stderr, flush=True)


DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"


def sync(sweep_dir: Path, tracking_uri: str | None) -> int:
    """`--sync`: logs the sweep's runs that missed live logging; 0 when every run is logged."""
    if not sweep_dir.is_dir():
        print(f"error: --sync needs a sweep directory; {sweep_dir} is not one", file=sys.stderr)
        return 2
    try:
        result = sync_sweep(sweep_dir, tracking_uri)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for run_dir, why in result.skipped:
        skip(run_dir, why)
    for run_dir, why in result.failed:
        print(f"error: run {run_dir.name} could not be logged: {why}", file=sys.stderr)
    if result.uri is None:
        print(f"nothing to sync in {sweep_dir}: every run is logged to MLflow")
        return 0
    print(
        f"logged {len(result.logged)} run(s) of {sweep_dir} to {result.uri} under the sweep's "
        f"parent run {result.parent_run_id}"
        + (f" (closed {result.parent_status})" if result.parent_status else "")
    )
    return 2 if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ml_infer.report",
        description="Compare the runs of a sweep directory or of an MLflow experiment.",
    )
    parser.add_argument("source", help="a Hydra multirun directory, or an MLflow experiment name")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help=f"where the experiment lives (default: {DEFAULT_TRACKING_URI}); with --sync: the "
        "store to log into (default: the one the sweep recorded)",
    )
    parser.add_argument(
        "--sync",
        action="store_true",
        help="log the runs of the sweep directory SOURCE that missed live MLflow logging, under "
        "the sweep's parent run, and close that run FAILED (runs already logged are left alone)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the report (default: the sweep directory, or "
        "outputs/reports/<experiment>)",
    )
    args = parser.parse_args(argv)
    source = Path(args.source)
    if args.sync:
        return sync(source, args.tracking_uri)
    if source.is_dir():
        rows = collect_runs(source)
        out_dir = args.out or source
    else:
        try:
            rows = collect_mlflow_runs(args.source, args.tracking_uri or DEFAULT_TRACKING_URI)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        out_dir = args.out or Path("outputs") / "reports" / args.source
    if not rows:
        print(f"error: no evaluated run found in {args.source}", file=sys.stderr)
        return 2
    try:
        write_comparison(out_dir, rows)
    except OSError as error:
        print(
            f"error: cannot write the report in {out_dir}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 2
    print(comparison_text(rows))
    written = [name for name in REPORT_FILES if (out_dir / name).exists()]
    print(f"\nwrote {out_dir / written[0]}, {', '.join(written[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_infer.outputs import atomic_write, read_json_object, read_overrides, sweep_id_of

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
    ("images_per_s", "{:.0f}"),
    ("relative_cost", "{:.2f}x"),
    ("forward_passes_per_image", "{}"),
)


def collect_runs(sweep_dir: str | Path) -> list[dict[str, Any]]:
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
            _skip(run_dir, str(error) if isinstance(error, ValueError) else _os_reason(error))
            continue
        if "accuracy" not in metrics or (sweep_id and metrics.get("sweep_id") != sweep_id):
            continue
        problem = metrics_shape_problem(metrics)
        if problem:
            _skip(run_dir, f"metrics.json {problem}")
            continue
        metrics["run"] = _run_label(run_dir)
        metrics["run_dir"] = str(run_dir)
        rows.append(metrics)
    return add_derived_columns(rows)


# Fields of metrics.json that the table, the CSV and the plot compute with.
_NUMERIC_FIELDS = (
    "accuracy",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "accuracy_delta_vs_standard",
    "accuracy_delta_ci95_low",
    "accuracy_delta_ci95_high",
    "mcnemar_p_vs_standard",
    "macro_f1",
    "nll",
    "ece",
    "images_per_s",
    "forward_passes_per_image",
    "views",
    "models",
)


def metrics_shape_problem(metrics: dict[str, Any]) -> str | None:
    """What is wrong with a run's metrics for the comparison, or None.

    >>> metrics_shape_problem({"accuracy": 0.9, "checkpoint_sha256": ["a"]}) is None
    True
    >>> metrics_shape_problem({"accuracy": "0.9"})
    "has accuracy='0.9', not a number"
    """
    for name in _NUMERIC_FIELDS:
        value = metrics.get(name)
        if name in metrics and value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"has {name}={value!r:.40}, not a number"
    checkpoints = metrics.get("checkpoint_sha256")
    if checkpoints is not None and not isinstance(checkpoints, list):
        return f"has checkpoint_sha256={checkpoints!r:.40}, not a list"
    return None


def _skip(run_dir: Path, why: str) -> None:
    print(f"warning: skipping run {run_dir}: {why}", file=sys.stderr, flush=True)


def _os_reason(error: OSError) -> str:
    name = Path(error.filename).name if error.filename else "a file"
    return f"cannot read {name} ({error.strerror or error})"


def collect_mlflow_runs(experiment: str, tracking_uri: str) -> list[dict[str, Any]]:
    """The finished strategy runs (not sweep parents) of an MLflow experiment, oldest first."""
    from ml_infer.tracking import runs_of_experiment

    return add_derived_columns(runs_of_experiment(experiment, tracking_uri))


def baseline_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Runs are compared with the standard run on the same data, split and first checkpoint."""
    checkpoints = row.get("checkpoint_sha256") or [None]
    return (row.get("data"), row.get("split"), checkpoints[0])


def add_derived_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`aggregation`, interval strings, and `relative_cost`: the images/s of the standard run
    with the same data, split and first checkpoint over this run's (NaN when there is none)."""
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


def write_comparison(
    out_dir: str | Path, rows: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Writes comparison.md, comparison.csv and pareto.png into `out_dir`; returns the rows.

    `rows` default to the runs found under `out_dir` (a sweep directory).
    """
    out_dir = Path(out_dir)
    rows = collect_runs(out_dir) if rows is None else rows
    if not rows:
        return rows
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(out_dir / "comparison.md") as handle:
        handle.write(markdown_table(rows) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [
            k for k, v in row.items() if not isinstance(v, (list, dict)) and k not in columns
        ]
    with atomic_write(out_dir / "comparison.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    plot_pareto(rows, out_dir / "pareto.png")
    return rows


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none cheaper-or-equal and at least as accurate.

    >>> pareto_front([(1.0, 0.90), (2.0, 0.95), (3.0, 0.93), (5.0, 0.97)])
    [0, 1, 3]
    """
    front = []
    for i, (cost, accuracy) in enumerate(points):
        dominated = any(
            (c <= cost and a >= accuracy) and (c < cost or a > accuracy)
            for j, (c, a) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy (with its 95% interval) against relative cost; the Pareto front in red and joined.

    Points are numbered and listed in a key, so that runs of equal cost and accuracy stay
    readable; a second panel zooms into the accuracy band around the best run.
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    use_measured = all(not math.isnan(r.get("relative_cost", math.nan)) for r in rows)
    costs = [r["relative_cost"] if use_measured else r["forward_passes_per_image"] for r in rows]
    accuracies = [r["accuracy"] for r in rows]
    lows = [r.get("accuracy_ci95_low", r["accuracy"]) for r in rows]
    highs = [r.get("accuracy_ci95_high", r["accuracy"]) for r in rows]
    front = pareto_front(list(zip(costs, accuracies)))
    best = max(accuracies)
    band = max(0.02, 2 * (highs[accuracies.index(best)] - lows[accuracies.index(best)]))
    zoomed = [i for i, a in enumerate(accuracies) if a >= best - band]

    figure, (full, zoom, key) = plt.subplots(
        1, 3, figsize=(15, 6), gridspec_kw={"width_ratios": [5, 5, 3]}
    )
    for axes, shown in ((full, range(len(rows))), (zoom, zoomed)):
        for i in shown:
            on_front = i in front
            axes.errorbar(
                costs[i],
                accuracies[i],
                yerr=[[accuracies[i] - lows[i]], [highs[i] - accuracies[i]]],
                fmt="o",
                color="tab:red" if on_front else "tab:gray",
                alpha=1.0 if on_front else 0.6,
                capsize=3,
                markersize=7 if on_front else 5,
            )
            axes.annotate(
                str(i + 1),
                (costs[i], accuracies[i]),
                textcoords="offset points",
                xytext=(5, 3),
                fontsize=8,
                fontweight="bold" if on_front else "normal",
            )
        axes.plot(
            [costs[i] for i in front],
            [accuracies[i] for i in front],
            "-",
            color="tab:red",
            alpha=0.7,
            label="Pareto front",
        )
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
        axes.set_xlabel(
            "relative cost (standard's images/s / the run's)"
            if use_measured
            else "forward passes per image"
        )
    full.set_ylabel("accuracy (bars: 95% Wilson interval)")
    full.set_title("all runs")
    full.legend(loc="lower right")
    zoom.set_ylim(best - band - 0.002, min(1.0, max(highs[i] for i in zoomed)) + 0.002)
    zoom.set_title(f"zoom: accuracy within {band:.3f} of the best")
    key.axis("off")
    key.text(
        0.0,
        1.0,
        "\n".join(
            f"{'*' if i in front else ' '}{i + 1:>2}  {str(r.get('run', r['strategy']))[:34]}"
            for i, r in enumerate(rows)
        )
        + "\n\n* on the Pareto front: no run is\n  both cheaper and more accurate",
        family="monospace",
        fontsize=8,
        va="top",
        transform=key.transAxes,
    )
    data = {f"{r.get('data', '?')}/{r.get('split', '?')}" for r in rows}
    figure.suptitle(f"Accuracy vs cost on {', '.join(sorted(data))} ({len(rows)} runs)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_confusion_matrix(
    labels: Any, preds: Any, classes: Sequence[str], path: Path, title: str
) -> None:
    """Counts of (true, predicted) classes as a heat map, each cell labelled."""
    import numpy as np

    plt = _pyplot()
    n = len(classes)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (np.asarray(labels), np.asarray(preds)), 1)
    size = max(4.0, 0.45 * n + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, fraction=0.046)
    axes.set_xticks(range(n), classes, rotation=90 if n > 10 else 0)
    axes.set_yticks(range(n), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize=9)
    if n <= 30:
        threshold = matrix.max() / 2
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                axes.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if count > threshold else "black",
                )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def job_order(run_dir: Path) -> tuple[int, str]:
    """Sweep jobs by number (`<n>_<strategy>`), then by name."""
    prefix = run_dir.name.split("_", 1)[0]
    return (int(prefix) if prefix.isdigit() else 1 << 30, run_dir.name)


def _run_label(run_dir: Path) -> str:
    """The run's overrides as a label (read as data: `x=${oc.env:HOME}` stays that text), or
    the directory's name when it has none or they cannot be read."""
    from ml_infer.config import run_label

    overrides = read_overrides(run_dir)
    return (run_label(overrides) if overrides else "") or run_dir.name


DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"


def sync(sweep_dir: Path, tracking_uri: str | None) -> int:
    """`--sync`: logs the sweep's runs that missed live logging; 0 when every run is logged."""
    from ml_infer.errors import UserError

    if not sweep_dir.is_dir():
        print(f"error: --sync needs a sweep directory; {sweep_dir} is not one", file=sys.stderr)
        return 2
    from ml_infer.tracking import sync_sweep

    try:
        result = sync_sweep(sweep_dir, tracking_uri)
    except UserError as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for run_dir, why in result.skipped:
        _skip(run_dir, why)
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
        from ml_infer.errors import UserError

        try:
            rows = collect_mlflow_runs(args.source, args.tracking_uri or DEFAULT_TRACKING_URI)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        out_dir = args.out or Path("outputs") / "reports" / args.source
    if not rows:
        print(f"error: no evaluated run found in {args.source}", file=sys.stderr)
        return 2
    write_comparison(out_dir, rows)
    print(markdown_table(rows))
    print(f"\nwrote {out_dir / 'comparison.md'}, comparison.csv and pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The pictures: accuracy against cost with its Pareto front, and a run's confusion matrix.

matplotlib is imported where a picture is drawn (it takes a second), with the Agg backend.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any


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
    """pareto.png: `pareto_figure(rows)`, saved."""
    figure = pareto_figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def job_number(row: dict[str, Any], position: int) -> int:
    """The run's number as its run directory has it (`3_tta` -> 3); else its position.

    >>> job_number({"run_dir": "/s/12_tta"}, 0), job_number({}, 4)
    (12, 4)
    """
    found = re.match(r"(\d+)_", Path(str(row.get("run_dir", ""))).name)
    return int(found.group(1)) if found else position


def _label_lifts(costs: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """For each point, how many earlier points lie so close (within 0.35 decades of cost, about
    a label's width on the log axis, and 4% of the accuracy range) that its label must go one
    line lower for each.

    >>> _label_lifts([1.0, 0.72, 10.0, 1.1, 1.0], [0.9, 0.9, 0.9, 0.901, 0.5])
    [0, 1, 0, 2, 0]
    """
    spread = (max(accuracies) - min(accuracies)) or 1.0
    lifts: list[int] = []
    for i, (cost, accuracy) in enumerate(zip(costs, accuracies)):
        lifts.append(
            sum(
                abs(math.log10(cost / costs[j])) < 0.35
                and abs(accuracy - accuracies[j]) < 0.04 * spread
                for j in range(i)
            )
            if cost > 0
            else 0
        )
    return lifts


def pareto_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """Accuracy (with its 95% interval) against relative cost (with its interquartile range, where
    the runs measured one); the Pareto front in red and joined.

    Each point is labelled with its run's number (as its run directory is numbered) and name, and
    listed in a key, so that runs of equal cost and accuracy stay readable; a second panel zooms
    into the accuracy band around the best run when some runs lie outside it.
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    use_measured = all(not math.isnan(r.get("relative_cost", math.nan)) for r in rows)
    costs = [r["relative_cost"] if use_measured else r["forward_passes_per_image"] for r in rows]
    spreads = [r.get("relative_cost_iqr", math.nan) if use_measured else math.nan for r in rows]
    accuracies = [r["accuracy"] for r in rows]
    lows = [r.get("accuracy_ci95_low", r["accuracy"]) for r in rows]
    highs = [r.get("accuracy_ci95_high", r["accuracy"]) for r in rows]
    numbers = [job_number(dict(r), i) for i, r in enumerate(rows)]
    names = [str(r.get("run", r.get("strategy", "?"))) for r in rows]
    front = pareto_front(list(zip(costs, accuracies)))
    best = max(accuracies)
    band = max(0.02, 2 * (highs[accuracies.index(best)] - lows[accuracies.index(best)]))
    zoomed = [i for i, a in enumerate(accuracies) if a >= best - band]
    panels: list[Sequence[int]] = [range(len(rows))]
    if len(zoomed) < len(rows):
        panels.append(zoomed)

    figure, axes_row = subplots(
        1,
        len(panels) + 1,
        figsize=(5 * len(panels) + 4, 6),
        gridspec_kw={"width_ratios": [5] * len(panels) + [3]},
    )
    plotted, key = axes_row[:-1], axes_row[-1]
    for axes, shown in zip(plotted, panels):
        lifts = _label_lifts([costs[i] for i in shown], [accuracies[i] for i in shown])
        for lift, i in zip(lifts, shown):
            on_front = i in front
            half_spread = spreads[i] / 2 if math.isfinite(spreads[i]) else 0.0
            axes.errorbar(
                costs[i],
                accuracies[i],
                xerr=[[min(half_spread, costs[i] * 0.99)], [half_spread]] if half_spread else None,
                yerr=[[accuracies[i] - lows[i]], [highs[i] - accuracies[i]]],
                fmt="o",
                color="tab:red" if on_front else "tab:gray",
                alpha=1.0 if on_front else 0.6,
                capsize=3,
                markersize=7 if on_front else 5,
            )
            label = axes.annotate(
                f"{numbers[i]} {names[i].removeprefix('strategy=')[:22]}",
                (costs[i], accuracies[i]),
                textcoords="offset points",
                xytext=(5, 3 - 9 * lift),
                fontsize=8,
                fontweight="bold" if on_front else "normal",
            )
            label.set_in_layout(False)  # labels may run past the axes; the margin makes room
        axes.margins(x=0.25)
        axes.plot(
            [costs[i] for i in front],
            [accuracies[i] for i in front],
            "-",
            color="tab:red",
            alpha=0.7,
            label="Pareto front",
        )
        cascades = sorted(
            (i for i in shown if rows[i].get("strategy") == "cascade"), key=lambda i: costs[i]
        )
        if len(cascades) > 1:  # a sweep over thresholds: the cascade's accuracy-vs-cost curve
            axes.plot(
                [costs[i] for i in cascades],
                [accuracies[i] for i in cascades],
                "--",
                color="tab:blue",
                alpha=0.7,
                label="cascade runs",
            )
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.grid(True, which="both", alpha=0.3)
        axes.set_xlabel(
            "relative cost (standard's images/s / the run's; bars: IQR)"
            if use_measured
            else "forward passes per image"
        )
    plotted[0].set_ylabel("accuracy (bars: 95% Wilson interval)")
    plotted[0].set_title("all runs")
    plotted[0].legend(loc="lower right")
    if len(plotted) > 1:
        plotted[1].set_ylim(best - band - 0.002, min(1.0, max(highs[i] for i in zoomed)) + 0.002)
        plotted[1].set_title(f"zoom: accuracy within {band:.3f} of the best")
    key.axis("off")
    key.text(
        0.0,
        1.0,
        "\n".join(
            f"{'*' if i in front else ' '}{numbers[i]:>3}  {names[i][:40]}"
            for i in range(len(rows))
        )
        + "\n\n* on the Pareto front: no run is\n  both cheaper and more accurate",
        family="monospace",
        fontsize=8,
        va="top",
        transform=key.transAxes,
    )
    data = sorted({f"{r.get('data', '?')}/{r.get('split', '?')}" for r in rows})
    how = sorted(
        {f"{r['precision']} on {r['device']}" for r in rows if "device" in r and "precision" in r}
    )
    title = f"Accuracy vs cost on {', '.join(data)} ({len(rows)} runs"
    figure.suptitle(title + (f"; {', '.join(how)})" if how else ")"))
    figure.tight_layout()
    return figure


def subplots(*grid: int, figsize: tuple[float, float], **kwargs: Any) -> tuple[Any, Any]:
    """A figure and its axes as `pyplot.subplots` gives them, from matplotlib's object API:
    without pyplot there is nothing global to close, and one import less on a run's path."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots(*grid, **kwargs)


def palette(name: str) -> tuple[Any, ...]:
    """The colours of one of matplotlib's qualitative colour maps ("tab20")."""
    import matplotlib

    return tuple(matplotlib.colormaps[name].colors)  # type: ignore[attr-defined]  # a ListedColormap


def plot_fixed_broken(
    images: Any,
    labels: Sequence[int],
    preds: Sequence[int],
    baseline_preds: Sequence[int],
    classes: Sequence[str],
    sample_ids: Sequence[Any],
    path: Path,
    title: str,
    per_group: int = 12,
) -> None:
    """The images a strategy fixed (standard wrong, it right) and broke (the reverse), each
    captioned with its id, label and both predictions; at most `per_group` of each. Drawn as
    one montage (one image, not a subplot per image: a sweep draws one per run)."""
    import numpy as np

    fixed = [i for i in range(len(labels)) if preds[i] == labels[i] != baseline_preds[i]]
    broken = [i for i in range(len(labels)) if baseline_preds[i] == labels[i] != preds[i]]
    shown = [("fixed", i) for i in fixed[:per_group]] + [("broken", i) for i in broken[:per_group]]
    columns = 6
    rows = max(1, math.ceil(len(shown) / columns))
    tiles = [np.asarray(images[i], dtype=np.float32).transpose(1, 2, 0) for _, i in shown]
    height, width, channels = tiles[0].shape if tiles else (8, 8, 1)
    gap, caption = max(1, height // 8), height  # a caption's three lines need a tile's height
    step = height + caption
    montage = np.ones((step * rows, (width + gap) * columns, channels), np.float32)
    for slot, tile in enumerate(tiles):
        top, left = (slot // columns) * step + caption, (slot % columns) * (width + gap)
        montage[top : top + height, left : left + width] = tile
    figure, axes = subplots(figsize=(2.1 * columns, 3.2 * rows + 0.8))
    axes.imshow(montage.squeeze(-1) if channels == 1 else montage, cmap="gray", vmin=0, vmax=1)
    axes.axis("off")
    for slot, (name, index) in enumerate(shown):
        axes.text(
            (slot % columns) * (width + gap) + width / 2,
            (slot // columns) * step + caption * 0.95,
            f"{name} {Path(str(sample_ids[index])).name[-16:]}\nlabel {classes[labels[index]]}\n"
            f"standard {classes[baseline_preds[index]]} -> {classes[preds[index]]}",
            ha="center",
            va="bottom",
            fontsize=7,
            color="tab:green" if name == "fixed" else "tab:red",
        )
    summary = f"fixed {len(fixed)}, broken {len(broken)}" + ("" if shown else " (nothing to show)")
    figure.suptitle(f"{title}\n{summary}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)


def plot_risk_coverage(curves: dict[str, tuple[list[float], float]], path: Path) -> None:
    """Selective risk against coverage, one line per run (lower is better; its AURC in the key):
    how many errors a strategy makes on the images it is most confident of."""
    figure, axes = subplots(figsize=(10, 6.5))
    colours = palette("tab20")
    ranked = sorted(curves.items(), key=lambda item: item[1][1])  # best AURC first in the key
    for index, (label, (risks, area)) in enumerate(ranked):
        coverage = [(k + 1) / len(risks) for k in range(len(risks))]
        axes.plot(
            coverage,
            risks,
            label=f"{label[:40]} (AURC {area:.4f})",
            linewidth=1.3,
            color=colours[index % len(colours)],
            linestyle=("-", "--", ":")[index // len(colours) % 3],
        )
    axes.set_xlabel("coverage (share of images kept, most confident first)")
    axes.set_ylabel("selective risk (error rate among the images kept; linear below 1%)")
    axes.set_xlim(0, 1)
    axes.set_yscale("symlog", linthresh=0.01)
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")
    axes.set_title(f"Risk-coverage of {len(curves)} runs (max-probability ranking)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)

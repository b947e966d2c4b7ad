"""The sweep's pictures, read through matplotlib's objects (titles, labels, error bars), not
pixels."""

from __future__ import annotations

import math

import pytest

from ml_infer.plots import pareto_figure, plot_pareto, pyplot


def sweep_row(job: int, label: str, accuracy: float, cost: float, iqr: float = math.nan) -> dict:
    return {
        "run": label,
        "run_dir": f"/sweeps/2026-12-03/06-40-12/{job}_{label.split('=')[-1]}",
        "strategy": label.split("=")[-1],
        "data": "digits",
        "split": "test",
        "accuracy": accuracy,
        "accuracy_ci95_low": accuracy - 0.01,
        "accuracy_ci95_high": min(1.0, accuracy + 0.01),
        "relative_cost": cost,
        "relative_cost_iqr": iqr,
        "forward_passes_per_image": round(cost) if math.isfinite(cost) else 1,
        "precision": "fp32",
        "device": "cpu",
    }


@pytest.fixture()
def close_figures():
    yield
    pyplot().close("all")


def labels_of(axes) -> list[str]:
    return [text.get_text() for text in axes.texts]


def test_points_carry_their_run_number_and_name_and_cost_its_spread(close_figures):
    rows = [
        sweep_row(0, "strategy=standard", 0.975, 1.0, 0.05),
        sweep_row(3, "strategy=tta", 0.980, 9.5, 1.2),
        sweep_row(5, "strategy=ensemble", 0.985, 3.1),  # timed without a spread
    ]
    figure = pareto_figure(rows)
    plotted, key = figure.axes
    assert labels_of(plotted) == ["0 standard", "3 tta", "5 ensemble"]  # "strategy=" left out
    assert "3  strategy=tta" in key.texts[0].get_text()
    x_errors = [container.has_xerr for container in plotted.containers]
    assert x_errors == [True, True, False]
    assert "IQR" in plotted.get_xlabel() and "Wilson" in plotted.get_ylabel()
    title = figure._suptitle.get_text()
    assert "digits/test" in title and "3 runs" in title and "fp32 on cpu" in title


def test_a_zoom_panel_only_when_some_runs_lie_outside_the_best_band(close_figures, tmp_path):
    rows = [sweep_row(0, "strategy=standard", 0.975, 1.0), sweep_row(1, "strategy=tta", 0.6, 10.0)]
    figure = pareto_figure(rows)
    assert len(figure.axes) == 3
    assert figure.axes[1].get_title().startswith("zoom: accuracy within")
    assert labels_of(figure.axes[1]) == ["0 standard"]  # the far run is not zoomed on
    path = tmp_path / "pareto.png"
    plot_pareto(rows, path)
    assert path.stat().st_size > 10_000


def test_forward_passes_stand_in_for_a_cost_no_run_measured(close_figures):
    rows = [
        sweep_row(0, "strategy=standard", 0.975, math.nan) | {"forward_passes_per_image": 1},
        sweep_row(1, "strategy=tta", 0.98, math.nan) | {"forward_passes_per_image": 10},
    ]
    plotted = pareto_figure(rows).axes[0]
    assert plotted.get_xlabel() == "forward passes per image"
    assert [container.has_xerr for container in plotted.containers] == [False, False]
    assert [point[0] for point in plotted.lines[-1].get_xydata()] == [1, 10]  # the front

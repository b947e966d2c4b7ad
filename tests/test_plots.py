"""The sweep's pictures, read through matplotlib's objects (titles, labels, error bars), not
pixels."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ml_infer import report
from ml_infer.confusion import confusion_figure
from ml_infer.perclass import per_class_delta_figure, per_class_deltas
from ml_infer.plots import pareto_figure, plot_pareto
from ml_infer.report import collect_runs
from ml_infer.task import run_evaluation

from .conftest import compose_config
from .test_sweeps import hand_made_metrics, make_run


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


def labels_of(axes) -> list[str]:
    return [text.get_text() for text in axes.texts]


def test_points_carry_their_run_number_and_name_and_cost_its_spread():
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


def test_a_zoom_panel_only_when_some_runs_lie_outside_the_best_band(tmp_path):
    rows = [sweep_row(0, "strategy=standard", 0.975, 1.0), sweep_row(1, "strategy=tta", 0.6, 10.0)]
    figure = pareto_figure(rows)
    assert len(figure.axes) == 3
    assert figure.axes[1].get_title().startswith("zoom: accuracy within")
    assert labels_of(figure.axes[1]) == ["0 standard"]  # the far run is not zoomed on
    path = tmp_path / "pareto.png"
    plot_pareto(rows, path)
    assert path.stat().st_size > 10_000


def test_forward_passes_stand_in_for_a_cost_no_run_measured():
    rows = [
        sweep_row(0, "strategy=standard", 0.975, math.nan) | {"forward_passes_per_image": 1},
        sweep_row(1, "strategy=tta", 0.98, math.nan) | {"forward_passes_per_image": 10},
    ]
    plotted = pareto_figure(rows).axes[0]
    assert plotted.get_xlabel() == "forward passes per image"
    assert [container.has_xerr for container in plotted.containers] == [False, False]
    assert [point[0] for point in plotted.lines[-1].get_xydata()] == [1, 10]  # the front


def test_the_confusion_matrix_colours_shares_labels_counts_and_shows_recall():
    labels = [0] * 90 + [1] * 10
    preds = [0] * 88 + [1] * 2 + [1] * 7 + [0] * 3
    figure = confusion_figure(labels, preds, ["cat", "dog", "owl"], "tta on pets/test")
    axes, side = figure.axes[:2]
    assert sorted(labels_of(axes)) == sorted(["88", "2", "3", "7"])  # off-diagonal counts too
    image = axes.images[0].get_array()
    assert image[1, 0] == pytest.approx(0.3) and image[0, 1] == pytest.approx(2 / 90)
    assert [bar.get_width() for bar in side.patches] == pytest.approx([88 / 90, 0.7, 0.0])
    assert "no images" in labels_of(side)  # owl: absent from the labels
    assert axes.get_title() == "tta on pets/test" and "recall" in side.get_xlabel()
    assert figure.axes[-1].get_ylabel() == "share of the true class"  # the colour bar


def test_past_30_classes_the_most_confused_pairs_are_listed():
    classes = [f"c{k}" for k in range(35)]
    labels = list(range(35)) * 2 + [3] * 9
    preds = list(range(35)) * 2 + [7] * 9
    figure = confusion_figure(labels, preds, classes, "many classes")
    axes, side = figure.axes[:2]
    assert labels_of(axes) == []  # too many cells to label
    table = side.texts[0].get_text().splitlines()
    assert table[0].split() == ["true", "predicted", "images"] and table[1].split() == [
        "c3",
        "c7",
        "9",
    ]
    assert side.get_title() == "the 20 most confused pairs"


def write_predictions(run_dir: Path, right: dict[str, int], per_class: int = 10) -> None:
    """predictions.csv with `per_class` images of each class, `right[class]` of them right."""
    with (run_dir / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", "label", "pred"])
        for name, hits in right.items():
            other = next(n for n in right if n != name)
            for k in range(per_class):
                writer.writerow([f"{name}{k}", name, name if k < hits else other])


def test_per_class_accuracy_change_against_standard(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    standard = make_run(sweep, "0_standard", hand_made_metrics("standard", 0.65, 900.0), None)
    tta = make_run(sweep, "1_tta", hand_made_metrics("tta", 0.65, 90.0), "- strategy=tta\n")
    broken = make_run(sweep, "2_ensemble", hand_made_metrics("ensemble", 0.7, 300.0), None)
    write_predictions(standard, {"cat": 8, "dog": 5})
    write_predictions(tta, {"cat": 9, "dog": 4})
    (broken / "predictions.csv").write_bytes(b"\xff\xfe garbage")  # left out of the comparison
    assert report.main([str(sweep)]) == 0
    with (sweep / "per_class_delta.csv").open() as handle:
        rows = [
            (r["run"], r["class"], r["images"], r["accuracy_standard"], r["delta"])
            for r in csv.DictReader(handle)
        ]
    assert [
        (run, name, images, float(base), round(float(delta), 9))
        for run, name, images, base, delta in rows
    ] == [
        ("strategy=tta", "cat", "10", 0.8, 0.1),
        ("strategy=tta", "dog", "10", 0.5, -0.1),
    ]
    assert (sweep / "per_class_delta.png").stat().st_size > 5_000
    assert "per_class_delta.csv, per_class_delta.png" in capsys.readouterr().out
    figure = per_class_delta_figure(per_class_deltas(collect_runs(sweep)))
    axes = figure.axes[0]
    assert labels_of(axes) == ["+10.0", "-10.0"]
    assert "against standard" in axes.get_title() and axes.get_xlabel() == "class"
    assert figure.axes[1].get_ylabel() == "accuracy change (points)"


def figure_titles(figure) -> str:
    """Every title of a figure: its suptitle and each panel's."""
    parts = [figure._suptitle.get_text()] if figure._suptitle is not None else []
    return " | ".join(parts + [axes.get_title() for axes in figure.axes])


@pytest.mark.slow
def test_every_picture_of_a_run_and_a_sweep_names_what_it_shows(runs_dir, tmp_path, saved_figures):
    """Real runs (standard, tta with a temperature) and their sweep report: each picture exists,
    is a real image, and its figure's titles and axis labels say what it shows."""
    sweep = tmp_path / "sweep"
    folds = f"ensemble.checkpoints=[{runs_dir}/fold_0/weights/best.pt]"
    for job, strategy in enumerate(("standard", "tta")):
        run_dir = sweep / f"{job}_{strategy}"
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- strategy={strategy}\n")
        overrides = [f"strategy={strategy}", folds, "calibration=temperature"]
        run_evaluation(compose_config(overrides, runs_dir=runs_dir), output_dir=run_dir)
    report.write_comparison(sweep)
    drawn = {  # the report draws in a staging folder, then moves its files in
        f"{'sweep' if p.parent.name.startswith('.report-') else p.parent.name}/{p.name}": figure
        for p, figure in saved_figures.items()
    }

    expected = {
        "1_tta/confusion_matrix.png": ("tta", "predicted"),
        "1_tta/fixed_broken.png": ("fixed and broken", None),
        "1_tta/reliability.png": ("ECE", "confidence"),
        "sweep/pareto.png": ("Accuracy vs cost", "relative cost"),
        "sweep/risk_coverage.png": ("Risk-coverage", "coverage"),
        "sweep/per_class_delta.png": ("against standard", "class"),
        "sweep/reliability.png": ("on the diagonal = calibrated", "mean confidence"),
    }
    for name, (title, xlabel) in expected.items():
        folder, file = name.split("/")
        assert ((sweep if folder == "sweep" else sweep / folder) / file).stat().st_size > 10_000
        figure = drawn[name]
        assert title in figure_titles(figure), (name, figure_titles(figure))
        if xlabel is not None:
            labels = " | ".join(axes.get_xlabel() for axes in figure.axes)
            assert xlabel in labels, (name, labels)

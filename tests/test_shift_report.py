"""The comparison under shift, from run files written here by hand: mCE and paired deltas by
hand, each strategy against its own standard, and the cells a strategy lacks named, not
averaged over."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ml_infer.report import write_comparison
from ml_infer.shiftreport import markdown, summarise
from ml_infer.sweepdir import read_runs

LABELS = [0, 1, 2, 3]  # four images, labels = ids


def run(
    tmp: Path,
    name: str,
    strategy: str,
    shift: str,
    severity: int,
    correct: list[bool],
    data: str = "digits",
) -> dict:
    """A run directory with its metrics.json and predictions.csv: image k right iff correct[k]."""
    directory = tmp / name
    directory.mkdir()
    lines = ["index,label,pred"] + [
        f"{k},{k},{k if right else (k + 1) % 4}" for k, right in enumerate(correct)
    ]
    (directory / "predictions.csv").write_text("\n".join(lines) + "\n")
    metrics = {
        "strategy": strategy,
        "data": data,
        "split": "test",
        "checkpoint_sha256": ["abc"],
        "accuracy": sum(correct) / len(correct),
        "ece": 0.1,
        "shift": shift,
        "severity": severity,
        "shift_applied": shift != "none" and severity > 0,
        "forward_passes_per_image": 1,
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))
    overrides = [
        f"strategy={strategy}",
        f"data={data}",
        f"shift={shift}",
        f"shift.severity={severity}",
    ]
    (directory / ".hydra").mkdir()
    (directory / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return metrics | {"run": " ".join(overrides), "run_dir": str(directory)}


def test_mce_and_paired_deltas_by_hand(tmp_path):
    rows = [
        run(tmp_path, "s0", "standard", "none", 0, [True, True, True, True]),
        run(tmp_path, "s1", "standard", "blur", 1, [True, True, False, False]),  # error 0.5
        run(tmp_path, "s2", "standard", "noise", 1, [True, True, True, False]),  # error 0.25
        run(tmp_path, "e0", "ensemble", "none", 0, [True, True, True, True]),
        run(tmp_path, "e1", "ensemble", "blur", 1, [True, True, True, False]),  # error 0.25
        run(tmp_path, "e2", "ensemble", "noise", 1, [True, True, True, True]),  # error 0
    ]
    summary = summarise(rows)
    standard, ensemble = summary["strategies"]
    assert standard["mce"] == 100 and standard["delta"][1][0] == 0
    # CE: blur 0.25 / 0.5, noise 0 / 0.25 -> mean 0.25 -> 25%; clean errors are 0 for both.
    assert ensemble["mce"] == pytest.approx(25.0) and ensemble["mce_corruptions"] == 2
    assert ensemble["relative_mce"] == pytest.approx(25.0)
    # Per image, mean over the two corruptions of (ensemble right - standard right):
    # image 2: (1 - 0 + 1 - 1) / 2 = 0.5; image 3: (0 - 0 + 1 - 0) / 2 = 0.5; others 0.
    delta, low, high = ensemble["delta"][1]
    assert delta == pytest.approx(0.25) and low <= delta <= high
    assert ensemble["accuracy_under_shift"] == pytest.approx(0.875)
    assert "| strategy=ensemble data=digits | 1.0000 | 0.8750 | 25.0 (2) |" in markdown(summary)


def test_each_strategy_is_compared_with_the_standard_of_its_own_data(tmp_path):
    rows = [
        run(tmp_path, "a", "standard", "blur", 1, [True, False, False, False], data="digits"),
        run(tmp_path, "b", "standard", "blur", 1, [True, True, True, False], data="textures"),
        run(tmp_path, "c", "tta", "blur", 1, [True, True, True, False], data="textures"),
    ]
    tta = summarise(rows)["strategies"][2]
    assert tta["strategy"] == "strategy=tta data=textures"
    assert tta["delta"][1][0] == 0 and tta["mce"] == pytest.approx(100.0)


def test_a_missing_cell_is_named_and_left_out_of_every_figure(tmp_path):
    rows = [
        run(tmp_path, "s1", "standard", "blur", 1, [True, True, True, True]),
        run(tmp_path, "s2", "standard", "noise", 1, [False, False, False, False]),
        run(tmp_path, "t1", "tta", "blur", 1, [True, True, True, False]),
        # tta's noise run failed: averaging what is left would put tta at 0.75 against 0.5.
    ]
    summary = summarise(rows)
    tta = summary["strategies"][1]
    assert tta["accuracy_under_shift"] == pytest.approx(0.75)
    assert tta["missing_cells"] == [("noise", 1)]
    assert "strategy=tta data=digits lacks noise 1" in markdown(summary)


def test_the_sweep_report_skips_a_shifted_run_without_its_severity(tmp_path, capsys):
    run(tmp_path, "0_s", "standard", "none", 0, [True] * 4)
    run(tmp_path, "1_s", "standard", "blur", 2, [True, False, True, True])
    broken = tmp_path / "2_s" / "metrics.json"
    run(tmp_path, "2_s", "standard", "noise", 2, [True] * 4)
    metrics = json.loads(broken.read_text())
    del metrics["severity"]
    broken.write_text(json.dumps(metrics))
    assert len(read_runs(tmp_path)) == 2
    assert "2_s: metrics.json has a shift applied without its severity" in capsys.readouterr().err
    write_comparison(tmp_path)
    assert "## Under shift" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "shift.csv").read_text().count("\n") == 2  # header + the blur cell


def test_the_shift_pictures_name_what_they_show(tmp_path, saved_figures):
    """shift_heatmap.png and shift_severity.png: real image files whose titles and axes say
    what they plot (read from matplotlib's objects, not pixels)."""
    from ml_infer.shiftplots import plot_shift_heatmap, plot_shift_severity

    rows = [
        run(tmp_path, "s0", "standard", "none", 0, [True, True, True, True]),
        run(tmp_path, "s1", "standard", "blur", 1, [True, True, False, False]),
        run(tmp_path, "e0", "ensemble", "none", 0, [True, True, True, True]),
        run(tmp_path, "e1", "ensemble", "blur", 1, [True, True, True, False]),
    ]
    summary = summarise(rows)
    plot_shift_heatmap(summary, tmp_path / "shift_heatmap.png")
    plot_shift_severity(summary, tmp_path / "shift_severity.png")
    for name in ("shift_heatmap.png", "shift_severity.png"):
        assert (tmp_path / name).stat().st_size > 5_000, name
    heatmap, severity = (
        saved_figures[tmp_path / f"shift_{k}.png"] for k in ("heatmap", "severity")
    )
    (axes,) = [a for a in heatmap.axes if a.get_title()]
    assert "accuracy change vs standard" in axes.get_title()
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("corruption", "strategy")
    assert [t.get_text() for t in axes.get_xticklabels()] == ["blur"]
    titles = [a.get_title() for a in severity.axes]
    assert titles == ["accuracy under shift", "calibration error under shift"]
    assert all(a.get_xlabel() == "severity (0: clean)" for a in severity.axes)

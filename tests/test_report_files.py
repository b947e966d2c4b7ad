"""The sweep report: its exit status, and its files written together or not at all, whatever
the run directories hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_infer import report
from ml_infer.metrics import aurc
from ml_infer.outputs import REPORT_FILES
from ml_infer.report import collect_runs

from .test_sweeps import hand_made_metrics, make_run

CORE_FILES = ("comparison.md", "comparison.csv", "pareto.png")


def two_run_sweep(root: Path) -> Path:
    sweep = root / "sweep"
    make_run(
        sweep, "0_standard", hand_made_metrics("standard", 0.98, 1000.0), "- strategy=standard\n"
    )
    make_run(sweep, "1_tta", hand_made_metrics("tta", 0.99, 100.0), "- strategy=tta\n")
    return sweep


def leftovers(sweep: Path) -> list[str]:
    return sorted(p.name for p in sweep.iterdir() if p.name.startswith(".report-"))


def test_the_report_exits_2_and_writes_nothing_when_no_run_is_left(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_run(sweep, "0_broken", '{"accuracy":', None)
    make_run(sweep, "1_text", hand_made_metrics("tta", 0.9, 50.0) | {"accuracy": "high"}, None)
    assert report.main([str(sweep)]) == 2
    err = capsys.readouterr().err
    assert f"error: no evaluated run found in {sweep}" in err
    assert err.count("warning: skipping run ") == 2
    assert not any((sweep / name).exists() for name in REPORT_FILES)


def test_a_report_that_fails_midway_leaves_the_last_complete_one(tmp_path, capsys, monkeypatch):
    sweep = two_run_sweep(tmp_path)
    assert report.main([str(sweep)]) == 0
    before = {name: (sweep / name).read_bytes() for name in CORE_FILES}
    make_run(sweep, "2_tta", hand_made_metrics("tta", 0.97, 90.0), "- strategy=tta\n- seed=1\n")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot_pareto", disk_full)
    assert report.main([str(sweep)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: cannot write the report in {sweep}: No space left on device"
    )
    assert {name: (sweep / name).read_bytes() for name in CORE_FILES} == before
    assert leftovers(sweep) == []


def test_files_of_an_earlier_report_that_this_one_does_not_make_are_removed(tmp_path, capsys):
    sweep = two_run_sweep(tmp_path)
    (sweep / "shift.csv").write_text("strategy\nstale\n")
    (sweep / "notes.txt").write_text("the user's own file")
    assert report.main([str(sweep)]) == 0
    assert not (sweep / "shift.csv").exists()
    assert (sweep / "notes.txt").read_text() == "the user's own file"
    assert all((sweep / name).stat().st_size > 0 for name in CORE_FILES)
    written = capsys.readouterr().out.strip().splitlines()[-1]
    assert written == f"wrote {sweep / 'comparison.md'}, comparison.csv, pareto.png"


def test_figures_a_real_run_can_have_at_their_edges_are_kept(tmp_path, capsys):
    """No relative cost (standard not timed), no risk curve (one image), an AURC one rounding
    step above 1 (every prediction wrong, written before aurc() clamped it), a loop faster than
    the clock."""
    sweep = two_run_sweep(tmp_path)
    edges = {
        "relative_cost": math.nan,
        "relative_cost_iqr": math.nan,
        "aurc": math.nan,
        "images_per_s": math.inf,
    }
    make_run(sweep, "2_tta", hand_made_metrics("tta", 0.97, 90.0) | edges, "- seed=1\n")
    all_wrong = {"accuracy": 0.0, "accuracy_ci95_low": 0.0, "aurc": 1.0000000000000002}
    make_run(sweep, "3_tta", hand_made_metrics("tta", 0.0, 90.0) | all_wrong, "- seed=2\n")
    assert [row["run"] for row in collect_runs(sweep)][-2:] == ["seed=1", "seed=2"]
    assert capsys.readouterr().err == ""


def test_aurc_of_all_wrong_predictions_is_at_most_one():
    assert all(aurc(torch.ones(n, dtype=torch.float64)) <= 1.0 for n in range(2, 200))


_ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
_FIELDS = [
    "accuracy",
    "accuracy_ci95_low",
    "accuracy_ci95_high",
    "images_per_s",
    "views",
    "models",
    "strategy",
    "data",
    "split",
    "checkpoint_sha256",
    "accuracy_delta_vs_standard",
    "relative_cost",
    "nll",
    "ece",
    "aurc",
    "risk_coverage",
    "reliability",
    "shift",
]
_OVERRIDES = st.one_of(
    st.none(),
    st.just("- strategy=tta\n"),
    st.just("{unclosed: [\n"),
    st.just("a: mapping\n"),
    st.just("- [nested]\n"),
    st.text(max_size=20),
)


@pytest.mark.slow
@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.dictionaries(st.sampled_from(_FIELDS), _ODD_VALUES, max_size=3),
    drop=st.lists(st.sampled_from(_FIELDS), max_size=2),
    overrides=_OVERRIDES,
    as_text=st.one_of(st.none(), st.sampled_from(["[1]", '"x"', "null", "{", "1e999"])),
)
def test_any_run_directory_is_scored_or_skipped_and_the_files_come_whole(
    tmp_path_factory, changes, drop, overrides, as_text
):
    sweep = two_run_sweep(tmp_path_factory.mktemp("fuzz"))
    metrics = {k: v for k, v in (hand_made_metrics("tta", 0.97, 90.0) | changes).items()}
    for name in drop:
        metrics.pop(name, None)
    make_run(sweep, "2_odd", as_text or json.dumps(metrics), overrides)
    assert report.main([str(sweep)]) == 0  # the two good runs are always left
    assert all((sweep / name).stat().st_size > 0 for name in CORE_FILES)
    assert leftovers(sweep) == []
    table = (sweep / "comparison.md").read_text()
    assert table.count("\n") in (2 + 2, 2 + 3)

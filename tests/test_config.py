"""Config plumbing: override pre-checks, run labels, the report's bookkeeping."""

from __future__ import annotations

import json
import math

import pytest

from ml_infer.bank import expand_checkpoint_paths
from ml_infer.config import run_label
from ml_infer.errors import UserError
from ml_infer.evaluate import build_aggregators
from ml_infer.precheck import check_overrides
from ml_infer.report import add_derived_columns, collect_runs

from .conftest import compose_config


@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy='tta'", 'tta.aggregation="max"'],
        ["tta.augmentations=[{_target_:ml_infer.augment.HorizontalFlip}]"],
        ["tta.augmentations=${oc.env:AUGS}"],
        ["strategy=standard,tta", "tta=flips,d4", "+experiment=compare_all", "model=null"],
        ["hydra/launcher=joblib", "ensemble.checkpoints=[a=b.pt]"],
    ],
)
def test_valid_overrides_pass_the_pre_check(overrides):
    check_overrides(overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (['strategy="fast"'], "unknown strategy 'fast'"),
        (["tta.augmentations=[horizontal_flip, 'mirror']"], "unknown augmentation 'mirror'"),
        (["-m", "ensemble.aggregation=soft_voting,avg"], "unknown ensemble aggregation 'avg'"),
    ],
)
def test_invalid_overrides_fail_the_pre_check(overrides, message):
    with pytest.raises(UserError, match=message):
        check_overrides(overrides)


def test_run_label_hides_what_every_run_of_a_sweep_shares():
    label = run_label(
        [
            "+comparison=ensemble_hard",
            "+experiment=compare_all",
            "runs_dir=/x",
            "tracking.uri=sqlite:///y.db",
            "hydra.sweep.dir=/z",
            "seed=2",
        ]
    )
    assert label == "ensemble_hard seed=2"


def test_a_single_weight_and_a_single_checkpoint_path_need_no_brackets(runs_dir):
    cfg = compose_config(["ensemble.weights=0.7"], runs_dir=runs_dir)
    _, aggregator = build_aggregators(cfg, 1)
    assert aggregator.weights.tolist() == [1.0]
    path = str(runs_dir / "fold_0" / "weights" / "best.pt")
    assert expand_checkpoint_paths(path) == expand_checkpoint_paths([path])


def test_a_checkpoint_listed_twice_is_refused(fold_paths):
    with pytest.raises(UserError, match="more than once"):
        expand_checkpoint_paths([str(fold_paths[0]), str(fold_paths[0])])


def row(strategy, data, images_per_s, sha="a"):
    return {
        "strategy": strategy,
        "data": data,
        "split": "test",
        "images_per_s": images_per_s,
        "checkpoint_sha256": [sha, "z"],
        "accuracy": 0.9,
    }


def test_relative_cost_compares_with_the_standard_run_of_the_same_data_and_checkpoint():
    rows = add_derived_columns(
        [
            row("standard", "digits", 1000.0),
            row("tta", "digits", 100.0),
            row("standard", "textures", 400.0),
            row("tta", "textures", 100.0),
            row("tta", "textures", 50.0, sha="other"),
        ]
    )
    assert [r["relative_cost"] for r in rows[:4]] == [1.0, 10.0, 1.0, 4.0]
    assert math.isnan(rows[4]["relative_cost"])  # no standard run for that checkpoint


def test_predict_runs_are_left_out_of_the_comparison(tmp_path):
    for name, metrics in {
        "0_standard": row("standard", "digits", 10.0),
        "1_standard": {"strategy": "standard", "mode": "predict", "images_per_s": 5.0},
    }.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    assert [r["run"] for r in collect_runs(tmp_path)] == ["0_standard"]


@pytest.mark.parametrize(
    ("argv", "multirun"),
    [
        (["hydra.mode=MULTIRUN", "strategy=standard,tta", "tracking=none"], True),
        (["-m", "model=glob(small*)", "model.width=64"], True),
        (["tta.augmentations=null"], False),
        (["+foo=1", "~predict"], False),
    ],
    ids=["hydra-mode-multirun", "glob-group-sweep", "no-augmentations", "add-and-delete"],
)
def test_valid_command_lines_pass_and_say_whether_they_sweep(argv, multirun, tmp_path):
    from ml_infer.precheck import check_command_line

    checked = check_command_line([*argv, f"hydra.run.dir={tmp_path}/run"])
    assert checked is not None and checked.multirun is multirun


def test_the_sweep_directory_is_resolved_without_the_swept_values(tmp_path):
    """As Hydra does: `${strategy.name}` in hydra.sweep.dir is the default strategy's name, not
    that of the first value swept."""
    from ml_infer.precheck import check_command_line

    checked = check_command_line(
        ["-m", f"hydra.sweep.dir={tmp_path}/${{strategy.name}}", "strategy=tta,ensemble"]
    )
    assert checked is not None and checked.output_dir == tmp_path / "standard"


def test_hydra_options_that_show_something_skip_the_checks_and_config_paths_refuse_a_sweep():
    from ml_infer.precheck import check_command_line

    assert check_command_line(["--cfg", "job", "stratgy=x"]) is None
    with pytest.raises(UserError, match="a sweep \\(-m\\) with Hydra's option -cd"):
        check_command_line(["-m", "-cd", "elsewhere", "strategy=tta"])

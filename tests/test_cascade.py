"""`strategy=cascade` on checkpoints our trainer made: its extremes equal its first and last
stage, the passes it reports are the passes it runs, its thresholds are chosen on the
calibration split only."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ml_infer.cascade import CascadePredictor, confidence
from ml_infer.errors import UserError
from ml_infer.predictor import Predictor
from ml_infer.task import run_evaluation

from .conftest import compose_config


def evaluated(runs_dir: Path, out: Path, *overrides: str) -> tuple[dict, list[list[str]]]:
    metrics = run_evaluation(compose_config(list(overrides), runs_dir=runs_dir), output_dir=out)
    with (out / "predictions.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    return metrics, [row[: 3 + 10] for row in rows[1:]]  # id, label, pred, probabilities


def test_confidence_signals_order_sure_above_unsure():
    sure, unsure = torch.tensor([[0.9, 0.05, 0.05]]), torch.tensor([[0.4, 0.35, 0.25]])
    for signal in ("max_prob", "margin", "entropy"):
        assert float(confidence(sure, signal)[0]) > float(confidence(unsure, signal)[0])
    with pytest.raises(UserError, match="valid: max_prob, margin, entropy"):
        confidence(sure, "variance")


@pytest.mark.slow
def test_thresholds_at_the_extremes_equal_the_first_and_the_last_stage(runs_dir, tmp_path):
    _, standard_rows = evaluated(runs_dir, tmp_path / "s")
    ensemble, ensemble_rows = evaluated(runs_dir, tmp_path / "e", "strategy=ensemble")
    never, never_rows = evaluated(
        runs_dir, tmp_path / "never", "strategy=cascade", "cascade.thresholds=[0]"
    )
    always, always_rows = evaluated(
        runs_dir, tmp_path / "always", "strategy=cascade", "cascade.thresholds=[1.01]"
    )
    assert never_rows == standard_rows and never["forward_passes_per_image"] == 1.0
    assert always_rows == ensemble_rows
    assert always["forward_passes_per_image"] == ensemble["forward_passes_per_image"]
    assert never["escalated_share"] == [0.0] and always["escalated_share"] == [1.0]


@pytest.mark.slow
def test_the_passes_reported_are_the_passes_run(runs_dir, tmp_path, monkeypatch):
    counted = {"pairs": 0, "inside": False}
    live_call, logits = CascadePredictor.__call__, Predictor.logits

    def counting_call(self, images):
        counted["inside"] = True
        try:
            return live_call(self, images)
        finally:
            counted["inside"] = False

    def counting_logits(self, images):
        if counted["inside"]:  # every (model, view, image) the live cascade runs
            counted["pairs"] += len(images) * len(self.models) * len(self.views)
        return logits(self, images)

    monkeypatch.setattr(CascadePredictor, "__call__", counting_call)
    monkeypatch.setattr(Predictor, "logits", counting_logits)
    metrics = run_evaluation(
        compose_config(
            [
                "strategy=cascade",
                "cascade.thresholds=[0.95]",
                "engine.warmup_batches=0",
                "engine.timing_batches=0",  # the whole set, once
            ],
            runs_dir=runs_dir,
        ),
        output_dir=tmp_path,
    )
    assert 1.0 < metrics["forward_passes_per_image"] < metrics["models"]
    assert counted["pairs"] / metrics["n"] == pytest.approx(metrics["forward_passes_per_image"])


@pytest.mark.slow
def test_thresholds_chosen_on_the_calibration_split_keep_the_target_gain(runs_dir, tmp_path):
    metrics, _ = evaluated(
        runs_dir,
        tmp_path,
        "strategy=cascade",
        "cascade.thresholds=null",
        "cascade.target_gain=0.9",
    )
    chosen = metrics["cascade_threshold_choice"]
    assert chosen["wanted"] >= chosen["first"] and 0 <= metrics["cascade_thresholds"][0] <= 1.01
    assert metrics["forward_passes_per_image"] <= metrics["models"]


def test_a_cascade_needs_a_threshold_per_stage_but_the_last(runs_dir, tmp_path):
    with pytest.raises(UserError, match=r"has 2 value\(s\) for 2 stages"):
        run_evaluation(
            compose_config(["strategy=cascade", "cascade.thresholds=[0.5,0.6]"], runs_dir=runs_dir),
            output_dir=tmp_path,
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stages": [{"tta": "none"}, {"tta": "none", "ensemble": "folds"}]}, "names a tta and"),
        ({"stages": [{"tta": "none", "ensemble": "single"}]}, "at least two stages"),
        ({"thresholds": 0.5}, "must be a list of numbers"),
        ({"thresholds": ["abc"]}, "must be a list of numbers"),
        ({"thresholds": [0.5, 0.6]}, r"has 2 value\(s\) for 2 stages"),
        ({"target_gain": 5}, "target_gain must be a number in"),
        ({"confidence": "variance"}, "valid: max_prob, margin, entropy"),
    ],
)
def test_bad_cascade_settings_are_one_line_errors(change, message):
    from omegaconf import OmegaConf

    from ml_infer.cascade import check_settings

    settings = OmegaConf.create(
        {
            "stages": [{"tta": "none", "ensemble": "single"}, {"tta": "none", "ensemble": "folds"}],
            "thresholds": [0.9],
            "confidence": "max_prob",
            "target_gain": 0.9,
        }
        | change
    )
    with pytest.raises(UserError, match=message):
        check_settings(settings)


@pytest.mark.slow
def test_a_cascade_is_calibrated_and_gets_sets_like_any_strategy(runs_dir, tmp_path):
    metrics, _ = evaluated(
        runs_dir, tmp_path, "strategy=cascade", "calibration=temperature", "conformal=lac"
    )
    assert (
        metrics["ece_calibrated"] <= metrics["ece"] and metrics["preds_changed_by_calibration"] == 0
    )
    assert 0 <= metrics["coverage"] <= 1 and (tmp_path / "calibration_split.csv").exists()

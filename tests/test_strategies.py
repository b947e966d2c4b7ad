"""Every strategy preset composes through Hydra and runs end to end on real checkpoints."""

from __future__ import annotations

import csv
import json

import pytest

from ml_infer.config import options
from ml_infer.task import run_evaluation

from .conftest import compose_config

STRATEGIES = ["standard", "mixed_precision", "accelerate", "tta", "ensemble", "tta_ensemble"]
METRIC_KEYS = {
    "strategy",
    "n",
    "accuracy",
    "macro_f1",
    "nll",
    "ece",
    "brier",
    "images_per_s",
    "latency_ms_p50",
    "latency_ms_p95",
    "forward_passes_per_image",
    "peak_mem_mb",
    "views",
    "models",
}


def test_the_six_seed_strategies_are_presets():
    assert set(STRATEGIES) <= set(options("strategy"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_runs_end_to_end(strategy, runs_dir, fold_paths, tmp_path):
    cfg = compose_config([f"strategy={strategy}"], runs_dir=runs_dir)
    returned = run_evaluation(cfg, output_dir=tmp_path)

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == returned
    assert metrics.keys() >= METRIC_KEYS
    assert metrics["strategy"] == strategy
    assert metrics["accuracy"] > 0.9
    assert 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0 and metrics["images_per_s"] > 0
    assert metrics["forward_passes_per_image"] == metrics["views"] * metrics["models"]

    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["n"] == 360
    assert list(rows[0]) == [
        "index",
        "label",
        "pred",
        *(f"prob_{c}" for c in range(10)),
        "entropy",
        "mutual_information",
        "disagreement",
    ]
    assert len({row["index"] for row in rows}) == len(rows)
    accuracy = sum(row["label"] == row["pred"] for row in rows) / len(rows)
    assert accuracy == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert all(abs(sum(float(row[f"prob_{c}"]) for c in range(10)) - 1) < 1e-4 for row in rows)


@pytest.mark.slow  # eight end-to-end runs; test_strategy_runs_end_to_end keeps the fast loop honest
@pytest.mark.parametrize(
    ("overrides", "views", "models", "min_accuracy"),
    [
        (["strategy=tta"], 10, 1, 0.9),
        (["strategy=tta", "tta=flips", "tta.aggregation=max"], 3, 1, 0.5),
        # Seven of eight d4 views turn or mirror the digit: a vote over them is mostly wrong.
        (["strategy=tta", "tta=d4", "tta.aggregation=vote"], 8, 1, 0.2),
        (["strategy=tta", "tta=intensity", "tta.aggregation=gmean"], 5, 1, 0.9),
        (["strategy=ensemble"], 1, 3, 0.9),
        (["strategy=ensemble", "ensemble=weighted", "ensemble.weights=[0.4,0.3,0.3]"], 1, 3, 0.9),
        (["strategy=ensemble", "ensemble.aggregation=hard_voting"], 1, 3, 0.9),
        (["strategy=tta_ensemble", "tta=flips"], 3, 3, 0.5),
        (["strategy=standard", "use_ema=true", "data.batch_size=100", "device=cpu"], 1, 1, 0.9),
    ],
)
def test_command_line_overrides(overrides, views, models, min_accuracy, runs_dir, tmp_path):
    metrics = run_evaluation(compose_config(overrides, runs_dir=runs_dir), output_dir=tmp_path)
    assert (metrics["views"], metrics["models"]) == (views, models)
    assert metrics["n"] == 360
    assert metrics["accuracy"] > min_accuracy


def test_use_ema_loads_the_ema_weights(runs_dir, tmp_path):
    raw = run_evaluation(compose_config([], runs_dir=runs_dir), output_dir=tmp_path / "raw")
    ema = run_evaluation(
        compose_config(["use_ema=true"], runs_dir=runs_dir), output_dir=tmp_path / "ema"
    )
    assert raw["weights"] == ["raw"] and ema["weights"] == ["ema"]
    assert raw["nll"] != ema["nll"]


@pytest.mark.parametrize(
    ("strategy", "models"),
    [("standard", 1), ("tta", 1), ("mixed_precision", 1), ("ensemble", 2), ("tta_ensemble", 2)],
)
def test_single_model_strategies_run_the_first_of_several_checkpoints(
    strategy, models, runs_dir, fold_paths, tmp_path
):
    """One list for every strategy of a sweep: `standard`, `tta` and `mixed_precision` stay one
    model (the first checkpoint), the ensembles take them all."""
    listed = f"ensemble.checkpoints=[{fold_paths[1]},{fold_paths[0]}]"
    config = compose_config([f"strategy={strategy}", listed], runs_dir=runs_dir)
    metrics = run_evaluation(config, output_dir=tmp_path / "run")
    assert metrics["models"] == models
    assert metrics["checkpoints"] == [str(p) for p in (fold_paths[1], fold_paths[0])[:models]]


def test_an_unknown_members_choice_names_the_valid_ones(runs_dir, tmp_path):
    from ml_infer.errors import UserError

    config = compose_config(["ensemble.members=some"], runs_dir=runs_dir)
    with pytest.raises(UserError, match="unknown ensemble.members 'some'; valid: all, first"):
        run_evaluation(config, output_dir=tmp_path / "run")

"""Calibration and conformal sets through the whole evaluation, on checkpoints our trainer made:
fitted on the calibration split only (never an image that is scored), what they change in
metrics.json and predictions.csv, and the calibration split's outputs served by the store."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ml_infer.calibrate import TemperatureScaling
from ml_infer.data import DigitsDataset
from ml_infer.errors import UserError
from ml_infer.task import run_evaluation

from .conftest import compose_config


def evaluated(runs_dir: Path, out: Path, *overrides: str) -> tuple[dict, list[dict[str, str]]]:
    metrics = run_evaluation(
        compose_config(["tracking=none", *overrides], runs_dir=runs_dir), output_dir=out
    )
    with (out / "predictions.csv").open(newline="") as handle:
        return metrics, list(csv.DictReader(handle))


def calibration_ids(run_dir: Path) -> list[str]:
    with (run_dir / "calibration_split.csv").open(newline="") as handle:
        return [row[next(iter(row))] for row in csv.DictReader(handle)]


@pytest.mark.slow
def test_temperature_is_fitted_on_the_val_split_and_never_changes_a_class(runs_dir, tmp_path):
    metrics, rows = evaluated(runs_dir, tmp_path, "calibration=temperature")
    val = DigitsDataset(split="val")
    assert calibration_ids(tmp_path) == [str(i) for i in val.sample_ids]
    assert set(calibration_ids(tmp_path)).isdisjoint(row["index"] for row in rows)
    assert metrics["calibration_split"] == "val" and metrics["calibration_n"] == len(val)
    # The fitted temperature is the one the val split's own logits give.
    from ml_infer.bank import load_classifier

    member = load_classifier(runs_dir / "fold_0" / "weights" / "best.pt")
    with torch.inference_mode():
        logits = member.model(member.input_spec.normalise(val.pixels())).float()
    direct = TemperatureScaling().fit(logits.log_softmax(dim=-1), val.labels).temperature
    assert metrics["calibration_fit"]["temperature"] == pytest.approx(direct, rel=1e-3)
    assert metrics["preds_changed_by_calibration"] == 0
    assert all(row["pred_calibrated"] == row["pred"] for row in rows)
    assert metrics["accuracy_calibrated"] == pytest.approx(metrics["accuracy"])
    assert metrics["nll_calibrated"] < metrics["nll"]  # our folds are under-confident
    assert set(metrics["reliability"]) == {"raw", "calibrated"}
    assert sum(metrics["reliability"]["raw"]["count"]) == metrics["n"]
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


@pytest.mark.slow
def test_tta_merged_stage_repairs_what_its_views_broke(runs_dir, tmp_path):
    metrics, _ = evaluated(runs_dir, tmp_path, "strategy=tta", "calibration=temperature")
    assert metrics["ece"] > 0.2  # flipped and rotated digits pull every confidence down
    assert metrics["ece_calibrated"] < 0.05 and metrics["calibration_fit"]["temperature"] < 1
    assert metrics["preds_changed_by_calibration"] == 0


@pytest.mark.slow
def test_member_stage_fits_one_calibrator_per_checkpoint(runs_dir, tmp_path):
    metrics, _ = evaluated(
        runs_dir,
        tmp_path,
        "strategy=ensemble",
        "calibration=temperature",
        "calibration.stage=member",
    )
    fitted = metrics["calibration_fit"]
    assert sorted(fitted) == [f"temperature.m{m}" for m in range(metrics["models"])]
    assert len(set(fitted.values())) == metrics["models"]  # each fold its own
    assert metrics["ece_calibrated"] <= metrics["ece"]


@pytest.mark.slow
def test_a_holdout_of_the_test_split_is_fitted_on_and_never_scored(runs_dir, tmp_path):
    metrics, rows = evaluated(
        runs_dir, tmp_path, "calibration=temperature", "calibration.holdout_fraction=0.5"
    )
    held = calibration_ids(tmp_path)
    scored = [row["index"] for row in rows]
    test_ids = [str(i) for i in DigitsDataset(split="test").sample_ids]
    assert set(held).isdisjoint(scored)
    assert sorted(held + scored, key=int) == test_ids
    assert metrics["n"] == len(scored) == len(test_ids) // 2
    assert metrics["calibration_split"].startswith("holdout 0.5 of test")
    labels = [row["label"] for row in rows]
    assert all(abs(labels.count(str(c)) - 18) <= 1 for c in range(10))  # stratified: 36 each
    evaluated(
        runs_dir, tmp_path / "again", "calibration=temperature", "calibration.holdout_fraction=0.5"
    )
    assert calibration_ids(tmp_path / "again") == held  # fixed by the seed


@pytest.mark.slow
def test_conformal_sets_in_predictions_csv_match_the_metrics(runs_dir, tmp_path):
    metrics, rows = evaluated(runs_dir, tmp_path, "strategy=ensemble", "conformal=aps")
    sets = [row["prediction_set"].split("|") if row["prediction_set"] else [] for row in rows]
    assert [len(s) for s in sets] == [int(row["set_size"]) for row in rows]
    covered = sum(row["label"] in s for row, s in zip(rows, sets, strict=True)) / len(rows)
    assert metrics["coverage"] == pytest.approx(covered)
    assert metrics["mean_set_size"] == pytest.approx(sum(map(len, sets)) / len(rows))
    assert metrics["conformal_n"] == metrics["calibration_n"] == 180
    assert "calibration_fit" not in metrics  # conformal alone fits no calibrator


@pytest.mark.slow
def test_nonempty_sets_and_vector_scaling_use_separate_halves(runs_dir, tmp_path):
    metrics, rows = evaluated(
        runs_dir, tmp_path, "calibration=vector", "conformal=lac", "conformal.nonempty=true"
    )
    assert all(int(row["set_size"]) >= 1 for row in rows)
    assert metrics["calibration_n"] + metrics["conformal_n"] == 180
    assert len(metrics["calibration_fit"]) == 20  # a scale and a bias per class


@pytest.mark.slow
def test_predict_mode_writes_each_images_set(runs_dir, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    test = DigitsDataset(split="test")
    for position in range(12):
        pixels = (test.images[position, 0].numpy() * 255).round().astype("uint8")
        Image.fromarray(pixels, "L").save(folder / f"scan{position}.png")
    metrics, rows = evaluated(
        runs_dir,
        tmp_path / "run",
        "mode=predict",
        f"predict.root={folder}",
        "calibration=temperature",
        "conformal=raps",
    )
    assert len(rows) == 12 and metrics["calibration_split"] == "val"
    assert all(row["prediction_set"] is not None and row["set_size"] for row in rows)
    assert "coverage" not in metrics and metrics["mean_set_size"] >= 0


@pytest.mark.slow
def test_the_calibration_splits_outputs_come_from_the_store(runs_dir, tmp_path):
    store = tmp_path / "store"
    common = ["strategy=tta", "calibration=temperature", f"engine.store={store}"]
    first, _ = evaluated(runs_dir, tmp_path / "a", *common)
    second, _ = evaluated(runs_dir, tmp_path / "b", *common)
    assert first["calibration_passes_computed"] == first["forward_passes_per_image"]
    assert second["calibration_passes_computed"] == second["forward_passes_computed"] == 0
    assert second["ece_calibrated"] == pytest.approx(first["ece_calibrated"], abs=1e-9)


@pytest.mark.slow
def test_an_image_folder_without_a_val_folder_needs_one_named(runs_dir, tmp_path):
    from PIL import Image

    test = DigitsDataset(split="test")
    for name, positions in (("scored", range(0, 100)), ("calib", range(100, 200))):
        for position in positions:
            folder = tmp_path / name / str(int(test.labels[position]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (test.images[position, 0].numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels, "L").save(folder / f"{position}.png")
    folder_run = [
        "data=imagefolder",
        f"data.root={tmp_path / 'scored'}",
        f"ensemble.checkpoints=[{runs_dir}/fold_0/weights/best.pt]",
        "calibration=temperature",
    ]
    with pytest.raises(UserError, match="data.val_root=DIR or calibration.holdout_fraction"):
        evaluated(runs_dir, tmp_path / "none", *folder_run)
    with pytest.raises(UserError, match="holds the scored images"):  # ids could not tell
        evaluated(runs_dir, tmp_path / "same", *folder_run, f"data.val_root={tmp_path / 'scored'}")
    metrics, rows = evaluated(
        runs_dir, tmp_path / "run", *folder_run, f"data.val_root={tmp_path / 'calib'}"
    )
    assert metrics["calibration_n"] == 100 and len(rows) == 100
    assert metrics["calibration_split"] == f"val_root {tmp_path / 'calib'}"
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["ece_calibrated"] == pytest.approx(metrics["ece_calibrated"])


@pytest.mark.slow
def test_a_calibrated_sweep_compares_calibration_and_sets(runs_dir, tmp_path):
    from .conftest import run_cli

    sweep = tmp_path / "sweep"
    result = run_cli(
        [
            "ml_infer",
            "-m",
            "strategy=standard,tta",
            "calibration=temperature",
            "conformal=lac",
            "tracking=none",
            f"runs_dir={runs_dir}",
            f"hydra.sweep.dir={sweep}",
            "engine.min_timing_s=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    table = (sweep / "comparison.md").read_text().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    runs = {
        json.loads(p.read_text())["strategy"]: json.loads(p.read_text())
        for p in sweep.glob("*/metrics.json")
    }
    for line in table[2:]:
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        metrics = runs[cells["strategy"]]
        assert cells["ece_calibrated"] == f"{metrics['ece_calibrated']:.4f}"
        assert cells["nll_calibrated"] == f"{metrics['nll_calibrated']:.4f}"
        assert cells["set_size (coverage)"] == (
            f"{metrics['mean_set_size']:.2f} ({metrics['coverage']:.3f})"
        )
    overlay = (sweep / "reliability.png").read_bytes()
    # A run whose bins are not data of the right shape is left out of the overlay, not fatal.
    hostile = next(sweep.glob("*_tta/metrics.json"))
    metrics = json.loads(hostile.read_text())
    metrics["reliability"]["raw"]["count"] = ["${oc.env:HOME}"]
    hostile.write_text(json.dumps(metrics))
    again = run_cli(["ml_infer.report", str(sweep)])
    assert again.returncode == 0, again.stderr[-2000:]
    assert (sweep / "reliability.png").read_bytes() != overlay  # redrawn with one curve

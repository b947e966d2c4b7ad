"""Runs under shift: every strategy and the accelerate runner score the corrupted images, the
store keys them apart, what is fitted is fitted on clean images, and a sweep over strategies x
corruptions x severities ends in the comparison under shift."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from ml_infer.bank import load_classifier
from ml_infer.data import DigitsDataset
from ml_infer.errors import UserError
from ml_infer.shift import corrupt, shift_of
from ml_infer.task import run_evaluation

from .conftest import compose_config, run_cli
from .test_distributed import torchrun

STRATEGIES = ["standard", "mixed_precision", "accelerate", "tta", "ensemble", "tta_ensemble"]


def evaluated(runs_dir: Path, out: Path, *overrides: str) -> tuple[dict, list[dict]]:
    metrics = run_evaluation(compose_config(list(overrides), runs_dir=runs_dir), output_dir=out)
    with (out / "predictions.csv").open(newline="") as handle:
        return metrics, list(csv.DictReader(handle))


@pytest.mark.slow
def test_the_model_sees_the_corrupted_images(runs_dir, fold_paths, tmp_path):
    """standard under shift predicts what the checkpoint predicts on images corrupted by hand."""
    overrides = ["shift=elastic_transform", "shift.severity=5"]
    metrics, rows = evaluated(runs_dir, tmp_path / "run", *overrides)
    assert metrics["shift"] == "elastic_transform" and metrics["severity"] == 5
    assert metrics["shift_applied"] is True and metrics["shift_mean_abs_change"] > 0.05
    data = DigitsDataset("test", image_size=(8, 8), channels=1)
    images = corrupt(data.pixels(), data.sample_ids, "digits", shift_of(compose_config(overrides)))
    classifier = load_classifier(fold_paths[0])
    with torch.inference_mode():
        model = classifier.model.eval()
        expected = model(classifier.input_spec.normalise(images)).argmax(dim=1)
    assert [int(row["pred"]) for row in rows] == expected.tolist()
    _, clean_rows = evaluated(runs_dir, tmp_path / "clean")
    changed = sum(a["pred"] != b["pred"] for a, b in zip(rows, clean_rows))
    assert changed > 0


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [*STRATEGIES, "cascade"])
def test_every_strategy_runs_under_shift(strategy, runs_dir, tmp_path):
    shifted, rows = evaluated(
        runs_dir,
        tmp_path / "shifted",
        f"strategy={strategy}",
        "shift=zoom_blur",
        "shift.severity=5",
    )
    clean, clean_rows = evaluated(runs_dir, tmp_path / "clean", f"strategy={strategy}")
    assert shifted["shift"] == "zoom_blur" and shifted["shift_applied"] is True
    assert clean["shift"] == "none" and clean["severity"] == 0
    assert [r["index"] for r in rows] == [r["index"] for r in clean_rows]  # the same images
    assert any(a["prob_0"] != b["prob_0"] for a, b in zip(rows, clean_rows))
    # The baseline of the paired comparison is standard on the same corrupted images.
    standard, _ = evaluated(runs_dir, tmp_path / "standard", "shift=zoom_blur", "shift.severity=5")
    delta = shifted["accuracy"] - standard["accuracy"]
    assert shifted["accuracy_delta_vs_standard"] == pytest.approx(delta, abs=1e-6)


@pytest.mark.slow
def test_severity_zero_is_the_clean_run_and_the_store_keys_each_severity(runs_dir, tmp_path):
    store = tmp_path / "store"
    common = ["strategy=ensemble", f"engine.store={store}"]
    _, clean_rows = evaluated(runs_dir, tmp_path / "clean", *common)
    zero, zero_rows = evaluated(
        runs_dir, tmp_path / "zero", *common, "shift=pixelate", "shift.severity=0"
    )
    assert zero_rows == clean_rows and zero["forward_passes_computed"] == 0
    first, _ = evaluated(runs_dir, tmp_path / "s2", *common, "shift=pixelate", "shift.severity=2")
    other, _ = evaluated(runs_dir, tmp_path / "s3", *common, "shift=pixelate", "shift.severity=3")
    again, _ = evaluated(runs_dir, tmp_path / "s2b", *common, "shift=pixelate", "shift.severity=2")
    assert first["forward_passes_computed"] == other["forward_passes_computed"] == 3  # 3 folds
    assert again["forward_passes_computed"] == 0
    entries = [json.loads(p.read_text()) for p in store.glob("*/*.json")]
    assert {e["parts"].get("shift", {}).get("severity") for e in entries} >= {None, 2, 3}


@pytest.mark.slow
def test_what_a_strategy_fits_it_fits_on_clean_images(runs_dir, tmp_path):
    calibrated = ["calibration=temperature", "conformal=lac"]
    clean, _ = evaluated(runs_dir, tmp_path / "clean", *calibrated)
    shifted, _ = evaluated(
        runs_dir, tmp_path / "shifted", *calibrated, "shift=gaussian_noise", "shift.severity=5"
    )
    assert shifted["calibration_fit"] == clean["calibration_fit"]
    assert shifted["conformal_threshold"] == clean["conformal_threshold"]
    assert shifted["calibration_n"] == clean["calibration_n"]


def test_tuning_refuses_a_shift(runs_dir, tmp_path):
    cfg = compose_config(["mode=tune", "shift=pixelate"], runs_dir=runs_dir)
    with pytest.raises(UserError, match="mode=tune chooses on the clean calibration split"):
        run_evaluation(cfg, output_dir=tmp_path)


@pytest.mark.slow
def test_two_processes_under_shift_give_the_one_process_answer(runs_dir, tmp_path):
    shift = ["shift=motion_blur", "shift.severity=4", "strategy=accelerate", "data.batch_size=50"]
    torchrun(tmp_path / "two", f"runs_dir={runs_dir}", "tracking=none", *shift)
    single = run_evaluation(compose_config(shift, runs_dir=runs_dir), output_dir=tmp_path / "one")
    multi = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert multi["processes"] == 2 and multi["shift"] == "motion_blur"
    for key in ("n", "accuracy", "nll", "ece"):
        assert multi[key] == single[key], key
    two = (tmp_path / "two" / "predictions.csv").read_text()
    assert two == (tmp_path / "one" / "predictions.csv").read_text()


@pytest.mark.slow
def test_a_shift_sweep_runs_clean_once_and_compares_under_shift(runs_dir, tmp_path):
    sweep = tmp_path / "sweep"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli(
        [
            "ml_infer",
            "-m",
            "+experiment=shift",
            f"runs_dir={runs_dir}",
            f"tracking.uri={store}",
            f"hydra.sweep.dir={sweep}",
            "strategy=standard,ensemble",
            "shift=none,saturate,gaussian_noise,contrast",
            "shift.severity=1,3",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in sweep.iterdir() if (p / "metrics.json").is_file())
    assert len(runs) == 2 * (1 + 3 * 2)  # clean once per strategy, not once per severity
    assert sum("_none_0" in name for name in runs) == 2
    report = (sweep / "comparison.md").read_text()
    assert (
        "## Under shift" in report and "Not applied to these images (left out): saturate" in report
    )
    with (sweep / "shift.csv").open(newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert {(c["corruption"], c["severity"]) for c in cells} == {
        (name, str(s)) for name in ("gaussian_noise", "contrast") for s in (1, 3)
    }
    standard = [c for c in cells if c["strategy"] == "strategy=standard"]
    assert all(float(c["delta_vs_standard"]) == 0 for c in standard)
    # The per-severity delta is the mean over corruptions of the runs' accuracy differences.
    line = next(row for row in report.splitlines() if row.startswith("| strategy=ensemble |"))
    delta_at_3 = float(line.split("|")[-2].split()[0])
    ensemble = {
        (c["corruption"], c["severity"]): c for c in cells if c["strategy"] == "strategy=ensemble"
    }
    expected = (
        sum(
            float(ensemble[(name, "3")]["delta_vs_standard"])
            for name in ("gaussian_noise", "contrast")
        )
        / 2
    )
    assert delta_at_3 == pytest.approx(expected, abs=1e-4)
    standard_line = next(
        row for row in report.splitlines() if row.startswith("| strategy=standard |")
    )
    assert standard_line.split("|")[4].strip() == "100.0 (2)"  # mCE of standard, 2 corruptions
    for picture in ("shift_heatmap.png", "shift_severity.png", "pareto.png"):
        assert (sweep / picture).stat().st_size > 10_000
    assert "forward passes computed for predictions" in result.stdout
    # The same comparison read back from MLflow (no predictions there: no deltas, the rest).
    report = run_cli(
        [
            "ml_infer.report",
            "ml_infer-digits",
            "--tracking-uri",
            store,
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert report.returncode == 0, report.stderr[-2000:]
    from_mlflow = (tmp_path / "r" / "comparison.md").read_text()
    assert "## Under shift" in from_mlflow and "| strategy=standard | 0.9" in from_mlflow
    assert from_mlflow.count("shift=none") == 2  # the clean table holds only the clean runs


@pytest.mark.slow
def test_hydras_own_plugin_scan_loads_the_sweeper():
    """Run from the repository root, Hydra's scan of `hydra_plugins` executes the sweeper's
    module itself (outside sys.modules): the training app must still start."""
    result = run_cli(["ml_infer.train", "--cfg", "job"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "folds:" in result.stdout


@pytest.mark.slow
def test_ml_inference_takes_shift_and_severity(runs_dir, fold_paths, tmp_path):
    result = run_cli(
        [
            "ml_infer.cli",
            "--checkpoint_path",
            str(fold_paths[0]),
            "--shift",
            "jpeg_compression",
            "--severity",
            "2",
            "tracking=none",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "shift=jpeg_compression shift.severity=2" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["shift"], metrics["severity"], metrics["shift_applied"]) == (
        "jpeg_compression",
        2,
        True,
    )
    bad = run_cli(["ml_infer.cli", "--checkpoint_path", str(fold_paths[0]), "--shift", "fog"])
    assert bad.returncode != 0
    assert "invalid choice: 'fog'" in bad.stderr and "gaussian_noise" in bad.stderr

"""Bad input: a one-line error naming the bad value (and the valid ones), a non-zero exit, no
traceback, and no result files written. Run as real subprocesses, as a user would meet them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from ml_infer.checkpoints import read_checkpoint
from ml_infer.config import options

from .conftest import run_cli


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def evaluate_cli(run_dir: Path, runs_dir: Path, *overrides: str):
    args = [f"hydra.run.dir={run_dir}", f"runs_dir={runs_dir}", "tracking=none", *overrides]
    return run_cli(["ml_infer", *args])


def assert_nothing_written(run_dir: Path) -> None:
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "predictions.csv").exists()
    assert not list(run_dir.glob("*.partial"))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (
            ["strategy=fastest"],
            [
                "unknown strategy 'fastest'",
                f"valid: {', '.join(options('strategy'))}",
            ],
        ),
        (
            ["tta.augmentations=[horizontal_flip,mirror]"],
            ["unknown augmentation 'mirror'", f"valid: {', '.join(options('augmentation'))}"],
        ),
        (
            ["tta.aggregation=avg"],
            ["unknown TTA aggregation 'avg'", f"valid: {', '.join(options('tta_aggregation'))}"],
        ),
        (
            ["ensemble.aggregation=average"],
            [
                "unknown ensemble aggregation 'average'",
                f"valid: {', '.join(options('ensemble_aggregation'))}",
            ],
        ),
        (["-m", "strategy=standard,nope"], ["unknown strategy 'nope'"]),
        (["tta=everything"], ["unknown tta 'everything'", f"valid: {', '.join(options('tta'))}"]),
        (["strategy='fastest'"], ["unknown strategy 'fastest'"]),
    ],
)
def test_unknown_names_are_answered_before_any_work(overrides, fragments, tmp_path):
    result = run_cli(
        ["ml_infer", f"hydra.run.dir={tmp_path}", *overrides],
        timeout=60,
        env={"PYTHONPROFILEIMPORTTIME": "1"},  # stderr lists every module imported
    )
    imports = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    assert_one_line_error(
        subprocess.CompletedProcess(
            result.args, result.returncode, result.stdout, "\n".join(errors)
        ),
        *fragments,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in imports}
    assert "ml_infer.config" in imported
    assert not imported & {"torch", "torchvision", "mlflow", "torchmetrics"}
    assert not list(tmp_path.iterdir())  # nothing written, not even Hydra's run dir


@pytest.mark.slow
def test_missing_checkpoint(runs_dir, tmp_path):
    missing = tmp_path / "nowhere" / "best.pt"
    result = evaluate_cli(tmp_path / "run", runs_dir, f"ensemble.checkpoints=[{missing}]")
    assert_one_line_error(result, f"checkpoint not found: {missing}")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.slow
def test_glob_matching_no_checkpoint(tmp_path):
    result = evaluate_cli(tmp_path / "run", tmp_path / "empty", "strategy=ensemble")
    assert_one_line_error(result, "no checkpoint matches", "fold_*")


@pytest.mark.slow
def test_truncated_checkpoint(fold_paths, runs_dir, tmp_path):
    data = fold_paths[0].read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    result = evaluate_cli(tmp_path / "run", runs_dir, f"ensemble.checkpoints=[{truncated}]")
    assert_one_line_error(result, f"checkpoint {truncated} is corrupt or truncated")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.slow
def test_ensemble_members_with_different_classes(fold_paths, runs_dir, tmp_path):
    contents, _ = read_checkpoint(fold_paths[1])
    contents["classes"] = [*contents["classes"][:-1], "nine"]
    renamed = tmp_path / "renamed.pt"
    torch.save(contents, renamed)
    result = evaluate_cli(
        tmp_path / "run",
        runs_dir,
        "strategy=ensemble",
        f"ensemble.checkpoints=[{fold_paths[0]},{renamed}]",
    )
    assert_one_line_error(result, "ensemble members disagree on classes", "'nine'")
    assert_nothing_written(tmp_path / "run")


@pytest.mark.slow
def test_wrong_number_of_ensemble_weights(runs_dir, tmp_path):
    result = evaluate_cli(
        tmp_path / "run",
        runs_dir,
        "strategy=ensemble",
        "ensemble=weighted",
        "ensemble.weights=[0.5,0.5]",
    )
    assert_one_line_error(result, "2 ensemble weights for 3 checkpoints")


@pytest.mark.slow
def test_negative_ensemble_weight(runs_dir, tmp_path):
    result = evaluate_cli(
        tmp_path / "run",
        runs_dir,
        "strategy=ensemble",
        "ensemble=weighted",
        "ensemble.weights=[0.5,-1,0.5]",
    )
    assert_one_line_error(result, "must be non-negative", "-1.0")


@pytest.mark.slow
def test_full_traceback_on_request(tmp_path):
    args = ["ml_infer", f"hydra.run.dir={tmp_path}", "ensemble.checkpoints=[/no/such.pt]"]
    result = run_cli(args, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "checkpoint not found" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["data=imagefolder"], ["data=imagefolder needs data.root=DIR"]),
        (["data.num_workers=-1"], ["data.num_workers must be 0 or more, got -1"]),
        (
            ["model=resnet18", "model.name=resnet_bogus"],
            ["unknown torchvision model 'resnet_bogus'"],
        ),
        (["ensemble.checkpoints=null"], ["ensemble.checkpoints is empty"]),
    ],
)
def test_more_bad_input_is_one_line(overrides, fragments, runs_dir, tmp_path):
    result = evaluate_cli(tmp_path / "run", runs_dir, *overrides)
    assert_one_line_error(result, *fragments)
    assert_nothing_written(tmp_path / "run")


@pytest.mark.slow
def test_a_sweep_with_a_failing_job_reports_the_others_and_exits_2(runs_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        [
            "ml_infer",
            "-m",
            "ensemble.weights=null,[1,2]",
            "strategy=ensemble",
            f"runs_dir={runs_dir}",
            "tracking=none",
            "engine.min_timing_s=0",
            f"hydra.sweep.dir={sweep_dir}",
        ]
    )
    assert result.returncode == 2
    assert (sweep_dir / "0_ensemble" / "metrics.json").is_file()
    assert not (sweep_dir / "1_ensemble" / "metrics.json").exists()
    assert (
        "2 ensemble weights for 3 checkpoints"
        in (sweep_dir / "1_ensemble" / "error.txt").read_text()
    )
    assert (sweep_dir / "comparison.md").read_text().count("\n") == 3  # header, rule, one run
    assert "error: run 1_ensemble failed: 2 ensemble weights for 3 checkpoints" in result.stderr
    assert "Traceback" not in result.stderr

    # A later sweep into the same directory, started at once, reports its own runs only: the
    # earlier sweep's failure and a run of another strategy left there are not counted.
    old_run = sweep_dir / "5_tta"
    old_run.mkdir()
    (old_run / "metrics.json").write_text(
        (sweep_dir / "0_ensemble" / "metrics.json").read_text().replace('"ensemble"', '"tta"')
    )
    again = run_cli(
        [
            "ml_infer",
            "-m",
            "strategy=ensemble",
            f"runs_dir={runs_dir}",
            "tracking=none",
            "engine.min_timing_s=0",
            f"hydra.sweep.dir={sweep_dir}",
        ]
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "failed" not in again.stderr
    assert (sweep_dir / "comparison.md").read_text().count("\n") == 3
    assert "| tta |" not in (sweep_dir / "comparison.md").read_text()
    rebuilt = run_cli(["ml_infer.report", str(sweep_dir), "--out", str(tmp_path / "report")])
    assert rebuilt.returncode == 0, rebuilt.stderr[-2000:]
    assert (tmp_path / "report" / "comparison.md").read_text().count("\n") == 3

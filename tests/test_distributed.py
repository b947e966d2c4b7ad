"""Multi-process evaluation under torchrun: the same answer as one process, one MLflow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ml_infer.task import run_evaluation

from .conftest import CONF, REPO, compose_config, free_port

COMPARED = ("n", "accuracy", "macro_f1", "nll", "ece", "brier", "views", "models")
# 360 test images in batches of 50: 8 batches, not divisible across 2 processes (4 x 2 x 50 = 400).
UNEVEN = ["data.batch_size=50"]


def torchrun(
    run_dir: Path, *overrides: str, processes: int = 2, multirun: bool = False
) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "ml_infer",
        *(["-m"] if multirun else []),
        f"hydra.run.dir={run_dir}",
        "engine.min_timing_s=0",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_same_results(multi_dir: Path, single_dir: Path, single: dict) -> None:
    multi = json.loads((multi_dir / "metrics.json").read_text())
    assert multi["processes"] == 2 and single["processes"] == 1
    for key in COMPARED:
        assert multi[key] == single[key], key
    multi_rows = (multi_dir / "predictions.csv").read_text().splitlines()
    assert len(multi_rows) == 1 + 360  # header + exactly one row per test image
    assert multi_rows == (single_dir / "predictions.csv").read_text().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ["strategy=accelerate"],
        ["strategy=tta_ensemble", "strategy.runner=accelerate", "tta=flips"],
        ["strategy=accelerate", "calibration=temperature", "conformal=aps"],
    ],
    ids=["accelerate", "tta_ensemble", "calibrated_with_sets"],
)
def test_two_processes_give_the_one_process_answer(overrides, runs_dir, tmp_path):
    torchrun(tmp_path / "two", f"runs_dir={runs_dir}", "tracking=none", *UNEVEN, *overrides)
    single = run_evaluation(
        compose_config([*UNEVEN, *overrides], runs_dir=runs_dir), output_dir=tmp_path / "one"
    )
    assert_same_results(tmp_path / "two", tmp_path / "one", single)


@pytest.mark.slow
def test_a_sweep_under_two_processes_runs_every_job_on_the_same_process_group(runs_dir, tmp_path):
    # The process group lives until the processes exit: ending it after a run would break the
    # sweep's next run.
    sweep_dir = tmp_path / "sweep"
    torchrun(
        tmp_path / "unused",
        "strategy=accelerate,ensemble",
        "strategy.runner=accelerate",
        f"runs_dir={runs_dir}",
        "tracking=none",
        f"hydra.sweep.dir={sweep_dir}",
        multirun=True,
    )
    for job in ("0_accelerate", "1_ensemble"):
        metrics = json.loads((sweep_dir / job / "metrics.json").read_text())
        assert metrics["processes"] == 2 and metrics["n"] == 360, job
    assert (sweep_dir / "comparison.md").read_text().count("\n") == 4  # header, rule, two runs


@pytest.mark.slow
def test_a_two_process_run_makes_one_mlflow_run(runs_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = torchrun(
        tmp_path / "run",
        f"runs_dir={runs_dir}",
        f"tracking.uri={uri}",
        "strategy=accelerate",
        *UNEVEN,
    )
    assert result.stdout.count("accuracy 0.") == 1  # one summary: only the main process reports
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("ml_infer-digits").experiment_id])
    assert len(runs) == 1
    assert runs[0].data.params["processes"] == "2" and runs[0].data.params["n"] == "360"
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name != ".hydra") == [
        "__main__.log",
        "confusion_matrix.png",
        "fixed_broken.png",
        "metrics.json",
        "mlflow_run.json",
        "predictions.csv",
        "resolved_config.yaml",
    ]


@pytest.mark.parametrize(
    ("launcher", "target"),
    [
        ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"),
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ],
)
def test_launchers_compose(launcher, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"hydra/launcher={launcher}", "+experiment=compare_all"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_ == target
    assert "standard" in cfg.hydra.sweeper.params["+comparison"]
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.timeout_min == 60

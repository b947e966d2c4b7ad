"""A tracking store that fails: a corrupt sqlite file, a server that dies mid-sweep and comes
back. Results stay local, the user reads one short line, and `report --sync` logs what was
missed. Real stores only: sqlite files and a real `mlflow server` subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ml_infer.outputs import MLFLOW_PENDING_FILE, MLFLOW_RUN_FILE, remove_stale_results
from ml_infer.tracking import TrackingFailed, preflight

from .conftest import REPO, free_port, run_cli, start_server, stop_server
from .test_tracking import SWEPT, client_for

THIRD_PARTY_NOISE = ("Traceback", "[SQL:", "sqlalche.me", "alembic", "sqlalchemy.exc")


def corrupt_sqlite(path: Path) -> str:
    path.write_bytes(os.urandom(8192))
    return f"sqlite:///{path}"


@pytest.mark.slow
def test_preflight_refuses_a_corrupt_store_in_one_short_line(tmp_path):
    uri = corrupt_sqlite(tmp_path / "corrupt.db")
    with pytest.raises(TrackingFailed) as refused:
        preflight({"backend": "mlflow", "uri": uri, "experiment": "e"})
    assert str(refused.value) == (
        f"tracking store {uri} cannot be used: (sqlite3.DatabaseError) file is not a database"
    )


@pytest.mark.slow
def test_preflight_passes_a_good_store_and_no_tracking(tmp_path):
    uri = f"sqlite:///{tmp_path / 'good.db'}"
    preflight({"backend": "mlflow", "uri": uri, "experiment": "e"})
    assert (tmp_path / "good.db").stat().st_size > 0
    preflight({"backend": "none"})
    preflight(None)


def test_preflight_names_an_unreachable_server(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingFailed) as refused:
        preflight({"backend": "mlflow", "uri": uri, "experiment": "e"})
    assert str(refused.value) == f"tracking server {uri} is unreachable (connection refused)"


def test_a_reused_run_dir_loses_its_tracking_markers(tmp_path):
    for name in (MLFLOW_RUN_FILE, MLFLOW_PENDING_FILE, "metrics.json"):
        (tmp_path / name).write_text("{}")
    remove_stale_results(tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_corrupt_store_costs_one_warning_line(runs_dir, tmp_path):
    uri = corrupt_sqlite(tmp_path / "corrupt.db")
    run_dir = tmp_path / "run"
    result = run_cli(
        [
            "ml_infer",
            f"hydra.run.dir={run_dir}",
            f"runs_dir={runs_dir}",
            f"tracking.uri={uri}",
            "engine.min_timing_s=0",
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    mentions = [line for line in output.splitlines() if "corrupt.db" in line]
    assert mentions == [
        f"[WARNING] MLflow tracking to {uri} failed while starting the run: "
        "(sqlite3.DatabaseError) file is not a database; results are in the run directory only"
    ]
    assert not any(noise in output for noise in THIRD_PARTY_NOISE), output[-3000:]
    assert (run_dir / "metrics.json").is_file() and (run_dir / "predictions.csv").is_file()
    pending = json.loads((run_dir / MLFLOW_PENDING_FILE).read_text())
    assert pending["reason"] == "(sqlite3.DatabaseError) file is not a database"
    assert not (run_dir / MLFLOW_RUN_FILE).exists()

    required = run_cli(
        [
            "ml_infer",
            f"hydra.run.dir={tmp_path / 'required'}",
            f"runs_dir={runs_dir}",
            f"tracking.uri={uri}",
            "tracking.required=true",
            "engine.min_timing_s=0",
        ]
    )
    assert required.returncode == 2
    (line,) = required.stderr.strip().splitlines()
    assert line.startswith("error: ") and uri in line and len(line) < 250
    assert line.endswith(": (sqlite3.DatabaseError) file is not a database")
    assert not any(noise in required.stdout + required.stderr for noise in THIRD_PARTY_NOISE)


@pytest.mark.slow
def test_a_server_dying_mid_sweep_and_sync_later(runs_dir, tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "store"
    store.mkdir()
    sweep_dir = tmp_path / "sweep"
    with (tmp_path / "server.log").open("a") as log:
        server = start_server(port, store, log)
        try:
            sweep = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ml_infer",
                    "-m",
                    f"strategy={','.join(SWEPT)}",
                    f"runs_dir={runs_dir}",
                    f"tracking.uri={uri}",
                    f"hydra.sweep.dir={sweep_dir}",
                    "engine.min_timing_s=0",
                ],
                cwd=tmp_path,
                env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            first_metrics = sweep_dir / "0_standard" / "metrics.json"
            deadline = time.monotonic() + 300
            while not first_metrics.is_file():
                assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
                time.sleep(0.05)
            stop_server(server, signal.SIGKILL)  # the server crashes
            stdout, stderr = sweep.communicate(timeout=600)
        finally:
            stop_server(server, signal.SIGKILL)
        check_the_sweep_outlived_the_server(uri, sweep_dir, sweep.returncode, stdout, stderr)

        # The server comes back on the same port and store; --sync logs the missing runs.
        server = start_server(port, store, log)
        try:
            check_sync(uri, sweep_dir, cwd=tmp_path)
        finally:
            stop_server(server)


def check_the_sweep_outlived_the_server(
    uri: str, sweep_dir: Path, returncode: int, stdout: str, stderr: str
) -> None:
    assert returncode == 0, stderr[-3000:]
    assert "Traceback" not in stdout + stderr

    # One line at the end says what was not logged and what to run.
    summary = [line for line in stderr.splitlines() if "not logged" in line]
    assert len(summary) == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == summary[0]
    match = re.fullmatch(
        rf"warning: ([23]) of 3 runs were not logged to {re.escape(uri)} \(connection refused"
        rf"(, and other reasons)?\); log them later with: python -m ml_infer\.report "
        rf"{re.escape(str(sweep_dir))} --sync",
        summary[0],
    )
    assert match, summary[0]
    missed = int(match.group(1))
    job_dirs = [sweep_dir / f"{job}_{strategy}" for job, strategy in enumerate(SWEPT)]
    pending = [d for d in job_dirs if (d / MLFLOW_PENDING_FILE).is_file()]
    assert len(pending) == missed and job_dirs[1] in pending and job_dirs[2] in pending
    for job_dir in job_dirs:  # each run is either logged or pending, not both
        assert (job_dir / MLFLOW_RUN_FILE).is_file() != (job_dir in pending)
    # Each job that could not log said so once, in one line.
    warned = [line for line in stdout.splitlines() if f"MLflow tracking to {uri} failed" in line]
    assert len(warned) == missed, stdout[-3000:]
    parent_marker = json.loads((sweep_dir / "mlflow_parent_run.json").read_text())
    assert parent_marker["closed"] is False and parent_marker["status"] == "FAILED"


def check_sync(uri: str, sweep_dir: Path, cwd: Path) -> None:
    missed = len(list(sweep_dir.glob(f"*/{MLFLOW_PENDING_FILE}")))
    synced = run_cli(["ml_infer.report", str(sweep_dir), "--sync"], cwd=cwd)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert f"logged {missed} run(s) of {sweep_dir} to {uri}" in synced.stdout
    assert "(closed FAILED)" in synced.stdout

    client = client_for(uri)
    experiment = client.get_experiment_by_name("ml_infer-digits")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert parent.info.status == "FAILED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    by_strategy = {r.data.params["strategy.name"]: r for r in children}
    assert set(by_strategy) == set(SWEPT)
    for job, strategy in enumerate(SWEPT):
        job_dir = sweep_dir / f"{job}_{strategy}"
        run = by_strategy[strategy]
        local = json.loads((job_dir / "metrics.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.params["tta.views"] == str(local["views"])
        assert run.data.tags["checkpoint_sha256"] == ",".join(local["checkpoint_sha256"])
        for key in ("accuracy", "nll", "ece", "images_per_s", "accuracy_delta_vs_standard"):
            assert run.data.metrics[key] == pytest.approx(local[key], rel=1e-9), key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"metrics.json", "predictions.csv", "resolved_config.yaml"} <= artifacts
        assert json.loads((job_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == run.info.run_id
        assert not (job_dir / MLFLOW_PENDING_FILE).exists()
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "pareto.png"} <= parent_artifacts

    # A second --sync finds nothing to do.
    again = run_cli(["ml_infer.report", str(sweep_dir), "--sync"], cwd=cwd)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"nothing to sync in {sweep_dir}: every run is logged to MLflow"
    after = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_id for r in after) == sorted(r.info.run_id for r in runs)
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


@pytest.mark.slow
def test_report_sync_needs_a_sweep_directory(tmp_path):
    result = run_cli(["ml_infer.report", str(tmp_path / "missing"), "--sync"], cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: --sync needs a sweep directory; {tmp_path / 'missing'} is not one"
    )


@pytest.mark.slow
def test_the_parent_is_closed_failed_when_the_store_answers_again_at_sweep_end(tmp_path):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from ml_infer.tracking import MLflowSweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("e")).info.run_id
    sweep_dir = tmp_path / "sweep"
    for job, marker in (("0_standard", MLFLOW_RUN_FILE), ("1_tta", MLFLOW_PENDING_FILE)):
        (sweep_dir / job).mkdir(parents=True)
        (sweep_dir / job / marker).write_text(
            json.dumps({"sweep_id": "s1", "uri": uri, "cause": "connection refused"})
        )
    (sweep_dir / "2_tta").mkdir()  # a run of an earlier sweep into the same directory
    (sweep_dir / "2_tta" / MLFLOW_PENDING_FILE).write_text(json.dumps({"sweep_id": "s0"}))
    (sweep_dir / "mlflow_parent_run.json").write_text(json.dumps({"run_id": parent, "uri": uri}))
    config = OmegaConf.create({"tracking": {"backend": "mlflow", "uri": uri, "experiment": "e"}})

    summary = MLflowSweep._close_parent(config, sweep_dir, "s1")
    assert summary == (
        f"warning: 1 of 2 runs were not logged to {uri} (connection refused); log them later "
        f"with: python -m ml_infer.report {sweep_dir} --sync"
    )
    assert client.get_run(parent).info.status == "FAILED"
    marker = json.loads((sweep_dir / "mlflow_parent_run.json").read_text())
    assert marker["closed"] is True and marker["status"] == "FAILED"

"""MLflow runs are live: RUNNING while the evaluation runs, then FINISHED, FAILED or KILLED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest

import ml_infer.task
from ml_infer.errors import UserError
from ml_infer.outputs import MLFLOW_PENDING_FILE, MLFLOW_RUN_FILE
from ml_infer.task import run_evaluation
from ml_infer.tracking import sync_sweep
from ml_infer.tracking.store import PARENT_RUN_FILE

from .conftest import REPO, compose_config, free_port, start_server, stop_server

pytestmark = pytest.mark.slow  # each imports mlflow (4 s)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_runs(client):
    experiment = client.get_experiment_by_name("ml_infer-digits")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_a_run_is_running_in_the_store_while_it_is_evaluated(runs_dir, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(["tracking=mlflow", f"tracking.uri={uri}"], runs_dir=runs_dir)
    client = client_for(uri)
    seen_during = []
    real_evaluate = ml_infer.task._evaluate

    def evaluate_and_look(cfg):
        seen_during.extend(experiment_runs(client))  # what the UI lists while images are scored
        return real_evaluate(cfg)

    monkeypatch.setattr(ml_infer.task, "_evaluate", evaluate_and_look)
    metrics = run_evaluation(cfg, output_dir=tmp_path / "run")

    (during,) = seen_during
    assert during.info.status == "RUNNING" and during.info.end_time is None
    assert during.data.tags["strategy"] == "standard"
    assert during.data.tags["data"] == "digits/test"
    assert during.data.tags["mlflow.source.type"] == "LOCAL"
    assert during.data.tags["run_dir"] == str((tmp_path / "run").resolve())
    assert not during.data.metrics  # the figures come when the evaluation has them
    (after,) = experiment_runs(client)
    assert after.info.run_id == during.info.run_id
    assert after.info.status == "FINISHED"
    assert after.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert after.data.tags["checkpoint_sha256"] == ",".join(metrics["checkpoint_sha256"])
    started = datetime.fromisoformat(metrics["started_at"]).timestamp() * 1000
    assert after.info.start_time == pytest.approx(started, abs=1)
    marker = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())
    assert marker["run_id"] == after.info.run_id


def test_a_store_lost_during_the_run_leaves_its_live_run_for_sync_to_replace(
    runs_dir, tmp_path, monkeypatch
):
    """The server answers when the run starts and is gone when it ends: the run directory names
    the live run as partial, and --sync, once the server is back, replaces it with one complete
    run (not a second one beside it)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "store").mkdir()
    run_dir = tmp_path / "sweep" / "0_standard"
    real_evaluate = ml_infer.task._evaluate
    with (tmp_path / "server.log").open("a") as log:
        server = start_server(port, tmp_path / "store", log)
        try:

            def evaluate_then_lose_the_server(cfg):
                evaluation = real_evaluate(cfg)
                stop_server(server, signal.SIGKILL)
                return evaluation

            monkeypatch.setattr(ml_infer.task, "_evaluate", evaluate_then_lose_the_server)
            cfg = compose_config(["tracking=mlflow", f"tracking.uri={uri}"], runs_dir=runs_dir)
            metrics = run_evaluation(cfg, output_dir=run_dir)
        finally:
            stop_server(server, signal.SIGKILL)
        pending = json.loads((run_dir / MLFLOW_PENDING_FILE).read_text())
        assert pending["partial_run_id"] and "connection refused" in pending["cause"]

        server = start_server(port, tmp_path / "store", log)
        try:
            result = sync_sweep(tmp_path / "sweep", say=lambda line: None)
            runs = experiment_runs(client_for(uri))  # (sync made the sweep a parent run)
            (run,) = [r for r in runs if r.data.tags.get("sweep") != "true"]
        finally:
            stop_server(server)
    assert [path for path, _ in result.logged] == [run_dir]
    assert run.info.status == "FINISHED" and run.info.run_id != pending["partial_run_id"]
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert json.loads((run_dir / MLFLOW_RUN_FILE).read_text())["run_id"] == run.info.run_id


def test_a_run_that_fails_is_failed_in_the_store_with_its_error(runs_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    missing = tmp_path / "fold_9" / "best.pt"
    cfg = compose_config(
        ["tracking=mlflow", f"tracking.uri={uri}", f"ensemble.checkpoints=[{missing}]"],
        runs_dir=runs_dir,
    )
    with pytest.raises(UserError) as raised:
        run_evaluation(cfg, output_dir=tmp_path / "run")
    (run,) = experiment_runs(client_for(uri))
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["error"] == str(raised.value) and str(missing) in run.data.tags["error"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "mlflow_run.json").exists()


def test_a_stopped_sweep_leaves_its_run_and_parent_killed(runs_dir, tmp_path):
    """Ctrl-C during the second job of a sweep: the first run stays FINISHED, the interrupted one
    and the sweep's parent end KILLED, none is left RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_dir = tmp_path / "sweep"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ml_infer",
            "-m",
            "strategy=standard,tta_ensemble",
            f"runs_dir={runs_dir}",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={sweep_dir}",
            "engine.min_timing_s=60",  # keeps the second job busy for a minute
            "engine.progress=false",
        ],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (sweep_dir / PARENT_RUN_FILE).is_file():  # the store exists: safe to read
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        client = client_for(uri)
        while not any(
            r.data.tags.get("strategy") == "tta_ensemble" for r in experiment_runs(client)
        ):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    runs = {r.data.tags.get("strategy", "parent"): r for r in experiment_runs(client)}
    assert set(runs) == {"standard", "tta_ensemble", "parent"}
    assert runs["standard"].info.status == "FINISHED"
    assert runs["tta_ensemble"].info.status == "KILLED"
    assert runs["tta_ensemble"].data.tags["error"] == "interrupted by SIGINT"
    assert runs["parent"].info.status == "KILLED"
    parent_marker = json.loads((sweep_dir / PARENT_RUN_FILE).read_text())
    assert parent_marker["status"] == "KILLED" and parent_marker["closed"] is True

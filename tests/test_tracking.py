"""MLflow tracking against real stores: an embedded sqlite file and a real `mlflow server`."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from ml_infer.outputs import MLFLOW_PENDING_FILE
from ml_infer.task import run_evaluation

from .conftest import compose_config, free_port, run_cli

SWEPT = ["standard", "tta", "ensemble"]


def sweep(
    tmp_path: Path, runs_dir: Path, uri: str, *extra: str
) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / "sweep"
    result = run_cli(
        [
            "ml_infer",
            "-m",
            f"strategy={','.join(SWEPT)}",
            f"runs_dir={runs_dir}",
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={sweep_dir}",
            *extra,
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result, sweep_dir


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_sweep_was_tracked(uri: str, sweep_dir: Path) -> None:
    client = client_for(uri)
    experiment = client.get_experiment_by_name("ml_infer-digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and len(runs) == 4
    by_strategy = {r.data.params["strategy.name"]: r for r in children}
    assert set(by_strategy) == set(SWEPT)

    for job, strategy in enumerate(SWEPT):
        run = by_strategy[strategy]
        local = json.loads((sweep_dir / f"{job}_{strategy}" / "metrics.json").read_text())
        assert run.info.status == "FINISHED"
        assert run.data.tags["strategy"] == strategy
        assert run.data.tags["data"] == "digits/test"
        assert run.data.tags["checkpoint_sha256"] == ",".join(local["checkpoint_sha256"])
        assert run.data.params["tta.views"] == str(local["views"])
        assert run.data.params["ensemble.models"] == str(local["models"])
        assert run.data.params["tta.aggregation"] == "mean"
        for key in (
            "accuracy",
            "macro_f1",
            "nll",
            "ece",
            "images_per_s",
            "forward_passes_per_image",
            "accuracy_delta_vs_standard",
            "mcnemar_p_vs_standard",
        ):
            assert run.data.metrics[key] == pytest.approx(local[key], rel=1e-9), key
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {
            "resolved_config.yaml",
            "predictions.csv",
            "metrics.json",
            "confusion_matrix.png",
        } <= artifacts
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.csv", "pareto.png"} <= parent_artifacts
    check_what_the_ui_shows(client, experiment, parent, by_strategy, sweep_dir)


def check_what_the_ui_shows(client, experiment, parent, by_strategy, sweep_dir: Path) -> None:
    """MLflow 3's UI opens the experiment on its runs table; counts are params; runs carry
    MLflow's user/source tags, their data as a dataset input and the evaluation's real span; the
    parent is dated and names the best runs and the Pareto front."""
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    digests = set()
    for job, strategy in enumerate(SWEPT):
        run = by_strategy[strategy]
        local = json.loads((sweep_dir / f"{job}_{strategy}" / "metrics.json").read_text())
        for count in ("n", "processes", "torch_threads", "timed_passes", "skipped_files"):
            assert run.data.params[count] == str(local[count]) and count not in run.data.metrics
        assert not {"views", "models"} & set(run.data.metrics)
        assert run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags["mlflow.source.name"] and run.data.tags["mlflow.user"]
        (data,) = run.inputs.dataset_inputs
        assert data.dataset.name == "digits/test"
        assert data.dataset.digest == local["data_digest"][:36]
        digests.add(data.dataset.digest)
        span = [
            datetime.fromisoformat(local[k]).timestamp() * 1000 for k in ("started_at", "ended_at")
        ]
        assert run.info.start_time == pytest.approx(span[0], abs=1)
        assert run.info.end_time == pytest.approx(span[1], abs=1)
        assert run.info.end_time - run.info.start_time > 100  # the evaluation, not the logging
    assert len(digests) == 1  # the same test images
    assert re.fullmatch(r"sweep \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", parent.info.run_name)
    with (sweep_dir / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    best = max(rows, key=lambda row: float(row["accuracy"]))
    assert parent.data.tags["best_by_accuracy"] == best["run"]
    assert parent.data.metrics["best_accuracy"] == pytest.approx(float(best["accuracy"]))
    lowest_nll = min(rows, key=lambda row: float(row["nll"]))
    assert parent.data.tags["best_by_nll"] == lowest_nll["run"]
    front = parent.data.tags["pareto_front"].split(", ")
    assert best["run"] in front and set(front) <= {row["run"] for row in rows}


def check_report_matches_runs(sweep_dir: Path) -> None:
    with (sweep_dir / "comparison.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["strategy"] for row in rows] == SWEPT
    for job, row in enumerate(rows):
        local = json.loads((sweep_dir / f"{job}_{row['strategy']}" / "metrics.json").read_text())
        for key in ("accuracy", "nll", "ece", "images_per_s", "accuracy_delta_vs_standard"):
            assert float(row[key]) == pytest.approx(local[key], rel=1e-9), key
    table = (sweep_dir / "comparison.md").read_text()
    assert table.count("\n") == 2 + len(SWEPT)
    assert (sweep_dir / "pareto.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sweep_into_embedded_sqlite_store(runs_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    result, sweep_dir = sweep(tmp_path, runs_dir, uri)
    check_sweep_was_tracked(uri, sweep_dir)
    output = result.stdout + result.stderr
    assert f"wrote {sweep_dir / 'comparison.md'} and {sweep_dir / 'pareto.png'}" in result.stdout
    assert "Creating initial MLflow database tables" not in output  # MLflow's own chatter
    assert "\N{RUNNER}" not in output and "View run" not in output
    check_report_matches_runs(sweep_dir)
    # The standard baseline (first fold, identity view, fp32) was computed once, by the standard
    # run, and served to the others from the sweep's prediction store with every other output.
    metrics_of = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
    assert [m["forward_passes_computed"] for m in metrics_of] == [1, 9, 2]
    assert len(list((sweep_dir / "store").rglob("*.npy"))) == 12
    metrics = {
        s: json.loads((sweep_dir / f"{i}_{s}" / "metrics.json").read_text())
        for i, s in enumerate(SWEPT)
    }
    for strategy in ("tta", "ensemble"):
        expected = metrics[strategy]["accuracy"] - metrics["standard"]["accuracy"]
        assert metrics[strategy]["accuracy_delta_vs_standard"] == pytest.approx(expected, abs=1e-6)

    # The report rebuilds from the MLflow experiment too.
    out = tmp_path / "report"
    result = run_cli(
        ["ml_infer.report", "ml_infer-digits", "--tracking-uri", uri, "--out", str(out)]
    )
    assert result.returncode == 0, result.stderr
    with (out / "comparison.csv").open() as handle:
        assert sorted(row["strategy"] for row in csv.DictReader(handle)) == sorted(SWEPT)


@pytest.mark.slow
def test_sweep_against_a_real_mlflow_server_with_the_joblib_launcher(
    runs_dir, tmp_path, mlflow_server
):
    _, sweep_dir = sweep(
        tmp_path, runs_dir, mlflow_server, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"
    )
    check_sweep_was_tracked(mlflow_server, sweep_dir)
    check_report_matches_runs(sweep_dir)


@pytest.mark.slow
def test_unreachable_store_warns_and_keeps_local_results(runs_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    result = run_cli(
        ["ml_infer", f"hydra.run.dir={run_dir}", f"runs_dir={runs_dir}", f"tracking.uri={uri}"]
    )
    assert result.returncode == 0, result.stderr
    assert f"MLflow tracking to {uri} failed" in result.stdout + result.stderr
    assert (run_dir / "metrics.json").is_file() and (run_dir / "predictions.csv").is_file()


@pytest.mark.slow
def test_required_tracking_fails_before_any_work(runs_dir, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # a reused run directory: an earlier run's results must not stay behind
    (run_dir / "metrics.json").write_text('{"accuracy": 0.5}')
    (run_dir / "predictions.csv").write_text("index,label,pred\n")
    result = run_cli(
        [
            "ml_infer",
            f"hydra.run.dir={run_dir}",
            f"runs_dir={runs_dir}",
            f"tracking.uri={uri}",
            "tracking.required=true",
        ]
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("error: ")
    ]
    assert len(result.stderr.strip().splitlines()) == 1
    assert uri in result.stderr and "unreachable" in result.stderr
    assert "forward passes per image" not in result.stdout  # the store is checked first
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "predictions.csv").exists()


def test_tracking_none_writes_no_store(runs_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default store sqlite:///outputs/mlflow.db would go
    cfg = compose_config(["tracking=none"], runs_dir=runs_dir)
    run_evaluation(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "outputs").exists()
    assert not list(tmp_path.rglob("*.db"))


@pytest.mark.slow  # imports mlflow (4 s); the fast loop keeps the untracked paths
def test_single_run_is_tracked_in_process(runs_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config(
        ["tracking=mlflow", f"tracking.uri={uri}", "strategy=ensemble"], runs_dir=runs_dir
    )
    client = client_for(uri)
    client.create_experiment("ml_infer-digits")  # as an earlier ml_infer made it: no kind
    metrics = run_evaluation(cfg, output_dir=tmp_path / "run")
    experiment = client.get_experiment_by_name("ml_infer-digits")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([client.get_experiment_by_name("ml_infer-digits").experiment_id])
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.metrics["accuracy"] == pytest.approx(metrics["accuracy"])
    assert run.data.params["ensemble.checkpoints"] == json.dumps(
        [f"{runs_dir}/fold_*/weights/best.pt"]
    )
    assert run.data.tags.get("git_commit") is None or len(run.data.tags["git_commit"]) == 40


SCORES = ("accuracy", "macro_f1", "nll", "ece", "brier", "accuracy_delta_vs_standard")


@pytest.mark.slow
def test_submitits_local_launcher_gives_the_basic_launchers_sweep(runs_dir, tmp_path):
    """The two jobs run as submitit processes (as on SLURM, locally): the same report and the
    same MLflow runs, nested under one finished parent, as the basic launcher's."""
    found = {}
    for launcher in ("basic", "submitit_local"):
        uri = f"sqlite:///{tmp_path / launcher}.db"
        sweep = tmp_path / launcher
        result = run_cli(
            [
                "ml_infer",
                "-m",
                f"hydra/launcher={launcher}",
                "strategy=standard,ensemble",
                f"runs_dir={runs_dir}",
                f"tracking.uri={uri}",
                f"hydra.sweep.dir={sweep}",
                "engine.min_timing_s=0",
            ]
        )
        assert result.returncode == 0, result.stderr[-3000:]
        with (sweep / "comparison.csv").open(newline="") as handle:
            report = {row["strategy"]: row for row in csv.DictReader(handle)}
        client = client_for(uri)
        runs = client.search_runs([client.get_experiment_by_name("ml_infer-digits").experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep") == "true"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        pending = [p.read_text() for p in sweep.glob(f"*/{MLFLOW_PENDING_FILE}")]
        assert parent.info.status == "FINISHED", pending  # why a run missed logging, if one did
        assert len(children) == 2 == len(runs) - 1
        logged = {r.data.params["strategy.name"]: r.data.metrics for r in children}
        found[launcher] = (report, logged)
    (basic_report, basic_logged), (submitit_report, submitit_logged) = found.values()
    for strategy in ("standard", "ensemble"):
        for key in SCORES:
            assert submitit_report[strategy][key] == basic_report[strategy][key], key
            assert submitit_logged[strategy][key] == basic_logged[strategy][key], key

"""MLflow: one run per evaluated strategy, a parent run per sweep. The only package that imports
mlflow (lazily: it takes seconds).

One MLflow run per evaluated strategy: params are the flattened resolved config (plus
`tta.views` and `ensemble.models`), tags name the strategy, data, checkpoint digests, git commit
and host, metrics are every number in `metrics.json`, artifacts are the resolved config,
`predictions.csv` and a confusion-matrix PNG. A multirun gets a parent run, made by the
`MLflowSweep` callback, with each strategy run nested under it.

Each run is created RUNNING when its evaluation starts and ended FINISHED once its files are
written (FAILED or KILLED when the evaluation stops). Tracking never costs the user their
results: a failing store is one warning naming its URI (`tracking.required=true` makes it an
error before any work). Each run directory records whether its run reached MLflow
(`mlflow_run.json`) or not and why (`mlflow_pending.json`); `sync_sweep`
(`python -m ml_infer.report SWEEP_DIR --sync`) logs the runs that missed live logging once the
store answers again.

    store   settings, reaching the store, short failure messages, `preflight`
    fields  what a run's params, tags, metrics and dataset input say
    runs    one evaluated strategy as one live MLflow run (`LiveRun`, `log_evaluation`)
    sweep   the sweep's parent run (`MLflowSweep`)
    sync    logging missed runs later, reading an experiment back for the report
"""

from ml_infer.tracking.fields import flatten, git_state, run_params, run_tags
from ml_infer.tracking.runs import LiveRun, log_evaluation
from ml_infer.tracking.store import (
    TrackingFailed,
    TrackingSettings,
    check_reachable,
    guarded,
    preflight,
)
from ml_infer.tracking.sweep import MLflowSweep, TrackingOutcome, tracking_outcome
from ml_infer.tracking.sync import SyncResult, runs_of_experiment, sync_sweep

__all__ = [
    "LiveRun",
    "MLflowSweep",
    "SyncResult",
    "TrackingFailed",
    "TrackingOutcome",
    "TrackingSettings",
    "check_reachable",
    "flatten",
    "git_state",
    "guarded",
    "log_evaluation",
    "preflight",
    "run_params",
    "run_tags",
    "runs_of_experiment",
    "sync_sweep",
    "tracking_outcome",
]

"""What one evaluated strategy's MLflow run says: params (the flattened config and the counts
that describe the run), tags (strategy, data, checkpoints, git, and MLflow's own user and source
tags), metrics (the numbers of metrics.json) and the data set as a dataset input.
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_infer.tracking.store import _MAX_PARAM_LENGTH, _quiet_mlflow_env


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"}; lists become JSON.

    >>> flatten({"tta": {"augmentations": ["hflip"], "aggregation": "mean"}, "seed": 0})
    {'tta.augmentations': '["hflip"]', 'tta.aggregation': 'mean', 'seed': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, prefix=f"{name}.")
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = str(value)
    return flat


# Numbers of metrics.json that describe how a run was made, not how well it did: params, so that
# MLflow's views plot metrics against params, not against the image count.
CONFIGURATION_COUNTS = (
    "n",
    "views",
    "models",
    "processes",
    "torch_threads",
    "timed_passes",
    "timed_images",
    "skipped_files",
)


def run_params(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, str]:
    """Params of a run: its resolved config (a plain mapping), flattened, plus the counts that
    describe the run (views and models as `tta.views` and `ensemble.models`) and the precision
    that ran."""
    params = flatten({k: v for k, v in config.items() if k != "hydra"})
    params["tta.views"] = str(metrics.get("views"))
    params["ensemble.models"] = str(metrics.get("models"))
    params["precision.effective"] = str(metrics.get("precision"))
    for name in CONFIGURATION_COUNTS:
        if name in metrics and name not in ("views", "models"):
            params[name] = str(metrics[name])
    return {k: v[:_MAX_PARAM_LENGTH] for k, v in params.items()}


def run_tags(
    metrics: Mapping[str, Any], overrides: str = "", host: str | None = None
) -> dict[str, str]:
    checkpoints = metrics.get("checkpoint_sha256") or []
    tags = {
        "strategy": str(metrics.get("strategy")),
        "data": f"{metrics.get('data')}/{metrics.get('split')}",
        "checkpoint_sha256": ",".join(map(str, checkpoints))[:_MAX_PARAM_LENGTH],
        "host": host or platform.node(),
        "device": str(metrics.get("device")),
    }
    commit, dirty = git_state()
    if commit:
        tags["git_commit"] = commit
        tags["git_dirty"] = str(dirty).lower()
    if overrides:
        tags["overrides"] = overrides[:_MAX_PARAM_LENGTH]
    return tags


def mlflow_context_tags() -> dict[str, str]:
    """The tags MLflow's fluent API gives a run it starts (user, source name and type, the
    source's git commit), from MLflow's own context providers."""
    _quiet_mlflow_env()  # before mlflow's first import: it reads its log level then
    from mlflow.tracking.context.registry import resolve_tags

    return {k: str(v) for k, v in resolve_tags().items() if k.startswith("mlflow.")}


def git_state() -> tuple[str | None, bool]:
    """The commit of the ml_infer checkout this code runs from, and whether it has local changes
    (None outside a git checkout, e.g. when installed from a wheel)."""
    package_dir = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package_dir), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit or None, dirty


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of metrics.json as MLflow metrics; a mapping of numbers (per_view_accuracy,
    per_member_accuracy) as one metric per entry, e.g. `per_view_accuracy.horizontal_flip`.

    >>> numeric_metrics({"accuracy": 0.9, "n": 360, "per_view_accuracy": {"identity": 0.9}})
    {'accuracy': 0.9, 'per_view_accuracy.identity': 0.9}
    """
    found: dict[str, float] = {}
    for key, value in metrics.items():
        if key in CONFIGURATION_COUNTS:
            continue  # a param
        if isinstance(value, Mapping):
            for name, number in value.items():
                if isinstance(number, (int, float)) and not isinstance(number, bool):
                    found[f"{key}.{_metric_name(str(name))}"] = float(number)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = float(value)
    return found


def _metric_name(name: str) -> str:
    """A checkpoint path or view name as an MLflow metric key (letters, digits, _ - . / only).

    >>> _metric_name("runs/digits/fold_0/weights/best.pt")
    'runs/digits/fold_0/weights/best.pt'
    >>> _metric_name("my fold (1).pt")
    'my_fold__1_.pt'
    """
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


def dataset_input(config: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, str] | None:
    """The run's data as MLflow's Dataset fields: name (data/split), digest (of the pixels or
    files the models saw), and where it came from (a folder, or the bundled set).

    >>> dataset_input({"data": {"root": "/d"}}, {"data": "x", "split": "test", "data_digest": "ab"})
    {'name': 'x/test', 'digest': 'ab', 'source_type': 'local', 'source': '{"uri": "/d"}'}
    """
    digest = metrics.get("data_digest")
    if not isinstance(digest, str):
        return None  # a run from before the digest was recorded
    data = config.get("data")
    data = data if isinstance(data, Mapping) else {}
    root = (
        data.get("root") if metrics.get("mode", "evaluate") == "evaluate" else metrics.get("split")
    )
    source = (
        {"uri": str(root)}
        if root
        else {"package": f"ml_infer bundled data set {metrics.get('data')}"}
    )
    return {
        "name": f"{metrics.get('data')}/{metrics.get('split')}",
        "digest": digest.removeprefix("files:")[:36],  # MLflow keeps 36 characters
        "source_type": "local" if root else "code",
        "source": json.dumps(source),
    }

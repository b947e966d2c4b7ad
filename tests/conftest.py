"""Shared fixtures: real fold checkpoints trained once per session by our own trainer."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from ml_infer.config import conf_dir, register_sweeper

CONF = conf_dir()
register_sweeper()  # conf/config.yaml selects it
REPO = Path(__file__).resolve().parent.parent

# Small enough to train in seconds, good enough to score > 0.95 on the digits test split.
FIXTURE_FOLDS = 3
FIXTURE_EPOCHS = 5


def compose_config(
    overrides: Sequence[str] = (), config_name: str = "config", runs_dir: Path | None = None
) -> DictConfig:
    """The config `python -m ml_infer <overrides>` would run, composed without running it."""
    extra = [f"runs_dir={runs_dir}"] if runs_dir is not None else []
    if config_name == "config" and not any(o.lstrip("+").startswith("tracking") for o in overrides):
        extra.append("tracking=none")  # tests that track say where
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*extra, *overrides])
    if "engine" in cfg:
        with open_dict(cfg):
            cfg.engine.progress = False
            cfg.engine.min_timing_s = 0.0  # timing repeats are for speed figures, not these tests
    return cfg


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/digits/fold_<k>/weights/best.pt for k < FIXTURE_FOLDS, trained by ml_infer.train."""
    from ml_infer.train import train_folds

    directory = tmp_path_factory.mktemp("runs") / "digits"
    cfg = compose_config(
        [f"folds={FIXTURE_FOLDS}", f"epochs={FIXTURE_EPOCHS}"],
        config_name="train",
        runs_dir=directory,
    )
    train_folds(cfg)
    return directory


@pytest.fixture(scope="session")
def fold_paths(runs_dir: Path) -> list[Path]:
    return [runs_dir / f"fold_{k}" / "weights" / "best.pt" for k in range(FIXTURE_FOLDS)]


def run_cli(
    args: Sequence[str], cwd: Path | None = None, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Runs `python -m <args>` in a fresh interpreter, as a user's shell would."""
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(port: int, store: Path, log: Any) -> subprocess.Popen:
    """A real `mlflow server` on `port`, its sqlite backend and artifacts under `store`, its
    output into the open file `log`."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{store / 'server.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return process
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                pytest.fail(f"mlflow server did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)


def stop_server(process: subprocess.Popen, how: int = signal.SIGTERM) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, how)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture()
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port, sqlite backend, local artifact store."""
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        process = start_server(port, tmp_path, log)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_server(process)


# (width, height) of the photographs written: landscape, portrait, square, odd sizes.
SIZES = [(512, 384), (300, 457), (256, 256), (391, 263), (480, 321), (267, 400)]


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of JPEG photographs (scikit-image's bundled ones, resized), two classes."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    sources = {"cat": skimage.data.chelsea(), "coffee": skimage.data.coffee()}
    for label, photo in sources.items():
        (root / label).mkdir()
        for k, (width, height) in enumerate(SIZES):
            image = Image.fromarray(photo).resize((width, height), Image.Resampling.BICUBIC)
            image.save(root / label / f"{k}.jpg", quality=90)
    return root

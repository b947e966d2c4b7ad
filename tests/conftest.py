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


MODES = ("L", "RGB", "RGBA", "P", "I;16")


def digit_image(pixels: Any, mode: str) -> Any:
    """A real 8x8 digit scan (values 0..16) as a 32x32 image in the given PIL mode."""
    import numpy as np
    from PIL import Image

    gray = Image.fromarray((pixels * 255 / 16).astype(np.uint8), "L").resize(
        (32, 32), Image.NEAREST
    )
    if mode == "I;16":
        return Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # full 16-bit range
    if mode == "P":
        return gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    if mode == "RGBA":
        rgba = gray.convert("RGBA")
        rgba.putalpha(255)
        return rgba
    return gray.convert(mode)


def write_digits_folder(
    root: Path,
    names: Sequence[str | None] | None = None,
    per_class: int | None = None,
    split: str = "test",
) -> Path:
    """A digits split as 8x8 gray PNGs under root/<name>/ (class k in folder names[k]; a class
    named None, or past the end of `names`, is left out), at most `per_class` images each."""
    import numpy as np
    from PIL import Image

    from ml_infer.data import DigitsDataset

    digits = DigitsDataset(split=split)
    names = [str(d) for d in range(10)] if names is None else list(names)
    counts = dict.fromkeys(range(10), 0)
    for position in range(len(digits)):
        label = int(digits.labels[position])
        name = names[label] if label < len(names) else None
        if name is None or (per_class is not None and counts[label] >= per_class):
            continue
        counts[label] += 1
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[position, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, "L").save(folder / f"scan {position}.png")
    return root


@pytest.fixture(scope="session")
def messy_folder(tmp_path_factory) -> tuple[Path, dict[str, str], int]:
    """ROOT/test/<digit>/ with test-split digits in mixed modes, plus files that must be skipped.

    Returns the root, the skipped files with their reasons, and the number of good images.
    """
    from ml_infer.data import DigitsDataset

    root = tmp_path_factory.mktemp("messy")
    test = DigitsDataset(split="test")
    good = 0
    for position in range(0, 120):
        label = int(test.labels[position])
        pixels = (test.images[position, 0].numpy() * 16).round()
        folder = root / "test" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        mode = MODES[position % len(MODES)]
        suffix = ".PNG" if position % 7 == 0 else ".png"  # uppercase extensions count too
        digit_image(pixels, mode).save(
            folder / f"scan_{position:03d}_{mode.replace(';', '')}{suffix}"
        )
        good += 1
    nested = root / "test" / "4" / "more_scans"  # images nested below a class folder belong to it
    nested.mkdir()
    digit_image((test.images[test.labels == 4][0, 0].numpy() * 16).round(), "L").save(
        nested / "deep.png"
    )
    good += 1
    (root / "test" / "7" / "empty.jpg").write_bytes(b"")
    (root / "test" / "7" / "notes.txt").write_text("labelling notes")
    (root / "test" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "test" / "README.md").write_text("not inside a class folder")
    (root / "test" / "2" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored silently
    skipped = {
        "test/7/empty.jpg": "unreadable image",
        "test/7/notes.txt": "not an image file",
        "test/3/broken.png": "unreadable image",
        "test/README.md": "not inside a class folder",
    }
    return root, skipped, good


def scored_resnet18(
    photo_folder: Path, tmp_path: Path, *overrides: str
) -> tuple[Any, dict[str, Any], list[dict[str, str]]]:
    """A resnet18 with random weights, saved as torchvision saves them, scored by ml_infer on
    the photo folder with ResNet18_Weights.IMAGENET1K_V1's transform: the model, the run's
    metrics and its predictions.csv rows."""
    import csv

    import torch
    import torchvision

    from ml_infer.task import run_evaluation

    model = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    path = tmp_path / "resnet18.pt"
    torch.save(model.state_dict(), path)
    config = compose_config(
        [
            "model=resnet18",
            f"ensemble.checkpoints=[{path}]",
            "checkpoint.input.weights=ResNet18_Weights.IMAGENET1K_V1",
            "data=imagefolder",
            f"data.root={photo_folder}",
            "tracking=none",
            *overrides,
        ]
    )
    metrics = run_evaluation(config, output_dir=tmp_path / "run")
    with (tmp_path / "run" / "predictions.csv").open(newline="") as handle:
        return model, metrics, list(csv.DictReader(handle))


@pytest.fixture
def saved_figures(monkeypatch) -> dict[Path, Any]:
    """Every matplotlib figure saved while the test runs, by the path it was saved to: what a
    picture shows is read from its objects (titles, axes), not from its pixels."""
    from matplotlib.figure import Figure

    saved: dict[Path, Any] = {}
    save = Figure.savefig

    def recording(figure: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        saved[Path(str(path))] = figure
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return saved

"""The bundled textures set: built offline, ImageFolder layout, trained and scored through it."""

from __future__ import annotations

import numpy as np
import pytest

from ml_infer.checkpoints import read_checkpoint
from ml_infer.task import run_evaluation
from ml_infer.textures import SOURCES, build_textures, cut_patches
from ml_infer.train import train_folds

from .conftest import compose_config

SMALL = {"train": 60, "val": 12, "test": 24}


@pytest.fixture(scope="module")
def textures(tmp_path_factory):
    root = tmp_path_factory.mktemp("textures") / "textures"
    written = build_textures(root, patches_per_class=SMALL)
    return root, written


def test_layout_and_counts(textures):
    root, written = textures
    assert written == {split: n * len(SOURCES) for split, n in SMALL.items()}
    for split, per_class in SMALL.items():
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SOURCES)
        for name in SOURCES:
            assert len(list((root / split / name).glob("*.png"))) == per_class


def test_same_seed_writes_the_same_bytes(textures, tmp_path):
    root, _ = textures
    again = tmp_path / "again"
    build_textures(again, patches_per_class=SMALL)
    for relative in ("train/brick/0000.png", "test/retina/0023.png", "val/moon/0005.png"):
        assert (again / relative).read_bytes() == (root / relative).read_bytes()


def test_existing_output_is_not_overwritten_by_default(textures):
    root, _ = textures
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        build_textures(root, patches_per_class=SMALL)


def test_patches_stay_inside_their_split_band():
    columns = np.tile(np.arange(200, dtype=float), (50, 1))  # pixel value = its column
    patches = cut_patches(columns, (0.8, 1.0), 500, 16, np.random.default_rng(0))
    assert patches.min() >= 160 and patches.max() <= 199
    patches = cut_patches(columns, (0.0, 0.7), 500, 16, np.random.default_rng(0))
    assert patches.max() < 140


@pytest.mark.slow
def test_folds_train_on_it_as_an_rgb_model_and_tta_runs(textures, tmp_path):
    root, _ = textures
    runs = tmp_path / "runs"
    cfg = compose_config(
        ["data=textures", f"data.root={root}", "folds=2", "epochs=3"],
        config_name="train",
        runs_dir=runs,
    )
    paths = train_folds(cfg)
    contents, _ = read_checkpoint(paths[0])
    assert contents["input"]["channels"] == 3 and contents["input"]["size"] == [16, 16]
    assert contents["classes"] == sorted(SOURCES)
    metrics = run_evaluation(
        compose_config(
            ["data=textures", f"data.root={root}", "strategy=tta_ensemble", "tta=d4"], runs_dir=runs
        ),
        output_dir=tmp_path / "run",
    )
    assert (metrics["views"], metrics["models"], metrics["n"]) == (
        8,
        2,
        SMALL["test"] * len(SOURCES),
    )
    assert metrics["accuracy"] > 2 / len(SOURCES)  # well above chance after 3 short epochs

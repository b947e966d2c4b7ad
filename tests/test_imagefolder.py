"""User image folders: any image mode, bad files skipped and reported, unlabelled prediction."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from ml_infer.data import ImageFolderDataset, UnlabelledImages
from ml_infer.decode import read_image
from ml_infer.errors import UserError
from ml_infer.task import run_evaluation

from .conftest import MODES, compose_config, digit_image


def test_messy_folder_loads_every_good_image_and_lists_the_bad_ones(messy_folder):
    root, skipped, good = messy_folder
    dataset = ImageFolderDataset(root, split="test", image_size=[8, 8], channels=1)
    assert dataset.classes == [str(d) for d in range(10)]
    assert len(dataset) == good
    assert {s.path: s.reason.split(" (")[0] for s in dataset.skipped} == skipped
    assert "test/4/more_scans/deep.png" in dataset.sample_ids
    assert dataset.pixels().shape == (good, 1, 8, 8)
    assert float(dataset.pixels().min()) >= 0.0 and float(dataset.pixels().max()) <= 1.0


def test_every_image_mode_reads_to_the_same_pixels(tmp_path):
    pixels = np.arange(64).reshape(8, 8) % 17
    reference = None
    for mode in MODES:
        path = tmp_path / f"{mode.replace(';', '')}.png"
        digit_image(pixels, mode).save(path)
        for channels in (1, 3):
            array = read_image(path, size=(32, 32), channels=channels)
            assert array.shape == (channels, 32, 32) and array.dtype == np.uint8
        gray = read_image(path, size=(32, 32), channels=1)[0].astype(int)
        reference = gray if reference is None else reference
        assert np.abs(gray - reference).max() <= 1, (
            mode
        )  # 16-bit scaled, palette mapped, alpha dropped


def test_evaluation_on_the_messy_folder_completes_and_reports_skips(
    messy_folder, runs_dir, tmp_path
):
    root, skipped, good = messy_folder
    cfg = compose_config(
        ["strategy=ensemble", "data=imagefolder", f"data.root={root}"], runs_dir=runs_dir
    )
    metrics = run_evaluation(cfg, output_dir=tmp_path)
    assert metrics["n"] == good and metrics["skipped_files"] == len(skipped)
    assert metrics["accuracy"] > 0.85  # real digits, resized 8 -> 32 -> 8
    with (tmp_path / "skipped_files.csv").open() as handle:
        assert {row["path"] for row in csv.DictReader(handle)} == set(skipped)
    with (tmp_path / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:3] == ["path", "label", "pred"] and len(rows) == good


def test_predict_mode_matches_the_labelled_run(messy_folder, runs_dir, tmp_path):
    root, skipped, good = messy_folder
    common = [
        "strategy=tta",
        "tta=intensity",
        f"ensemble.checkpoints=[{runs_dir}/fold_1/weights/best.pt]",
    ]
    run_evaluation(
        compose_config([*common, "data=imagefolder", f"data.root={root}"], runs_dir=runs_dir),
        output_dir=tmp_path / "labelled",
    )
    predicted = run_evaluation(
        compose_config(
            [*common, "mode=predict", f"predict.root={root / 'test'}"], runs_dir=runs_dir
        ),
        output_dir=tmp_path / "predict",
    )
    with (tmp_path / "labelled" / "predictions.csv").open() as handle:
        labelled = {row["path"].removeprefix("test/"): row for row in csv.DictReader(handle)}
    with (tmp_path / "predict" / "predictions.csv").open() as handle:
        unlabelled = {row["path"]: row for row in csv.DictReader(handle)}
    assert unlabelled.keys() == labelled.keys() and len(unlabelled) == good
    for path, row in unlabelled.items():
        assert row["pred"] == labelled[path]["pred"]
        probs = [float(row[f"prob_{c}"]) for c in range(10)]
        assert probs == [float(labelled[path][f"prob_{c}"]) for c in range(10)]
        assert float(row["prob"]) == max(probs)
        assert float(row["entropy"]) == pytest.approx(
            -sum(p * np.log(p) for p in probs if p > 0), abs=1e-4
        )
    assert predicted["mode"] == "predict" and "accuracy" not in predicted
    assert sum(predicted["predicted_counts"].values()) == good
    # README.md is skipped here too, as "not an image file": predict mode has no class folders.
    predict_metrics = json.loads((tmp_path / "predict" / "metrics.json").read_text())
    assert predict_metrics["skipped_files"] == len(skipped)


def test_a_class_the_checkpoint_does_not_know_is_refused(tmp_path, runs_dir):
    for name in ("0", "1", "cat"):
        (tmp_path / "data" / name).mkdir(parents=True)
        digit_image(np.eye(8) * 16, "L").save(tmp_path / "data" / name / "a.png")
    cfg = compose_config(["data=imagefolder", f"data.root={tmp_path / 'data'}"], runs_dir=runs_dir)
    with pytest.raises(UserError, match=r"does not know: \['cat'\] \(the checkpoint's: \['0', '1'"):
        run_evaluation(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "is not a directory"),
        (lambda root: root.mkdir(), "no class folders"),
        (lambda root: (root / "train" / "a").mkdir(parents=True), "no split 'test'"),
        (
            lambda root: ((root / "a").mkdir(parents=True), (root / "a" / "x.txt").write_text("")),
            "no readable images",
        ),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, make, message):
    root = tmp_path / "root"
    make(root)
    with pytest.raises(UserError, match=message):
        ImageFolderDataset(root, split="test", image_size=8, channels=1)


def test_unlabelled_images_need_a_readable_folder(tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        UnlabelledImages(tmp_path / "missing", image_size=8, channels=1)

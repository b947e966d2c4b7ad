"""Labels matched to the checkpoint's classes by name: test folders with some of its classes, in
any order, and folder classes it does not know (refused, or skipped with
data.unknown_classes=skip). Real folds of our trainer on real digit scans."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.metrics import f1_score

from ml_infer import record
from ml_infer.checkpoints import read_checkpoint
from ml_infer.errors import UserError
from ml_infer.imagesets import TensorImages
from ml_infer.labels import labelled_by_name
from ml_infer.task import run_evaluation

from .conftest import compose_config, write_digits_folder
from .test_formats import seed_best_pt

DIGITS = [str(d) for d in range(10)]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def scored(root: Path, out: Path, runs_dir: Path, *overrides: str) -> dict[str, Any]:
    """The run's metrics.json and its predictions.csv rows by image (folder name left out)."""
    config = compose_config(
        [
            "data=imagefolder",
            f"data.root={root}",
            f"ensemble.checkpoints=[{runs_dir}/fold_0/weights/best.pt]",
            *overrides,
        ],
        runs_dir=runs_dir,
    )
    metrics = run_evaluation(config, output_dir=out)
    with (out / "predictions.csv").open(newline="") as handle:
        rows = {row["path"].split("/", 1)[1]: row for row in csv.DictReader(handle)}
    return {"metrics": metrics, "rows": rows}


@pytest.fixture(scope="module")
def full(tmp_path_factory, runs_dir) -> dict[str, Any]:
    """The whole digits test split in folders 0/ ... 9/, the checkpoint's order."""
    root = write_digits_folder(tmp_path_factory.mktemp("full") / "data")
    return scored(root, tmp_path_factory.mktemp("full_run"), runs_dir)


def word_checkpoint(runs_dir: Path, tmp_path: Path) -> Path:
    """Fold 0 with its classes named by words: their sorted order is not the outputs' order."""
    contents, _ = read_checkpoint(runs_dir / "fold_0" / "weights" / "best.pt")
    path = tmp_path / "words.pt"
    torch.save(dict(contents) | {"classes": WORDS}, path)
    return path


def probabilities(row: dict[str, str], names: list[str]) -> list[float]:
    return [float(row[f"prob_{name}"]) for name in names]


def same_probabilities(row: dict[str, str], names: list[str], reference: dict[str, str]) -> bool:
    """Equal to float32 rounding: a batch that holds other images may be summed by another
    kernel path, one ulp apart."""
    return probabilities(row, names) == pytest.approx(probabilities(reference, DIGITS), abs=1e-6)


def test_a_folder_without_a_class_is_scored_image_for_image_as_the_full_folder(
    full, runs_dir, tmp_path
):
    """Without class 0 the folder's sorted classes are 1 ... 9: every label moves by one."""
    root = write_digits_folder(tmp_path / "data", [None, *DIGITS[1:]])
    run = scored(root, tmp_path / "run", runs_dir)
    rows, metrics = run["rows"], run["metrics"]
    zeros = [image for image, row in full["rows"].items() if row["label"] == "0"]
    assert zeros and rows.keys() == full["rows"].keys() - set(zeros)
    for image, row in rows.items():
        assert row["label"] == full["rows"][image]["label"]
        assert row["pred"] == full["rows"][image]["pred"]
        assert same_probabilities(row, DIGITS, full["rows"][image])
    assert metrics["n"] == len(rows)
    assert metrics["classes_present"] == DIGITS[1:] and metrics["classes_absent"] == ["0"]
    labels = [row["label"] for row in rows.values()]
    preds = [row["pred"] for row in rows.values()]
    assert metrics["accuracy"] == pytest.approx(
        sum(label == pred for label, pred in zip(labels, preds, strict=True)) / len(rows)
    )
    # over the classes present: a prediction of 0 is a miss of the true class, no tenth F1 of 0
    assert metrics["macro_f1"] == pytest.approx(
        f1_score(labels, preds, labels=DIGITS[1:], average="macro"), abs=1e-12
    )
    assert full["metrics"]["classes_absent"] == []


def test_class_folders_that_sort_in_another_order_are_matched_by_name(
    full, runs_dir, tmp_path, monkeypatch
):
    """A checkpoint whose classes are words (their sorted order is not the outputs' order),
    scored on folders named by those words."""
    checkpoint = word_checkpoint(runs_dir, tmp_path)
    root = write_digits_folder(tmp_path / "data", WORDS)
    assert sorted(WORDS) != WORDS
    drawn: list[list[str]] = []
    monkeypatch.setattr(
        record,
        "plot_confusion_matrix",
        lambda labels, preds, classes, path, title: drawn.append(list(classes)),
    )
    run = scored(root, tmp_path / "run", runs_dir, f"ensemble.checkpoints=[{checkpoint}]")
    assert run["rows"].keys() == full["rows"].keys()
    for image, row in run["rows"].items():
        reference = full["rows"][image]
        assert row["label"] == WORDS[int(reference["label"])]
        assert row["pred"] == WORDS[int(reference["pred"])]
        assert same_probabilities(row, WORDS, reference)
    for name in ("accuracy", "macro_f1"):
        assert run["metrics"][name] == full["metrics"][name], name
    for name in ("nll", "ece"):  # the images load in another order: other batches
        assert run["metrics"][name] == pytest.approx(full["metrics"][name], rel=1e-5), name
    assert drawn == [WORDS]  # the confusion matrix keeps the checkpoint's classes, in its order


def test_a_class_the_checkpoint_does_not_know_is_skipped_when_asked(full, runs_dir, tmp_path):
    """a_cat/ sorts first: the digits' labels move by one until its images are left out."""
    root = write_digits_folder(tmp_path / "data")
    cats = write_digits_folder(tmp_path / "cats", ["a_cat"], per_class=4)
    (cats / "a_cat").rename(root / "a_cat")
    with pytest.raises(UserError, match=r"does not know: \['a_cat'\].*data.unknown_classes=skip"):
        scored(root, tmp_path / "refused", runs_dir)
    assert not (tmp_path / "refused" / "metrics.json").exists()

    run = scored(root, tmp_path / "run", runs_dir, "data.unknown_classes=skip")
    assert run["rows"].keys() == full["rows"].keys()
    for image, row in run["rows"].items():
        assert same_probabilities(row, DIGITS, full["rows"][image])
    with (tmp_path / "run" / "skipped_files.csv").open(newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert sorted(row["path"] for row in skipped) == sorted(
        f"a_cat/{path.name}" for path in (root / "a_cat").iterdir()
    )
    assert {row["reason"] for row in skipped} == {
        "class 'a_cat' is not one of the checkpoint's classes"
    }
    assert run["metrics"]["skipped_files"] == 4
    assert run["metrics"]["accuracy"] == full["metrics"]["accuracy"]


def test_a_calibration_folder_with_some_classes_in_another_order(runs_dir, tmp_path, caplog):
    """data.val_root's labels are matched by name too: vector scaling fitted on a val folder
    of 7 classes named by words (another order) is the fit on the same images named by digits."""
    words = word_checkpoint(runs_dir, tmp_path)
    fits = []
    for names, checkpoint in ((DIGITS, runs_dir / "fold_0/weights/best.pt"), (WORDS, words)):
        root = write_digits_folder(tmp_path / names[0] / "test", names, per_class=5)
        val = write_digits_folder(tmp_path / names[0] / "val", names[:7], split="val")
        run = scored(
            root,
            tmp_path / names[0] / "run",
            runs_dir,
            f"ensemble.checkpoints=[{checkpoint}]",
            "calibration=vector",
            f"data.val_root={val}",
        )
        assert run["metrics"]["calibration_n"] == len(list(val.rglob("*.png")))
        fits.append(run["metrics"])
    assert fits[0]["calibration_fit"] == pytest.approx(fits[1]["calibration_fit"], rel=1e-6)
    assert fits[0]["nll_calibrated"] == pytest.approx(fits[1]["nll_calibrated"], rel=1e-6)
    warning = "vector scaling saw no calibration image of 3 class(es) (outputs [7, 8, 9])"
    assert warning in caplog.text


def test_relabelling_keeps_images_and_renumbers_labels():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1)
    data = TensorImages(images, torch.tensor([0, 1, 2, 1, 0]), list("abcde"), ["b", "c", "x"])
    assert labelled_by_name(data, ["b", "c", "x"]) is data
    renumbered = labelled_by_name(data, ["x", "a", "b", "c"])
    assert renumbered.labels.tolist() == [2, 3, 0, 3, 2] and renumbered.images is data.images
    assert renumbered.classes == ["x", "a", "b", "c"] and data.labels.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(UserError, match=r"does not know: \['x'\]"):
        labelled_by_name(data, ["c", "b"])
    kept = labelled_by_name(data, ["c", "b"], "skip")
    assert kept.labels.tolist() == [1, 0, 0, 1] and kept.sample_ids == list("abde")
    assert [(s.path, s.reason) for s in kept.skipped] == [
        ("c", "class 'x' is not one of the checkpoint's classes")
    ]
    with pytest.raises(UserError, match="unknown data.unknown_classes 'drop'; valid: error, skip"):
        labelled_by_name(data, ["c", "b"], "drop")


def test_metrics_json_lists_present_and_absent_classes(full):
    metrics = full["metrics"]
    assert metrics["classes_present"] == DIGITS
    assert json.loads(json.dumps(metrics))["classes_absent"] == []


def test_a_nameless_checkpoint_on_a_folder_with_some_classes_is_told_what_to_set(
    full, runs_dir, tmp_path
):
    """The seed's best.pt names no classes: a folder without 9 gives it 9 names for 10 outputs.
    The error says to name them; named, the folder is scored image for image as the full one."""
    path = tmp_path / "best.pt"
    torch.save(seed_best_pt(runs_dir / "fold_0" / "weights" / "best.pt"), path)
    root = write_digits_folder(tmp_path / "data", DIGITS[:9])
    seed = ["model=small_cnn", f"ensemble.checkpoints=[{path}]"]
    with pytest.raises(
        UserError, match=r"trained on 10 classes, the data has 9.*checkpoint\.classes="
    ):
        scored(root, tmp_path / "refused", runs_dir, *seed)
    run = scored(
        root, tmp_path / "run", runs_dir, *seed, f"checkpoint.classes=[{','.join(DIGITS)}]"
    )
    assert run["metrics"]["classes_absent"] == ["9"]
    assert all(row["pred"] == full["rows"][image]["pred"] for image, row in run["rows"].items())


def test_an_ensemble_member_without_class_names_takes_another_members(full, runs_dir, tmp_path):
    """[seed best.pt (no names), fold 0 named by words] on word folders: the words, not the
    folders' sorted order, number the seed member's outputs."""
    seed = tmp_path / "best.pt"
    torch.save(seed_best_pt(runs_dir / "fold_0" / "weights" / "best.pt"), seed)
    words = word_checkpoint(runs_dir, tmp_path)
    root = write_digits_folder(tmp_path / "data", WORDS)
    run = scored(
        root,
        tmp_path / "run",
        runs_dir,
        "strategy=ensemble",
        "model=small_cnn",
        f"ensemble.checkpoints=[{seed},{words}]",
    )
    assert run["metrics"]["models"] == 2
    for image, row in run["rows"].items():  # both members are fold 0's weights
        assert row["pred"] == WORDS[int(full["rows"][image]["pred"])]


def test_a_calibration_folder_with_a_class_the_checkpoint_does_not_know_says_so(runs_dir, tmp_path):
    root = write_digits_folder(tmp_path / "test", per_class=3)
    val = write_digits_folder(tmp_path / "val", ["a_cat", *DIGITS[1:]], per_class=3, split="val")
    with pytest.raises(UserError, match=r"^the calibration images: .*does not know: \['a_cat'\]"):
        scored(root, tmp_path / "run", runs_dir, "calibration=temperature", f"data.val_root={val}")
    assert not (tmp_path / "run" / "metrics.json").exists()

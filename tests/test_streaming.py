"""Streamed image folders: the pixels, skipped files and predictions of the same folder held in
memory, batches decoded in DataLoader workers or threads, a shift applied per batch, a file
changed under a run named, and peak memory that does not grow with the number of images."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ml_infer.data import ImageFolderDataset, make_loader
from ml_infer.errors import UserError
from ml_infer.task import run_evaluation

from .conftest import compose_config


def open_both(root: Path, **reader) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    return (
        ImageFolderDataset(root, stream=False, **reader),
        ImageFolderDataset(root, stream=True, **reader),
    )


def test_a_streamed_folder_reads_and_skips_what_a_held_one_does(messy_folder):
    root, skipped, good = messy_folder
    held, streamed = open_both(root, image_size=8, channels=1)
    assert streamed.streamed and not held.streamed and len(streamed) == good
    assert streamed.sample_ids == held.sample_ids and torch.equal(streamed.labels, held.labels)
    assert streamed.skipped == held.skipped and {e.path for e in streamed.skipped} == set(skipped)
    assert torch.equal(streamed.pixels(), held.pixels())
    positions = [40, 3, 77]
    assert torch.equal(streamed.pixels(positions), held.pixels(torch.tensor(positions)))
    assert torch.equal(streamed.pixels(5), held.pixels(5))
    part = streamed.subset(positions)
    assert part.streamed and part.sample_ids == [held.sample_ids[p] for p in positions]
    assert torch.equal(part.pixels(), held.pixels(torch.tensor(positions)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_fetches_the_held_batches_from_the_files(messy_folder, num_workers):
    root, _, _ = messy_folder
    held, streamed = open_both(root, image_size=8, channels=1)
    loader = make_loader(streamed, batch_size=16, num_workers=num_workers)
    images, labels, positions = (torch.cat(parts) for parts in zip(*loader))
    assert torch.equal(positions, torch.arange(len(held)))
    assert torch.equal(images, held.pixels()) and torch.equal(labels, held.labels)


def test_the_data_key_follows_the_files_bytes_and_the_reader(photo_folder, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    key = ImageFolderDataset(root, image_size=64, stream=True).data_key
    assert key is not None and key == ImageFolderDataset(root, image_size=64, stream=True).data_key
    assert ImageFolderDataset(root, image_size=32, stream=True).data_key != key
    assert ImageFolderDataset(root, image_size=64, stream=False).data_key is None  # its pixels
    first = root / "cat" / "0.jpg"
    first.write_bytes((root / "cat" / "1.jpg").read_bytes())  # other bytes, same name
    assert ImageFolderDataset(root, image_size=64, stream=True).data_key != key


def test_a_file_broken_after_the_folder_was_opened_is_named(photo_folder, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    streamed = ImageFolderDataset(root, image_size=64, stream=True)
    (root / "coffee" / "2.jpg").write_bytes(b"\xff\xd8 no longer a JPEG")
    with pytest.raises(UserError, match=r"coffee/2\.jpg could not be read while streaming"):
        streamed.pixels()


def test_stream_takes_auto_true_or_false(photo_folder):
    with pytest.raises(UserError, match="stream must be one of auto, true, false; got 'yes'"):
        ImageFolderDataset(photo_folder, image_size=64, stream="yes")
    assert not ImageFolderDataset(photo_folder, image_size=64).streamed  # auto: 12 small images


def predictions(run_dir: Path) -> dict[str, dict[str, str]]:
    with (run_dir / "predictions.csv").open(newline="") as handle:
        return {row["path"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra", [["strategy=tta_ensemble"], ["shift=gaussian_noise", "shift.severity=3"]]
)
def test_a_streamed_evaluation_predicts_what_the_held_one_does(
    messy_folder, runs_dir, tmp_path, extra
):
    """Whole runs: TTA over an ensemble, and a random corruption (drawn per image id) applied
    per batch to the streamed folder and up front to the held one."""
    root, _, good = messy_folder
    common = ["data=imagefolder", f"data.root={root}", "tracking=none", *extra]
    held = run_evaluation(
        compose_config([*common, "data.dataset.stream=false"], runs_dir=runs_dir),
        output_dir=tmp_path / "held",
    )
    streamed = run_evaluation(
        compose_config(
            [*common, "data.dataset.stream=true", "data.num_workers=2"], runs_dir=runs_dir
        ),
        output_dir=tmp_path / "streamed",
    )
    assert predictions(tmp_path / "streamed") == predictions(tmp_path / "held")
    assert len(predictions(tmp_path / "held")) == good
    for name in ("accuracy", "nll", "ece", "skipped_files", "n"):
        assert streamed[name] == held[name], name
    if "shift=gaussian_noise" in extra:
        assert streamed["shift_applied"] and streamed["shift_mean_abs_change"] == pytest.approx(
            held["shift_mean_abs_change"], rel=0.2
        )


# Peak memory: one run over a folder of photographs, and over ten times as many.
MEASURE_PEAK = """
import resource, sys
import matplotlib.figure, torch, torchvision, ml_infer.evaluate, ml_infer.record  # imported first
from ml_infer.__main__ import main  # main, not the command, which ends the process when done
try:  # the high-water mark from here on: importing torch peaks higher on some machines
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
except OSError:
    pass
sys.argv = ["ml_infer", *sys.argv[1:]]
try:
    main()
except SystemExit as stop:
    if stop.code:
        raise
try:
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_KIB", peak)
"""


def peak_rss_kib(root: Path, checkpoint: Path, run_dir: Path) -> int:
    overrides = [
        "model=small_cnn",
        "model.width=4",
        f"ensemble.checkpoints=[{checkpoint}]",
        "checkpoint.input.size=[448,448]",  # shorter side resized to 448, centre cropped
        "checkpoint.input.resize=448",
        "checkpoint.input.mean=[0.5,0.5,0.5]",
        "checkpoint.input.std=[0.25,0.25,0.25]",
        "data=imagefolder",
        f"data.root={root}",
        "data.dataset.stream=true",
        "data.batch_size=8",
        "engine.forward_batch_size=8",
        "engine.min_timing_s=0",
        "tracking=none",
        f"hydra.run.dir={run_dir}",
    ]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_PEAK, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == sum(1 for _ in root.rglob("*.jpg"))
    return int(done.stdout.split("PEAK_KIB")[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_images(photo_folder, tmp_path):
    from ml_infer.models import SmallCNN

    checkpoint = tmp_path / "small_cnn.pt"
    torch.save(SmallCNN(in_channels=3, num_classes=2, width=4).state_dict(), checkpoint)
    few, many = tmp_path / "few", tmp_path / "many"
    for root, copies in ((few, 5), (many, 50)):
        for source in photo_folder.rglob("*.jpg"):
            (root / source.parent.name).mkdir(parents=True, exist_ok=True)
            for copy in range(copies):
                shutil.copy(source, root / source.parent.name / f"{copy}_{source.name}")
    small = peak_rss_kib(few, checkpoint, tmp_path / "run_few")
    large = peak_rss_kib(many, checkpoint, tmp_path / "run_many")
    # Held in memory, the larger folder's images alone would pass the allowance.
    held_kib = 12 * 50 * 3 * 448 * 448 / 1024
    print(f"peak RSS: {small} KiB for {12 * 5} images, {large} KiB for {12 * 50}")
    assert held_kib > 0.15 * small
    assert large <= 1.15 * small, (small, large)


def test_auto_counts_the_six_crops_crop_views_read():
    from ml_infer.decode import ImageReader
    from ml_infer.imagesets import STREAM_ABOVE_BYTES, should_stream

    plain = ImageReader((224, 224), 3, resize=256)
    crops = ImageReader((224, 224), 3, resize=256, corners=True)
    images = STREAM_ABOVE_BYTES // (3 * 224 * 224) // 2  # half the limit, held plainly
    assert not should_stream("auto", images, plain) and should_stream("auto", images, crops)


def test_a_streamed_folders_key_covers_what_a_shift_draws_from(photo_folder, tmp_path):
    """A streamed folder is keyed by its files, not its pixels: the data name, the image ids and
    the corruption's settings, which seed or shape its corrupted pixels, must be in the key."""
    from omegaconf import OmegaConf

    from ml_infer.shift import shift_of, shifted

    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root / "test")
    whole = ImageFolderDataset(root, image_size=64, stream=True)  # ids test/cat/0.jpg, ...
    inner = ImageFolderDataset(root / "test", image_size=64, stream=True)  # ids cat/0.jpg, ...
    assert whole.digests == inner.digests and whole.data_key != inner.data_key

    def noise(target: str) -> dict:  # the same shift name, another corruption class
        corruption = {"_target_": f"ml_infer.corruptions.{target}"}
        return OmegaConf.create(
            {"shift": {"name": "noise", "severity": 3, "seed": 0, "corruption": corruption}}
        )

    keys = {
        (data, target): shifted(whole, shift_of(noise(target)), data)[0].shift
        for data in ("photos", "other")
        for target in ("GaussianNoise", "ShotNoise")
    }
    assert len({json.dumps(key, sort_keys=True) for key in keys.values()}) == 4


def test_a_file_in_a_format_that_runs_an_interpreter_is_skipped_unread(photo_folder, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photo_folder, root)
    (root / "cat" / "page.jpg").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    for stream in (False, True):
        data = ImageFolderDataset(root, image_size=32, stream=stream)
        assert [(e.path, e.reason.split(" (")[0]) for e in data.skipped] == [
            ("cat/page.jpg", "unreadable image")
        ]

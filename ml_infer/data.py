"""Image data sets and their loaders.

- `DigitsDataset`: scikit-learn's bundled handwritten digits (the default demo, no download).
- `ImageFolderDataset`: torchvision's class-per-folder layout, optionally split into
  `train/ val/ test/` subfolders (the bundled textures set is written in this form).
- `UnlabelledImages`: every image under a folder, for `mode=predict`.

Every data set yields `(image, label, position)` with images as float tensors [C, H, W] in
[0, 1] at the size and channel count the model expects; normalisation happens later, in the
predictor, after test-time views are built. `classes` names the labels in order, `sample_ids`
maps a position to the sample's id (`index` or `path`, as `id_name` says), and `skipped` lists
the files that could not be used, with the reason.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ml_infer.config import instantiate
from ml_infer.errors import UserError, one_of
from ml_infer.folders import (
    SPLITS,
    find_images,
    hidden,
    open_images,
    relative_path,
    split_dir,
)
from ml_infer.imagesets import FileImages, SkippedFile, TensorImages
from ml_infer.inputs import fit_images

log = logging.getLogger(__name__)


def stratified_split(
    labels: Sequence[int] | np.ndarray, *, seed: int, val_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Indices of a stratified train / val / test split, fixed by `seed`.

    >>> parts = stratified_split([0, 1] * 50, seed=0, val_fraction=0.1, test_fraction=0.2)
    >>> {name: len(idx) for name, idx in parts.items()}
    {'train': 70, 'val': 10, 'test': 20}
    """
    from sklearn.model_selection import train_test_split

    labels = np.asarray(labels)
    everything = np.arange(len(labels))
    rest, test = train_test_split(
        everything, test_size=test_fraction, stratify=labels, random_state=seed
    )
    val_share_of_rest = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        rest, test_size=val_share_of_rest, stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


class DigitsDataset(TensorImages):
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, bundled with the package).

    Pixel values 0..16 become [0, 1]; `image_size` and `channels` adapt them to a model trained
    at another size (bilinear, antialiased) or on RGB (gray copied to each channel).
    """

    def __init__(
        self,
        split: str = "test",
        split_seed: int = 0,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        image_size: Sequence[int] | None = None,
        channels: int = 1,
        resize: int | None = None,
        interpolation: str = "bilinear",
        corners: bool = False,
    ):
        if corners:
            raise UserError(
                "crop views (five_crop, ten_crop) need photos read with a resize before the "
                "centre crop; the digits are 8x8 scans resized straight to the model's size"
            )
        if split not in SPLITS:
            raise one_of("split", split, SPLITS)
        digits = _load_digits()
        labels = digits.target.astype(np.int64)
        ids = stratified_split(
            labels, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction
        )[split]
        images = torch.from_numpy(digits.images[ids]).float().div_(16.0).unsqueeze(1)
        images = fit_images(
            images,
            image_size=image_size,
            channels=channels,
            resize=resize,
            interpolation=interpolation,
        )
        super().__init__(
            images=images,
            labels=torch.from_numpy(labels[ids]),
            sample_ids=ids.tolist(),
            classes=[str(name) for name in digits.target_names],
        )


@functools.cache
def _load_digits() -> Any:
    """scikit-learn's digits, read once per process (a sweep's runs each build a split)."""
    from sklearn.datasets import load_digits

    return load_digits()


class ImageFolderDataset(FileImages):
    """torchvision's ImageFolder layout: `root/[split/]<class>/**/<image>`.

    When `root` has `train/`, `val/` or `test/` subfolders, `split` picks one; otherwise `root`
    itself holds the class folders and is evaluated whole (it cannot be trained on: nothing
    would be held out). Classes are the sorted names of the class folders; images
    may sit in nested folders below their class folder (as torchvision allows). Any image mode
    (grayscale, RGBA, palette, 16-bit) is converted to `channels` and resized to `image_size`.
    Files that are not images, or that cannot be decoded, are skipped and listed in `skipped`;
    names starting with "." are ignored. Images are decoded once, in threads, and held in
    memory as uint8 at the model's input size (C x H x W bytes each), or streamed: decoded per
    batch, never all held (`stream`: true, false, or auto: above 1 GiB of decoded pixels).
    """

    id_name = "path"

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        image_size: Sequence[int] | int | None = None,
        channels: int = 3,
        decode_threads: int = 4,
        resize: int | None = None,
        interpolation: str = "bilinear",
        stream: Any = "auto",
        corners: bool = False,
    ):
        root = Path(root)
        where = split_dir(root, split)
        classes = sorted(
            entry.name for entry in where.iterdir() if entry.is_dir() and not hidden(entry)
        )
        if not classes:
            raise UserError(f"no class folders under {where}; expected {where}/<class>/<image>")
        skipped = [
            SkippedFile(relative_path(entry, root), "not inside a class folder")
            for entry in sorted(where.iterdir())
            if entry.is_file() and not hidden(entry)
        ]
        paths, labels = [], []
        for label, name in enumerate(classes):
            images, not_images = find_images(where / name)
            paths += images
            labels += [label] * len(images)
            skipped += [
                SkippedFile(relative_path(p, root), "not an image file") for p in not_images
            ]
        loaded = open_images(
            paths,
            labels,
            skipped,
            root=root,
            where=where,
            image_size=image_size,
            channels=channels,
            threads=decode_threads,
            resize=resize,
            interpolation=interpolation,
            stream=stream,
            corners=corners,
        )
        for label, name in enumerate(classes):
            if not (loaded["labels"] == label).any():
                log.warning("class folder %r under %s has no readable images", name, where)
        super().__init__(**loaded, classes=classes)


class UnlabelledImages(FileImages):
    """Every image under `root` (searched recursively), for prediction without labels.

    Labels are -1 and `classes` is empty: the class names come from the checkpoint.
    """

    id_name = "path"

    def __init__(
        self,
        root: str | Path,
        image_size: Sequence[int] | int | None = None,
        channels: int = 3,
        decode_threads: int = 4,
        resize: int | None = None,
        interpolation: str = "bilinear",
        stream: Any = "auto",
        corners: bool = False,
    ):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"predict.root {str(root)!r} is not a directory")
        paths, not_images = find_images(root)
        skipped = [SkippedFile(relative_path(p, root), "not an image file") for p in not_images]
        loaded = open_images(
            paths,
            [-1] * len(paths),
            skipped,
            root=root,
            where=root,
            image_size=image_size,
            channels=channels,
            threads=decode_threads,
            resize=resize,
            interpolation=interpolation,
            stream=stream,
            corners=corners,
        )
        super().__init__(**loaded, classes=[])


# What the evaluation reads of a data set besides its items (see TensorImages).
_DATASET_API = ("classes", "sample_ids", "id_name", "skipped", "__len__", "__getitem__")


def build_dataset(data_config: Any, split: str, **kwargs: Any) -> TensorImages:
    """The configured data set's `split`, fitted to a model's input (`image_size`, `channels`)."""
    from omegaconf import OmegaConf

    # `in data_config` is False for a required (???) value: keys() lists it.
    needs_root = "root" in data_config.keys()  # noqa: SIM118
    if needs_root and OmegaConf.is_missing(data_config, "root"):
        raise UserError(f"data={data_config.name} needs data.root=DIR, the folder of images")
    dataset = instantiate(data_config.dataset, split=split, **kwargs)
    missing = [name for name in _DATASET_API if not hasattr(dataset, name)]
    if missing:  # a data set of the user's own (data.dataset._target_) must say these things
        raise UserError(
            f"data.dataset built a {type(dataset).__name__}, which lacks {', '.join(missing)}"
        )
    if len(dataset) == 0:
        raise UserError(f"data set {data_config.name!r} split {split!r} has no images")
    return cast(TensorImages, dataset)  # duck-typed: what TensorImages offers


def make_loader(
    dataset: Dataset[Any], *, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader[Any]:
    """A sequential loader; in-memory data sets are fetched a whole batch at a time. Worker
    processes, when asked for, persist between passes: timing repeats whole passes, and workers
    started anew for each pass cost more than they save on small images (scripts/bench.py).
    """
    if batch_size < 1:
        raise UserError(f"data.batch_size must be a positive integer, got {batch_size}")
    if num_workers < 0:
        raise UserError(f"data.num_workers must be 0 or more, got {num_workers}")
    batched_fetch = hasattr(dataset, "__getitems__")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_as_is if batched_fetch else None,
        persistent_workers=num_workers > 0,
    )


def _as_is(batch: Any) -> Any:
    return batch

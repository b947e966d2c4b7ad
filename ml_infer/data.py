"""Labelled image data sets that ship with installed packages, and their loaders.

Every data set yields `(image, label, sample_id)` with images as float tensors [C, H, W] in
[0, 1] at the size and channel count the model expects; normalisation happens later, in the
predictor, after test-time views are built. Each has `classes` (names, in label order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ml_infer.errors import UserError, one_of

SPLITS = ("train", "val", "test")


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


class TensorImages(Dataset):
    """Images already in memory; a batch is fetched with one indexing op, not per sample.

    Items are `(image, label, position)`: the position in this data set, which `sample_ids`
    maps to the sample's id (its index in the source data) under the column name `id_name`.
    """

    id_name = "index"

    def __init__(
        self, images: Tensor, labels: Tensor, sample_ids: Sequence[Any], classes: Sequence[str]
    ):
        self.images, self.labels = images, labels
        self.sample_ids = list(sample_ids)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor, int]:
        return self.images[position], self.labels[position], position

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        index = torch.as_tensor(positions)
        return self.images[index], self.labels[index], index


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
    ):
        from sklearn.datasets import load_digits

        if split not in SPLITS:
            raise one_of("split", split, SPLITS)
        digits = load_digits()
        labels = digits.target.astype(np.int64)
        ids = stratified_split(
            labels, seed=split_seed, val_fraction=val_fraction, test_fraction=test_fraction
        )[split]
        images = torch.from_numpy(digits.images[ids]).float().div_(16.0).unsqueeze(1)
        images = fit_images(images, image_size=image_size, channels=channels)
        super().__init__(
            images=images,
            labels=torch.from_numpy(labels[ids]),
            sample_ids=ids.tolist(),
            classes=[str(name) for name in digits.target_names],
        )


def fit_images(images: Tensor, *, image_size: Sequence[int] | None, channels: int) -> Tensor:
    """Resizes a [N, C, H, W] batch and converts gray <-> RGB to what a model expects."""
    if image_size is not None and tuple(images.shape[-2:]) != tuple(image_size):
        images = torch.nn.functional.interpolate(
            images, size=tuple(image_size), mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)
    if images.shape[1] == channels:
        return images
    if images.shape[1] == 1:
        return images.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        from ml_infer.augment import grayscale

        return grayscale(images)
    raise UserError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


def build_dataset(data_config: Any, split: str, **kwargs: Any) -> Dataset:
    """The configured data set's `split`, fitted to a model's input (`image_size`, `channels`)."""
    from ml_infer.config import instantiate

    dataset = instantiate(data_config.dataset, split=split, **kwargs)
    if len(dataset) == 0:
        raise UserError(f"data set {data_config.name!r} split {split!r} has no images")
    return dataset


def make_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A sequential loader; in-memory data sets are fetched a whole batch at a time."""
    if batch_size < 1:
        raise UserError(f"data.batch_size must be a positive integer, got {batch_size}")
    batched_fetch = hasattr(dataset, "__getitems__")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=_as_is if batched_fetch else None,
    )


def _as_is(batch: Any) -> Any:
    return batch

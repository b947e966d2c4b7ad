"""Data sets of images: held in memory (`TensorImages`), or image files streamed (decoded per
batch, never all held: `StreamedImages`), with one reader for files held or streamed, so that
both give the same pixels.

Streaming is for folders larger than memory: `stream=auto` streams when the decoded images
would take more than `STREAM_ABOVE_BYTES`. A streamed folder is checked once, when it is opened:
every file is read, hashed (the data's identity in the prediction store) and decoded (JPEGs at
1/8 scale), so that the files that cannot be used are skipped and listed before any pass, as
they are for a folder held in memory. Batches are then decoded where they are fetched: in
DataLoader worker processes when `data.num_workers` > 0, else in `decode_threads` threads.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ml_infer.decode import ImageReader, check_image, files_key, map_files
from ml_infer.errors import UserError, brief

log = logging.getLogger(__name__)

STREAM_ABOVE_BYTES = 1 << 30  # decoded uint8 pixels; the in-memory decode cache's limit too
STREAM_CHOICES = ("auto", True, False)


def should_stream(stream: Any, images: int, reader: ImageReader) -> bool:
    """`stream` as asked (true/false), or for `auto`, whether the decoded images would pass
    STREAM_ABOVE_BYTES."""
    if stream not in STREAM_CHOICES or (isinstance(stream, int) and not isinstance(stream, bool)):
        raise UserError(f"data.dataset.stream must be one of auto, true, false; got {stream!r}")
    if stream != "auto":
        return bool(stream)
    height, width = reader.size
    crops = 6 if reader.corners else 1  # crop views read each photo as six crops
    return images * crops * reader.channels * height * width > STREAM_ABOVE_BYTES


@functools.cache
def keep_large_buffers_off_the_heap() -> None:
    """glibc's malloc told to map every block of 1 MiB or more, and to unmap it when freed.

    By default glibc raises that threshold to the size of each mapped block freed (up to 32 MiB),
    after which a streamed batch's images (a few MiB each time, from several decode threads) are
    carved from per-thread heaps that keep what is freed: peak RSS grew 2.2x from 60 to 600
    images at 448 px in batches of 8, and stayed flat with this. Elsewhere than glibc, nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3  # glibc's malloc.h
    mallopt(m_mmap_threshold, 1 << 20)


@dataclasses.dataclass
class FolderCheck:
    digests: list[str]  # SHA-256 of each file's bytes
    errors: dict[int, str]  # position -> why the file cannot be used


def check_files(paths: Sequence[Path], threads: int) -> FolderCheck:
    """Every file read, hashed and test-decoded (`check_image`), in threads. The folders checked
    last (a sweep's scored and calibration folders) are kept for the next jobs of the sweep while
    no file has changed (paths, sizes, modification times)."""
    key = files_key(paths)
    if key is not None and key in _checked:
        return _checked[key]
    results = map_files(check_image, paths, threads)
    checked = FolderCheck(
        digests=[digest for digest, _ in results],
        errors={i: error for i, (_, error) in enumerate(results) if error is not None},
    )
    if key is not None:
        while len(_checked) >= _CHECKS_KEPT:
            _checked.pop(next(iter(_checked)))
        _checked[key] = checked
    return checked


_checked: dict[Any, FolderCheck] = {}  # oldest first
_CHECKS_KEPT = 4


@dataclasses.dataclass(frozen=True)
class SkippedFile:
    """A file under a data root that is not used, and why."""

    path: str
    reason: str


class TensorImages(Dataset[tuple[Tensor, Tensor, int]]):
    """Images already in memory; a batch is fetched with one indexing op, not per sample.

    Items are `(image, label, position)`: the position in this data set, which `sample_ids`
    maps to the sample's id (its index in the source data) under the column name `id_name`.
    """

    id_name = "index"
    shift: dict[str, Any] | None = None  # the corruption applied to the images (ml_infer.shift)

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        sample_ids: Sequence[Any],
        classes: Sequence[str],
        skipped: Sequence[SkippedFile] = (),
    ):
        self.images, self.labels = images, labels  # images: float in [0, 1], or uint8
        self.sample_ids = list(sample_ids)
        self.classes = list(classes)
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: Any = slice(None)) -> Tensor:
        """Images at `index` as float [..., C, H, W] in [0, 1] (uint8 storage is converted)."""
        images = self.images[index]
        return images.float().div_(255.0) if images.dtype == torch.uint8 else images

    def __getitem__(self, position: int) -> tuple[Tensor, Tensor, int]:
        return self.pixels(position), self.labels[position], position

    def __getitems__(self, positions: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        index = torch.as_tensor(positions)
        return self.pixels(index), self.labels[index], index

    def subset(self, positions: Sequence[int]) -> TensorImages:
        """The images at `positions`, as a data set of their own (same ids, classes, skipped)."""
        index = torch.as_tensor(list(positions), dtype=torch.long)
        part = TensorImages(
            self.images[index],
            self.labels[index],
            [self.sample_ids[i] for i in index.tolist()],
            self.classes,
            self.skipped,
        )
        part.id_name = self.id_name
        return part


class FileImages(TensorImages):
    """Image files, decoded once and held (`images`), or streamed: `images` is None and
    `pixels` decodes the files asked for, every time.

    A streamed set's `data_key` (the SHA-256 of each file and the reader's settings) is the
    data's identity in the prediction store; a held set is known by its pixels. A shift
    (ml_infer.shift) is applied to a streamed set per batch, after decoding (`corruption`).
    """

    def __init__(
        self,
        images: Tensor | None,
        labels: Tensor,
        sample_ids: Sequence[Any],
        classes: Sequence[str],
        skipped: Sequence[Any] = (),
        *,
        paths: Sequence[Path],
        reader: ImageReader,
        digests: Sequence[str] = (),
        decode_threads: int = 4,
    ):
        held = images if images is not None else torch.empty(0, dtype=torch.uint8)
        super().__init__(held, labels, sample_ids, classes, skipped)
        self.streamed = images is None
        if self.streamed:
            keep_large_buffers_off_the_heap()
        self.paths, self.digests = list(paths), list(digests)
        self.reader, self.decode_threads = reader, decode_threads
        # (images, their ids) -> the images corrupted: a streamed set's shift, or None
        self.corruption: Callable[[Tensor, list[Any]], Tensor] | None = None

    @property
    def data_key(self) -> str | None:
        if not self.streamed:
            return None
        described = {
            "files": self.digests,
            "ids": hashlib.sha256(json.dumps(self.sample_ids, default=str).encode()).hexdigest(),
            "reader": dataclasses.asdict(self.reader),
        }
        return "files:" + hashlib.sha256(json.dumps(described).encode()).hexdigest()

    def pixels(self, index: Any = slice(None)) -> Tensor:
        """Images at `index` (a position, a slice or positions), float in [0, 1]; a streamed
        set decodes them now (in threads, or one by one inside a DataLoader worker)."""
        if not self.streamed:
            return super().pixels(index)
        if isinstance(index, int):
            return self.pixels([index])[0]
        positions = range(len(self))[index] if isinstance(index, slice) else index
        positions = [int(p) for p in positions]
        in_worker = torch.utils.data.get_worker_info() is not None
        threads = 1 if in_worker else self.decode_threads
        paths = [self.paths[p] for p in positions]
        decoded = map_files(self._read, paths, threads)
        images = torch.from_numpy(np.stack(decoded)).float().div_(255.0)
        if self.corruption is not None:
            images = self.corruption(images, [self.sample_ids[p] for p in positions])
        return images

    def _read(self, path: Path) -> np.ndarray:
        try:
            return self.reader(path)
        except Exception as error:
            raise UserError(
                f"{path} could not be read while streaming ({type(error).__name__}: "
                f"{brief(error, 120)}); it was readable when the folder was opened: did it change?"
            ) from error

    def subset(self, positions: Sequence[int]) -> TensorImages:
        if not self.streamed:
            return super().subset(positions)
        chosen = [int(p) for p in positions]
        part = FileImages(
            None,
            self.labels[torch.as_tensor(chosen, dtype=torch.long)],
            [self.sample_ids[p] for p in chosen],
            self.classes,
            self.skipped,
            paths=[self.paths[p] for p in chosen],
            reader=self.reader,
            digests=[self.digests[p] for p in chosen],
            decode_threads=self.decode_threads,
        )
        part.id_name, part.shift, part.corruption = self.id_name, self.shift, self.corruption
        return part

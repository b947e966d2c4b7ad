"""Images in folders: finding them, loading the ones that decode, listing the ones that do not.

An image folder is torchvision's ImageFolder layout, `root/[split/]<class>/**/<image>`; names
starting with "." are ignored; files that are not images, or that cannot be decoded, are
skipped with the reason (`skipped_files.csv`), never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_infer.decode import ImageReader, decode_images, target_size
from ml_infer.errors import UserError
from ml_infer.imagesets import SkippedFile, check_files, should_stream

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


IMAGE_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)


def find_images(directory: Path) -> tuple[list[Path], list[Path]]:
    """Files under `directory` (recursively, sorted, hidden names ignored): images and the rest."""
    images: list[Path] = []
    others: list[Path] = []
    found = []
    # os.walk reads each folder once (scandir); hidden folders are not entered at all.
    for folder, subfolders, files in os.walk(directory):
        subfolders[:] = [name for name in subfolders if not hidden(name)]
        found += [Path(folder, name) for name in files if not hidden(name)]
    for path in sorted(found):
        (images if path.suffix.lower() in IMAGE_EXTENSIONS else others).append(path)
    return images, others


def open_images(
    paths: Sequence[Path],
    labels: Sequence[int],
    skipped: list[SkippedFile],
    *,
    root: Path,
    where: Path,
    image_size: Sequence[int] | int | None,
    channels: int,
    threads: int,
    resize: int | None = None,
    interpolation: str = "bilinear",
    stream: Any = "auto",
    corners: bool = False,
) -> dict[str, Any]:
    """`FileImages` arguments for the files that can be used, decoded and held, or checked and
    left to stream (`stream`: true, false, or auto: stream above STREAM_ABOVE_BYTES of pixels);
    the files that cannot be used join the skipped list. `corners`: each image as its six crops
    (`ImageReader`), for crop views."""
    reader = ImageReader(target_size(paths, image_size), channels, resize, interpolation, corners)
    streamed = should_stream(stream, len(paths), reader)
    if streamed:
        checked = check_files(paths, threads)
        errors, images, digests = checked.errors, None, checked.digests
    else:
        decoded = decode_images(paths, reader, threads)
        errors, digests = decoded.errors, []
        images = [image for image in decoded.images if image is not None]
    kept = [i for i in range(len(paths)) if i not in errors]
    skipped = skipped + [
        SkippedFile(relative_path(paths[i], root), errors[i]) for i in sorted(errors)
    ]
    if not kept:
        raise UserError(f"no readable images under {where} (skipped {len(skipped)} files)")
    if skipped:
        log.warning(
            "skipped %d of %d files under %s (listed in skipped_files.csv), e.g. %s: %s",
            len(skipped),
            len(skipped) + len(kept),
            where,
            skipped[0].path,
            skipped[0].reason,
        )
    if streamed:
        log.info("streaming %d images from %s (decoded per batch)", len(kept), where)
    return {
        "images": None if images is None else torch.from_numpy(np.stack(images)),
        "labels": torch.tensor([labels[i] for i in kept], dtype=torch.int64),
        "sample_ids": [relative_path(paths[i], root) for i in kept],
        "skipped": sorted(skipped, key=lambda entry: entry.path),
        "paths": [paths[i] for i in kept],
        "digests": [digests[i] for i in kept] if streamed else [],
        "reader": reader,
        "decode_threads": threads,
    }


def split_dir(root: Path, split: str) -> Path:
    if not root.is_dir():
        raise UserError(f"data.root {str(root)!r} is not a directory")
    present = [s for s in SPLITS if (root / s).is_dir()]
    if not present:
        if split == "train":
            raise UserError(
                f"{root} has no train/ folder: a folder of class folders is evaluation data; to "
                f"train, put images under {root}/train/<class>/ (and held-out ones under test/)"
            )
        return root  # no split folders: root holds the class folders, all of them evaluated
    if split not in present:
        raise UserError(f"no split {split!r} under {root}; found: {', '.join(present)}")
    return root / split


def hidden(entry: Path | str) -> bool:
    return (entry.name if isinstance(entry, Path) else entry).startswith(".")


def relative_path(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()

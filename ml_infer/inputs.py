"""What a model takes in: its input spec, and images decoded and converted to fit it.

`InputSpec` says what a model expects (size, channels, normalisation of [0, 1] pixels). Image
files of any mode (gray, RGB, RGBA, palette, 16-bit) are decoded in threads, converted to the
model's channels and resized to its size; a file that cannot be used is recorded with the
reason, never raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ml_infer.errors import UserError, brief


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects: image size, channels, and the normalisation of [0, 1] pixels."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> InputSpec:
        """Checks and converts {"size", "channels", "mean", "std"}; a UserError names the problem.

        >>> InputSpec.from_dict({"size": 8, "channels": 1, "mean": [0.5], "std": [0.2]}).size
        (8, 8)
        """
        try:
            size = spec["size"]
            size = (
                (int(size), int(size)) if isinstance(size, (int, float)) else tuple(map(int, size))
            )
            result = cls(
                size=size,
                channels=int(spec["channels"]),
                mean=tuple(float(m) for m in spec["mean"]),
                std=tuple(float(s) for s in spec["std"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"input spec {dict(spec)} is malformed ({error!r})") from None
        if len(result.size) != 2 or min(result.size) < 1:
            raise UserError(f"input size must be [height, width] > 0, got {list(result.size)}")
        if result.size[0] * result.size[1] > MAX_IMAGE_PIXELS:
            # A file may ask for any size: every image would be resized to it.
            raise UserError(
                f"input size {list(result.size)} is more than {MAX_IMAGE_PIXELS} pixels an image"
            )
        if result.channels not in (1, 3):
            raise UserError(f"input channels must be 1 or 3, got {result.channels}")
        if len(result.mean) != result.channels or len(result.std) != result.channels:
            raise UserError(
                f"input mean {list(result.mean)} and std {list(result.std)} need one value per "
                f"channel ({result.channels})"
            )
        if not all(math.isfinite(v) for v in result.mean + result.std):
            raise UserError(
                f"input mean {list(result.mean)} and std {list(result.std)} must be finite"
            )
        if min(result.std) <= 0:
            raise UserError(f"input std must be positive, got {list(result.std)}")
        return result

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(images - mean) / std per channel, for [..., C, H, W] images in [0, 1]."""
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


# torchvision's rgb_to_grayscale weights, so `Contrast` matches `adjust_contrast` exactly.
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def grayscale(images: Tensor) -> Tensor:
    """Luminance [B, 1, H, W] of RGB images (torchvision's weights); gray images as they are."""
    if images.shape[-3] == 1:
        return images
    if images.shape[-3] != 3:
        return images.mean(dim=-3, keepdim=True)
    red, green, blue = images.unbind(dim=-3)
    weights = _GRAY_WEIGHTS
    return (weights[0] * red + weights[1] * green + weights[2] * blue).unsqueeze(-3)


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
        return grayscale(images)
    raise UserError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")


@dataclasses.dataclass
class DecodedImages:
    images: list[np.ndarray | None]  # uint8 [C, H, W], None where decoding failed
    errors: dict[int, str]

    @property
    def failed(self) -> list[int]:
        return sorted(self.errors)


def decode_images(
    paths: Sequence[Path],
    *,
    image_size: Sequence[int] | int | None,
    channels: int,
    threads: int = 4,
) -> DecodedImages:
    """Decodes, converts and resizes every file; failures are recorded, never raised.

    The jobs of a sweep run in one process under Hydra's basic launcher, each loading the same
    folder: the last result is kept (up to 1 GiB of pixels) and served again while no file has
    changed (same paths, sizes and modification times, same size and channels asked for).
    """
    if channels not in (1, 3):
        raise UserError(f"images can be read as 1 or 3 channels, not {channels}")
    key = _decode_key(paths, image_size, channels)
    if key is not None and _last_decoded.get("key") == key:
        return _last_decoded["value"]  # type: ignore[no-any-return]
    decoded = _decode(paths, image_size=image_size, channels=channels, threads=threads)
    pixels = sum(image.nbytes for image in decoded.images if image is not None)
    _last_decoded.clear()
    if key is not None and pixels <= _CACHE_BYTES:
        _last_decoded.update(key=key, value=decoded)
    return decoded


# The last folder decoded (see decode_images): at most one, at most _CACHE_BYTES of pixels.
_last_decoded: dict[str, Any] = {}
_CACHE_BYTES = 1 << 30


def _decode_key(
    paths: Sequence[Path], image_size: Sequence[int] | int | None, channels: int
) -> tuple[Any, ...] | None:
    """What decoding depends on; None when a file cannot be looked at (decode it again)."""
    try:
        files = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    except OSError:
        return None
    size = image_size if image_size is None or isinstance(image_size, int) else tuple(image_size)
    return (files, size, channels)


def _decode(
    paths: Sequence[Path],
    *,
    image_size: Sequence[int] | int | None,
    channels: int,
    threads: int,
) -> DecodedImages:
    size = _size_pair(image_size)
    if size is None:
        size = _common_size(paths) if paths else (1, 1)

    def decode(path: Path) -> np.ndarray | str:
        try:
            return read_image(path, size=size, channels=channels)
        except ImageTooLarge as error:
            return str(error)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            return f"unreadable image ({type(error).__name__}: {brief(error, 120)})"

    pool = ThreadPoolExecutor(max_workers=max(1, threads))
    try:
        with _own_size_limit():
            results = list(pool.map(decode, paths))
    except BaseException:  # SIGINT / SIGTERM: stop now, not after every queued file
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    images = [r if isinstance(r, np.ndarray) else None for r in results]
    errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
    return DecodedImages(images, errors)


# Larger images are skipped unread: PIL warns from this size on that a file may be a
# decompression bomb (a small file that decodes to gigabytes).
MAX_IMAGE_PIXELS = 89_478_485


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than MAX_IMAGE_PIXELS."""


@contextlib.contextmanager
def _own_size_limit() -> Iterator[None]:
    """PIL's decompression-bomb check off while `read_image` applies MAX_IMAGE_PIXELS itself:
    PIL would warn (a multi-line warning per file) or raise while opening, before the file can be
    skipped with a reason."""
    from PIL import Image

    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_image(path: Path, *, size: tuple[int, int], channels: int) -> np.ndarray:
    """One image file as uint8 [channels, H, W] at `size` (H, W), whatever its mode."""
    from PIL import Image

    with Image.open(path) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(
                f"image of {image.width}x{image.height} pixels is larger than the limit of "
                f"{MAX_IMAGE_PIXELS} pixels (a decompression bomb?); skipped unread"
            )
        image.load()
        image = _to_8bit(image)
        if channels == 1:
            image = image.convert("L")
        elif channels == 3:
            if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
                image = image.convert("RGBA").convert("RGB")
            image = image.convert("RGB")
        else:
            raise UserError(f"image channels must be 1 or 3, got {channels}")
        if image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def _to_8bit(image: Any) -> Any:
    """16-bit integer and float images scaled to 8 bits (PIL's convert would clip them)."""
    from PIL import Image

    if image.mode.startswith("I;16") or image.mode == "I":
        # PIL opens 16-bit PNGs as "I;16" or "I" depending on its version: both mean 0..65535.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(values / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    return image


def _size_pair(image_size: Sequence[int] | int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def _common_size(paths: Sequence[Path]) -> tuple[int, int]:
    from PIL import Image

    sizes = set()
    for path in paths:
        try:
            with _own_size_limit(), Image.open(path) as image:
                if image.width * image.height <= MAX_IMAGE_PIXELS:
                    sizes.add((image.height, image.width))
        except Exception:  # noqa: BLE001 - reported when decoding
            continue
    if len(sizes) != 1:
        raise UserError(
            f"images differ in size ({len(sizes)} sizes); set data.dataset.image_size=[H,W]"
        )
    return sizes.pop()

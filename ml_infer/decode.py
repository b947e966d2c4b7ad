"""Image files decoded: any mode converted to the model's channels, resized to its size (or, for
photos, the shorter side resized and the centre cropped, as torchvision's Resize + CenterCrop do),
in threads; a file that cannot be used is recorded with the reason, never raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ml_infer.crops import centre_crop, shorter_side, view_crops
from ml_infer.errors import UserError, brief
from ml_infer.inputs import MAX_IMAGE_PIXELS


@dataclasses.dataclass
class DecodedImages:
    images: list[np.ndarray | None]  # uint8 [C, H, W], None where decoding failed
    errors: dict[int, str]

    @property
    def failed(self) -> list[int]:
        return sorted(self.errors)


@dataclasses.dataclass(frozen=True)
class ImageReader:
    """How a file becomes a model's input: uint8 [channels, H, W] at `size` (see read_image),
    or with `corners`, the crops of the resized photo that crop views use, [6, channels, H, W]."""

    size: tuple[int, int]
    channels: int
    resize: int | None = None
    interpolation: str = "bilinear"
    corners: bool = False

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise UserError(f"images can be read as 1 or 3 channels, not {self.channels}")
        if self.corners and self.resize is not None and self.resize < max(self.size):
            raise UserError(
                f"crop views need the photo's shorter side resized to at least the crop: "
                f"resize {self.resize} is smaller than the {self.size[1]}x{self.size[0]} input"
            )
        if self.corners and self.resize is None:
            raise UserError(
                "crop views (five_crop, ten_crop) need photos read with a resize before the "
                "centre crop (checkpoint.input.resize or crop_pct, or a torchvision weights "
                "entry); this input resizes straight to the model's size"
            )

    def __call__(self, path: Path) -> np.ndarray:
        return read_image(path, **dataclasses.asdict(self))


def decode_images(paths: Sequence[Path], reader: ImageReader, threads: int = 4) -> DecodedImages:
    """Decodes, converts and resizes every file; failures are recorded, never raised.

    The jobs of a sweep run in one process under Hydra's basic launcher, each loading the same
    folder: the last result is kept (up to 1 GiB of pixels) and served again while no file has
    changed (same paths, sizes and modification times, the same reader).
    """
    files = files_key(paths)
    key = None if files is None else (files, reader)
    if key is not None and _last_decoded.get("key") == key:
        cached: DecodedImages = _last_decoded["value"]
        return cached
    decoded = _decode(paths, reader, threads)
    pixels = sum(image.nbytes for image in decoded.images if image is not None)
    _last_decoded.clear()
    if key is not None and pixels <= _CACHE_BYTES:
        _last_decoded.update(key=key, value=decoded)
    return decoded


# The last folder decoded (see decode_images): at most one, at most _CACHE_BYTES of pixels.
_last_decoded: dict[str, Any] = {}
_CACHE_BYTES = 1 << 30


def _decode(paths: Sequence[Path], reader: ImageReader, threads: int) -> DecodedImages:
    def decode(path: Path) -> np.ndarray | str:
        try:
            return reader(path)
        except ImageTooLarge as error:
            return str(error)
        except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
            return f"unreadable image ({type(error).__name__}: {brief(error, 120)})"

    results = map_files(decode, paths, threads)
    images = [r if isinstance(r, np.ndarray) else None for r in results]
    errors = {i: r for i, r in enumerate(results) if isinstance(r, str)}
    return DecodedImages(images, errors)


def files_key(paths: Sequence[Path]) -> tuple[Any, ...] | None:
    """What says a folder's files are unchanged (paths, sizes, modification times); None when a
    file cannot be looked at."""
    try:
        return tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    except OSError:
        return None


def map_files(function: Callable[[Path], Any], paths: Sequence[Path], threads: int) -> list[Any]:
    """`function` of every file, in `threads` threads, PIL's own size limit off; SIGINT or
    SIGTERM stops it at once, not after every queued file. One thread: in this one, in order."""
    if threads <= 1 or len(paths) < 2:
        with _own_size_limit():
            return [function(path) for path in paths]
    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        with _own_size_limit():
            results = list(pool.map(function, paths))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


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


def read_image(
    path: Path,
    *,
    size: tuple[int, int],
    channels: int,
    resize: int | None = None,
    interpolation: str = "bilinear",
    corners: bool = False,
) -> np.ndarray:
    """One image file as uint8 [channels, H, W] at `size` (H, W), whatever its mode: resized to
    `size`, or, with `resize`, its shorter side to `resize` and then cropped to `size` about its
    centre, as torchvision's Resize(resize) + CenterCrop(size) do to a PIL image; with `corners`
    too, [6, channels, H, W]: the crops of the resized photo that crop views use (`view_crops`).

    JPEGs in RGB or gray are decoded by torchvision.io (libjpeg-turbo: the same pixels as PIL's
    decoder in 60% of its time here), every other file by PIL; resizing is PIL's, which
    torchvision's and timm's evaluation transforms use (torch's own kernel was twice as fast
    but 1/255 off in 0.1-0.2% of the pixels, enough to move probabilities by more than 1e-5)."""
    from PIL import Image

    with open_image(path) as opened:
        image: Any = opened
        check_pixel_count(image)  # from the header, before any pixel is decoded
        if _decodes_with_torchvision(image, channels):
            pixels = _decode_jpeg(path.read_bytes(), channels)
            image = Image.fromarray(pixels.permute(1, 2, 0).squeeze(-1).contiguous().numpy())
        else:
            image.load()
            image = _to_channels(_to_8bit(image), channels)
        resample = {
            "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC,
        }[interpolation]
        if resize is not None:
            resized = image.resize(shorter_side(image.size, resize), resample)
            if corners:
                return np.stack([_channels_first(crop) for crop in view_crops(resized, size)])
            image = centre_crop(resized, size)
        elif image.size != (size[1], size[0]):
            image = image.resize((size[1], size[0]), resample)
        return _channels_first(image)


def _channels_first(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()


def check_image(path: Path) -> tuple[str, str | None]:
    """The SHA-256 of a file's bytes, and why it cannot be used as an image (None when it can):
    the header read and the whole file decoded, JPEGs at 1/8 scale (every byte is still read,
    so a truncated file fails here), nothing kept."""
    try:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as error:
        return "", f"unreadable file ({type(error).__name__}: {brief(error, 120)})"
    try:
        with open_image(path) as image:
            check_pixel_count(image)
            if image.format == "JPEG":
                image.draft(image.mode, (1, 1))
            image.load()
    except ImageTooLarge as error:
        return digest, str(error)
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
        return digest, f"unreadable image ({type(error).__name__}: {brief(error, 120)})"
    return digest, None


# The formats PIL may read: those of IMAGE_EXTENSIONS, never one that runs an interpreter on
# the file (EPS goes to Ghostscript) whatever the file's name says.
PIL_FORMATS = ("BMP", "GIF", "JPEG", "MPO", "PNG", "PPM", "TIFF", "WEBP")


def open_image(path: Path) -> Any:
    """PIL's lazy image of a file (its header read, no pixel decoded), in PIL_FORMATS only."""
    from PIL import Image

    return Image.open(path, formats=_readable_formats())


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """PIL_FORMATS that this Pillow reads (Pillow 13 reads MPO files as JPEG)."""
    from PIL import Image

    Image.init()
    return tuple(name for name in PIL_FORMATS if name in Image.OPEN)


def check_pixel_count(image: Any) -> None:
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(
            f"image of {image.width}x{image.height} pixels is larger than the limit of "
            f"{MAX_IMAGE_PIXELS} pixels (a decompression bomb?); skipped unread"
        )


def _decodes_with_torchvision(image: Any, channels: int) -> bool:
    """A JPEG whose conversion to `channels` libjpeg-turbo does as PIL does (RGB read as RGB, gray
    as gray or RGB; CMYK and RGB-to-gray conversions differ by rounding), when torchvision still
    has its decoder."""
    return (
        image.format == "JPEG"
        and (image.mode, channels) in {("RGB", 3), ("L", 3), ("L", 1)}
        and _torchvision_jpeg_decoder() is not None
    )


@functools.cache
def _torchvision_jpeg_decoder() -> Any:
    """torchvision.io's decode_jpeg, or None where torchvision no longer has it. torchvision
    0.29 deprecates it for torchcodec's, which gives the same pixels but took 1.6x its time here
    (and loads libraries built for one torch version): until it is removed, it is used, its
    deprecation warning silenced, and PIL decodes where it is gone."""
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        return None
    warnings.filterwarnings(
        "ignore",
        message="The image decoding and encoding capabilities of TorchVision",
        category=DeprecationWarning,
    )
    return decode_jpeg


def _decode_jpeg(encoded: bytes, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    encoded_tensor = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
    pixels: torch.Tensor = _torchvision_jpeg_decoder()(encoded_tensor, mode=mode)
    return pixels


def _to_channels(image: Any, channels: int) -> Any:
    if channels == 1:
        return image.convert("L")
    if channels != 3:
        raise UserError(f"image channels must be 1 or 3, got {channels}")
    if image.mode in ("P", "PA", "LA", "RGBA") or "transparency" in image.info:
        image = image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


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


def target_size(paths: Sequence[Path], image_size: Sequence[int] | int | None) -> tuple[int, int]:
    """(H, W) images are read at: `image_size`, or the one size every file has."""
    size = _size_pair(image_size)
    if size is not None:
        return size
    return _common_size(paths) if paths else (1, 1)


def _size_pair(image_size: Sequence[int] | int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = (int(v) for v in image_size)
    return (height, width)


def _common_size(paths: Sequence[Path]) -> tuple[int, int]:

    sizes = set()
    for path in paths:
        try:
            with _own_size_limit(), open_image(path) as image:
                if image.width * image.height <= MAX_IMAGE_PIXELS:
                    sizes.add((image.height, image.width))
        except Exception:  # noqa: BLE001 - reported when decoding
            continue
    if len(sizes) != 1:
        raise UserError(
            f"images differ in size ({len(sizes)} sizes); set data.dataset.image_size=[H,W]"
        )
    return sizes.pop()

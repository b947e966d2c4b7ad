"""What a model takes in: `InputSpec` (size, channels, normalisation of [0, 1] pixels, and for
photos the resize before the centre crop), from a checkpoint, the config or a torchvision
weights entry; and image batches converted to fit it. Files are decoded in `ml_infer.decode`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ml_infer.errors import UserError, brief

# Larger images are skipped unread: PIL warns from this size on that a file may be a
# decompression bomb (a small file that decodes to gigabytes).
MAX_IMAGE_PIXELS = 89_478_485

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects: image size, channels, and the normalisation of [0, 1] pixels.

    With `resize`, a photo is first resized so that its shorter side is `resize` pixels and then
    cropped to `size` about its centre (torchvision's and timm's evaluation transform: resize
    256, crop 224); without, it is resized to `size` directly. `interpolation` is the filter of
    that resize (antialiased, as Pillow's resize always is).
    """

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None = None
    interpolation: str = "bilinear"

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
                resize=_resize_of(spec, size),
                interpolation=str(spec.get("interpolation") or "bilinear"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"input spec {dict(spec)} is malformed ({error!r})") from None
        if result.interpolation not in INTERPOLATIONS:
            raise UserError(
                f"input interpolation {result.interpolation!r} is not one of {list(INTERPOLATIONS)}"
            )
        if result.resize is not None and not min(result.size) <= result.resize <= 4 * max(
            result.size
        ):
            raise UserError(
                f"input resize {result.resize} must be at least the crop size {list(result.size)}"
            )
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
        found: dict[str, Any] = {
            "size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.resize is not None:
            found |= {"resize": self.resize, "interpolation": self.interpolation}
        return found

    def fit(self) -> dict[str, Any]:
        """What a data set needs to make images of this input: size and channels, and the
        resize before the centre crop when there is one."""
        found: dict[str, Any] = {"image_size": list(self.size), "channels": self.channels}
        if self.resize is not None:
            found |= {"resize": self.resize, "interpolation": self.interpolation}
        return found


def _resize_of(spec: Mapping[str, Any], size: tuple[int, ...]) -> int | None:
    """`resize`, or the shorter side timm resizes to for `crop_pct`: floor(size / crop_pct)."""
    if spec.get("resize") is not None:
        return int(spec["resize"])
    crop_pct = spec.get("crop_pct")
    if crop_pct is None:
        return None
    if not 0 < float(crop_pct) <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return math.floor(min(size) / float(crop_pct))


def torchvision_weights_input(name: str) -> InputSpec:
    """The evaluation input of a torchvision weights entry (e.g. `ResNet18_Weights.IMAGENET1K_V1`:
    resize 256, crop 224, bilinear, ImageNet's mean and std), read from its metadata: the
    weights themselves are not downloaded."""
    from torchvision.models import get_weight

    try:
        transform = get_weight(name).transforms()
    except (ValueError, KeyError, AttributeError) as error:
        raise UserError(
            f"checkpoint.input.weights={name!r} is not a torchvision weights entry "
            f"(e.g. ResNet18_Weights.IMAGENET1K_V1): {brief(error, 120)}"
        ) from None
    return InputSpec.from_dict(
        {
            "size": list(transform.crop_size) * (2 // len(transform.crop_size)),
            "channels": 3,
            "mean": list(transform.mean),
            "std": list(transform.std),
            "resize": transform.resize_size[0],
            "interpolation": transform.interpolation.value,
        }
    )


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


def fit_images(
    images: Tensor,
    *,
    image_size: Sequence[int] | None,
    channels: int,
    resize: int | None = None,
    interpolation: str = "bilinear",
) -> Tensor:
    """Resizes a [N, C, H, W] batch (with `resize`: the shorter side, then a centre crop to
    `image_size`) and converts gray <-> RGB to what a model expects."""
    if resize is not None and image_size is not None:
        from torchvision.transforms.v2 import functional

        mode = {"bilinear": functional.InterpolationMode.BILINEAR}.get(
            interpolation, functional.InterpolationMode.BICUBIC
        )
        images = functional.resize(images, [resize], interpolation=mode, antialias=True)
        images = functional.center_crop(images, list(image_size)).clamp_(0.0, 1.0)
    elif image_size is not None and tuple(images.shape[-2:]) != tuple(image_size):
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

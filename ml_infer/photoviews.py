"""Test-time views for photographs: crops of the resized photo and rescaled views.

`five_crop` and `ten_crop` are torchvision's FiveCrop / TenCrop of the photo after its shorter
side is resized (before the centre crop): their corners lie outside the centre crop the model
sees, so the data set delivers them. A data set read for a crop view gives each image as
[6, C, H, W] (the centre crop; the top-left, top-right, bottom-left and bottom-right crops; the
crop TenCrop mirrors for its mirrored centre: `ml_infer.crops.view_crops`), and `Views` passes
these augmentations the crops, every other augmentation the centre one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ml_infer.augment import Augmentation
from ml_infer.errors import UserError

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")


class FiveCrop(Augmentation):
    """The four corner crops (the centre crop is the identity view): torchvision's FiveCrop."""

    needs_corners = True
    view_names = CORNERS

    def __call__(self, crops: Tensor) -> Tensor:
        """[B, 6, C, H, W] crops (centre first) -> the corner views [4, B, C, H, W]."""
        return crops[:, 1:5].transpose(0, 1)


class TenCrop(Augmentation):
    """The four corner crops and five mirrored ones: torchvision's TenCrop (vertical_flip=False)
    without its centre crop, which is the identity view. TenCrop crops the mirrored photo, whose
    top-left crop is the top-right crop mirrored ("top_right+horizontal_flip" here), and whose
    centre crop is one pixel off the mirrored centre crop where the margin is odd (hence
    "mirrored_centre", not "horizontal_flip", which mirrors the identity view)."""

    needs_corners = True
    view_names = (
        *CORNERS,
        "mirrored_centre",
        *(f"{corner}+horizontal_flip" for corner in CORNERS),
    )

    def __call__(self, crops: Tensor) -> Tensor:
        views = crops.transpose(0, 1)  # [6, B, C, H, W], the centre first
        return torch.cat([views[1:5], views[5:].flip(-1), views[1:5].flip(-1)])


class Scale(Augmentation):
    """The image resized by each factor about its centre (bilinear, antialiased), then cropped
    back to its size (factor > 1: a zoom in) or padded with black (< 1: a zoom out)."""

    name = "scale"

    def __init__(self, factors: Sequence[float] = (0.9, 1.1)) -> None:
        if len(factors) == 0 or any(not (0.25 <= f <= 4.0) or f == 1.0 for f in factors):
            raise UserError(
                f"scale factors must lie in [0.25, 4] and differ from 1, got {list(factors)}"
            )
        self.factors = tuple(float(f) for f in factors)
        self.view_names = tuple(f"scale_{f:g}" for f in self.factors)

    def __call__(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        views = []
        for factor in self.factors:
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
            resized = torch.nn.functional.interpolate(
                images, size=size, mode="bilinear", antialias=True, align_corners=False
            ).clamp_(0.0, 1.0)
            views.append(_centre_fit(resized, height, width))
        return torch.stack(views)


def _centre_fit(images: Tensor, height: int, width: int) -> Tensor:
    """Images cropped or padded (black) about their centre to height x width, at torchvision's
    CenterCrop offsets."""
    out = images.new_zeros((*images.shape[:-2], height, width))
    source_h, source_w = images.shape[-2:]
    rows = _overlap(source_h, height)
    cols = _overlap(source_w, width)
    out[..., rows[1], cols[1]] = images[..., rows[0], cols[0]]
    return out


def _overlap(source: int, target: int) -> tuple[slice, slice]:
    """(source slice, target slice) of a centre crop (source >= target) or centre pad."""
    if source >= target:
        start = round((source - target) / 2.0)
        return slice(start, start + target), slice(0, target)
    start = (target - source) // 2
    return slice(0, source), slice(start, start + source)

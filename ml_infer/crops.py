"""Where a photo is cut: torchvision's Resize(int) sizes and its CenterCrop, FiveCrop and
TenCrop offsets, on PIL images."""

from __future__ import annotations

from typing import Any

from ml_infer.errors import UserError


def shorter_side(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter` and the aspect kept, rounded down as
    torchvision's Resize(int) rounds.

    >>> shorter_side((640, 480), 256)
    (341, 256)
    """
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_crop(image: Any, size: tuple[int, int]) -> Any:
    """The (H, W) `size` centre of a PIL image, at torchvision's CenterCrop offsets
    (round((side - crop) / 2)); a crop larger than the image is padded with black as there."""
    from PIL import Image

    height, width = size
    if image.width < width or image.height < height:
        padded = Image.new(image.mode, (max(width, image.width), max(height, image.height)))
        padded.paste(
            image, ((padded.width - image.width) // 2, (padded.height - image.height) // 2)
        )
        image = padded
    top = round((image.height - height) / 2.0)
    left = round((image.width - width) / 2.0)
    return image.crop((left, top, left + width, top + height))


def view_crops(image: Any, size: tuple[int, int]) -> list[Any]:
    """The (H, W) `size` crops of a PIL image that crop views use, at torchvision's offsets: the
    centre, top-left, top-right, bottom-left and bottom-right crops (FiveCrop), then the crop
    whose mirror image is TenCrop's mirrored centre (the centre crop of the mirrored photo lies
    one pixel to the other side of the mirrored centre crop where the margin is odd)."""
    height, width = size
    if image.width < width or image.height < height:
        raise UserError(
            f"a {image.width}x{image.height} photo is smaller than the {width}x{height} crop"
        )
    right, bottom = image.width - width, image.height - height
    centre_left, top = round(right / 2.0), round(bottom / 2.0)
    corners = [(0, 0), (right, 0), (0, bottom), (right, bottom), (right - centre_left, top)]
    return [
        centre_crop(image, size),
        *(image.crop((left, top, left + width, top + height)) for left, top in corners),
    ]

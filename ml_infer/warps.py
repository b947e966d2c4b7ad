"""The corruptions that move pixels: four blurs and the elastic transform (Hendrycks & Dietterich,
ICLR 2019; CIFAR-10-C's parameters, see `ml_infer.corruptions` for the conventions).

Each is written as sums of shifted copies or bilinear samples gathered by index: the operations
of the published code (scikit-image's gaussian, OpenCV's filter2D and warpAffine, ImageMagick's
motion blur, scipy's zoom and map_coordinates) with their kernels and border rules, computed
here on whole batches on any device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ml_infer.corruptions import (
    Corruption,
    border_index,
    gaussian_filter,
    gaussian_weights,
    length_scale,
    taps_along,
)


class GaussianBlur(Corruption):
    """scikit-image's gaussian (truncated at 4 sigma, border pixels repeated)."""

    name = "gaussian_blur"
    parameters = (0.4, 0.6, 0.7, 0.8, 1.0)  # sigma, pixels

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        sigma = self.parameters[severity - 1] * length_scale(images)
        return gaussian_filter(images, sigma, truncate=4.0, mode="edge")


def defocus_kernel(radius: float, alias_blur: float) -> Tensor:
    """An anti-aliased disk: the pixels within `radius` of the centre, normalised, smoothed by
    a 3x3 Gaussian of sigma `alias_blur` (5x5 past radius 8), zero rows and columns trimmed."""
    half = 8 if radius <= 8 else math.ceil(radius)
    size = 3 if radius <= 8 else 5
    grid = np.arange(-half, half + 1, dtype=np.float64)
    disk = torch.from_numpy((grid[None, :] ** 2 + grid[:, None] ** 2 <= radius**2) * 1.0)
    disk /= disk.sum()
    smooth = gaussian_weights(alias_blur, size // 2)
    padded = torch.nn.functional.pad(disk[None, None], (size // 2,) * 4)[0, 0]
    kernel = sum(
        smooth[i] * smooth[j] * padded[i : i + len(grid), j : j + len(grid)]
        for i in range(size)
        for j in range(size)
    )
    assert isinstance(kernel, Tensor)
    rows, cols = kernel.sum(dim=1).nonzero(), kernel.sum(dim=0).nonzero()
    return kernel[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


class DefocusBlur(Corruption):
    """The image filtered with an anti-aliased disk (OpenCV's filter2D, borders mirrored)."""

    name = "defocus_blur"
    parameters = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # radius, alias

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        radius, alias_blur = self.parameters[severity - 1]
        kernel = defocus_kernel(radius * length_scale(images), alias_blur)
        rows, cols = kernel.shape
        height, width = images.shape[-2:]
        out = torch.zeros_like(images)
        for dy in range(rows):
            row_index = border_index(torch.arange(height) + dy - rows // 2, height, "reflect101")
            shifted_rows = images.index_select(2, row_index.to(images.device))
            for dx in range(cols):
                weight = float(kernel[dy, dx])
                if weight == 0.0:
                    continue
                col_index = border_index(torch.arange(width) + dx - cols // 2, width, "reflect101")
                out = out + shifted_rows.index_select(3, col_index.to(images.device)) * weight
        return out


class MotionBlur(Corruption):
    """ImageMagick's motion blur: a one-sided Gaussian trail of 2 * ceil(radius) + 1 taps at a
    random angle in [-45, 45] degrees per image, taps at whole-pixel offsets, borders repeated.
    Severities 3 and 4 differ only in radius (6 and 8 at sigma 2): the four taps they add, at
    offsets 13 to 16, weigh about 1e-9, so as published they blur the same."""

    name = "motion_blur"
    parameters = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # radius, sigma

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        uniform = torch.rand((), generator=generator, dtype=torch.float64)
        return {"angle": uniform * 90.0 - 45.0}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        scale = length_scale(images)
        radius, sigma = (value * scale for value in self.parameters[severity - 1])
        taps = 2 * math.ceil(radius) + 1
        steps = torch.arange(taps, dtype=torch.float64)
        weights = gaussian_weights(sigma, taps - 1, one_sided=True)
        angle = draws["angle"].cpu() * (math.pi / 180.0)
        batch, channels, height, width = images.shape
        out = torch.zeros_like(images)
        for step, weight in zip(steps, weights.tolist()):
            dx = torch.ceil(step * torch.cos(angle) - 0.5).long()
            dy = torch.ceil(step * torch.sin(angle) - 0.5).long()
            rows = (torch.arange(height).view(1, -1) + dy.view(-1, 1)).clamp(0, height - 1)
            cols = (torch.arange(width).view(1, -1) + dx.view(-1, 1)).clamp(0, width - 1)
            rows = rows.to(images.device).view(batch, 1, height, 1).expand(-1, channels, -1, width)
            cols = cols.to(images.device).view(batch, 1, 1, width).expand(-1, channels, height, -1)
            out = out + images.gather(2, rows).gather(3, cols) * weight
        return out


def zoom_taps(size: int, zoom: float) -> tuple[Tensor, Tensor]:
    """The taps of a zoom by `zoom` about the centre along one axis (bilinear). The published
    code crops ceil(size / zoom) pixels from (size - crop) // 2 and rescales them with scipy's
    zoom: an image of h pixels is left unchanged by zooms under h / (h - 1) (an 8-pixel digit
    by every zoom up to 1.14, so by all of severity 1 and 2), and the crop's offset and scipy's
    corner alignment shift the zoomed copies by up to a pixel. Sampling at centre + offset /
    zoom does neither; at 32 pixels it changes an image about half as much as published at
    severity 1 (mean absolute change 0.029 vs 0.056) and 10% less at severity 5."""
    centre = (size - 1) / 2
    positions = centre + (torch.arange(size, dtype=torch.float64) - centre) / zoom
    low = positions.floor()
    fraction = positions - low
    low_index = low.long().clamp(0, size - 1)
    high_index = (low_index + 1).clamp(max=size - 1)
    return torch.stack([low_index, high_index], 1), torch.stack([1 - fraction, fraction], 1)


class ZoomBlur(Corruption):
    """The mean of the image and its centre zoomed by 1.00, 1.01, ... up to 1.06-1.25."""

    name = "zoom_blur"

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        end = (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1]
        zooms = np.arange(1, end, 0.01)  # as published: float end points make 7, 12, 16, 21, 26
        total = images
        for zoom in zooms.tolist():
            zoomed = taps_along(images, 2, *zoom_taps(images.shape[2], zoom))
            total = total + taps_along(zoomed, 3, *zoom_taps(images.shape[3], zoom))
        return total / (len(zooms) + 1)


def bilinear(images: Tensor, rows: Tensor, cols: Tensor, mode: str) -> Tensor:
    """images [B, C, H, W] sampled at per-image coordinates rows, cols [B, H, W] (pixel units),
    the four neighbours' indices mapped inside by `mode`."""
    channels, height, width = images.shape[1:]
    row0, col0 = rows.floor(), cols.floor()
    row_weight, col_weight = (rows - row0).unsqueeze(1), (cols - col0).unsqueeze(1)
    row0, col0 = row0.long(), col0.long()
    flat = images.flatten(2)

    def at(r: Tensor, c: Tensor) -> Tensor:
        index = border_index(r, height, mode) * width + border_index(c, width, mode)
        return flat.gather(2, index.flatten(1).unsqueeze(1).expand(-1, channels, -1)).view(
            images.shape
        )

    top = at(row0, col0) * (1 - col_weight) + at(row0, col0 + 1) * col_weight
    bottom = at(row0 + 1, col0) * (1 - col_weight) + at(row0 + 1, col0 + 1) * col_weight
    return top * (1 - row_weight) + bottom * row_weight


def affine_between(source: Tensor, target: Tensor) -> Tensor:
    """[B, 3, 2] matrices A with [x, y, 1] @ A mapping each image's 3 `source` points [B, 3, 2]
    onto its `target` points (Cramer's rule, elementwise)."""
    ones = torch.ones_like(source[..., :1])
    points = torch.cat([source, ones], dim=-1)  # [B, 3, 3]
    (a, b, c), (d, e, f), (g, h, i) = (points[:, r].unbind(-1) for r in range(3))
    cofactors = torch.stack(
        [
            torch.stack([e * i - f * h, c * h - b * i, b * f - c * e], -1),
            torch.stack([f * g - d * i, a * i - c * g, c * d - a * f], -1),
            torch.stack([d * h - e * g, b * g - a * h, a * e - b * d], -1),
        ],
        -2,
    )
    determinant = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    inverse = cofactors / determinant.view(-1, 1, 1)
    # inverse @ target, written out: a BLAS product may add in another order on another machine.
    product = inverse[:, :, 0, None] * target[:, None, 0, :]
    for k in (1, 2):
        product = product + inverse[:, :, k, None] * target[:, None, k, :]
    return product


class ElasticTransform(Corruption):
    """A random affine warp of three points (OpenCV's warpAffine, borders mirrored), then a
    smooth random displacement field (scipy's map_coordinates); lengths are fractions of the
    side: (displacement scale, field smoothness, point jitter).

    As published, the point jitter falls with severity (0.08 to 0.03) while the displacement
    grows, and the image changes less at severity 5 than at 1 (mean absolute change 0.061 vs
    0.035 on 32-pixel photo patches). Here the published jitters are taken in increasing order,
    so that both parts grow with severity: severities 1, 2, 4 and 5 are then (displacement,
    smoothness, jitter) triples of our own, made of published values.
    """

    name = "elastic_transform"
    parameters = (
        (0.0, 0.0, 0.03),
        (0.05, 0.2, 0.05),
        (0.08, 0.06, 0.06),
        (0.1, 0.04, 0.07),
        (0.1, 0.03, 0.08),
    )

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        def uniform(*shape: int) -> Tensor:
            return torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1

        height, width = image.shape[-2:]
        return {"jitter": uniform(3, 2), "dx": uniform(height, width), "dy": uniform(height, width)}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        batch, _, height, width = images.shape
        side = min(height, width)
        scale, smoothness, jitter = (value * side for value in self.parameters[severity - 1])
        centre_x, centre_y, square = float(width // 2), float(height // 2), max(1, side // 3)
        corners = [  # (x, y) points
            [centre_x + square, centre_y + square],
            [centre_x + square, centre_y - square],
            [centre_x - square, centre_y - square],
        ]
        source = torch.tensor(corners, dtype=torch.float64, device=images.device)
        source = source.expand(batch, -1, -1)
        target = source + draws["jitter"] * jitter
        to_source = affine_between(target, source)  # each output pixel reads from its preimage
        rows, cols = torch.meshgrid(
            torch.arange(height, dtype=torch.float64, device=images.device),
            torch.arange(width, dtype=torch.float64, device=images.device),
            indexing="ij",
        )

        def mapped(axis: int) -> Tensor:  # [x, y, 1] @ to_source, written out as for affine_between
            weights = to_source[:, :, axis].view(batch, 3, 1, 1)
            return cols * weights[:, 0] + rows * weights[:, 1] + weights[:, 2]

        warped = bilinear(images, mapped(1), mapped(0), "reflect101")
        if scale == 0:
            return warped
        dx = gaussian_filter(draws["dx"], smoothness, truncate=3.0, mode="symmetric") * scale
        dy = gaussian_filter(draws["dy"], smoothness, truncate=3.0, mode="symmetric") * scale
        return bilinear(warped, rows + dy, cols + dx, "symmetric")

"""Common corruptions of [0, 1] images, after Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations" (ICLR 2019), as batched tensor operations.

Parameters per severity 1-5 are those the authors published for 32-pixel images (CIFAR-10-C,
`make_cifar_c.py` of github.com/hendrycks/robustness). Lengths in pixels (blur sigmas and radii)
are used as published for images up to 32 pixels and grow with the image above that
(x side / 32), so that a 224-pixel photo is blurred as much, relative to its size, as a CIFAR
image; the elastic transform's lengths are fractions of the side, as published.

Each corruption works on a batch [B, C, H, W] on any device. Its random numbers are drawn per
image from that image's own generator (`draw`), so an image's corruption does not depend on
the batch it is in. The arithmetic runs in float64 and is rounded to float32 once at the end:
sums that another batch size or thread count adds up in another order round to the same
pixels. Gray images (C = 1) are corrupted as they are; saturation, which a gray image does not
have, leaves them unchanged (`needs_colour`).

Blurs and the elastic transform are in `ml_infer.warps`. Adding a corruption: one class and one
yaml file in `conf/shift/` whose `corruption._target_` names it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ml_infer.errors import UserError

SEVERITIES = (1, 2, 3, 4, 5)
CIFAR_SIDE = 32  # the image side the published parameters were made for


def check_severity(severity: Any) -> int:
    """`shift.severity` as an int from 0 (clean) to 5."""
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
        raise UserError(f"shift.severity must be an integer from 0 (clean) to 5, got {severity!r}")
    return severity


class Corruption:
    """A corruption at severities 1-5 (`parameters[severity - 1]`) of [0, 1] image batches."""

    name = ""
    parameters: tuple[Any, ...] = ()
    needs_colour = False  # True: leaves 1-channel images as they are

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random numbers the corruption of one image [C, H, W] (float64, CPU) uses."""
        return {}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        """The corrupted batch [B, C, H, W], float64 (clamped to [0, 1] by the caller)."""
        raise NotImplementedError

    @property
    def is_random(self) -> bool:
        """Whether it draws random numbers (overrides `draw`): only then does it need a
        generator per image."""
        return type(self).draw is not Corruption.draw

    def applies_to(self, channels: int) -> bool:
        """Gray (1) or RGB (3) images; colour corruptions only RGB."""
        return channels == 3 or (channels == 1 and not self.needs_colour)

    def __call__(
        self, images: Tensor, severity: int, generators: Sequence[torch.Generator]
    ) -> Tensor:
        """`images` [B, C, H, W] in [0, 1] corrupted at `severity`, one generator per image
        (none needed when it is not `is_random`); severity 0, or an image kind the corruption
        does not apply to, returns `images`."""
        check_severity(severity)
        if severity == 0 or not self.applies_to(images.shape[1]):
            return images
        exact = images.detach().to(torch.float64)
        draws: dict[str, Tensor] = {}
        if self.is_random:
            if len(generators) != len(images):
                raise ValueError(f"{len(generators)} generators for {len(images)} images")
            per_image = [
                self.draw(image, severity, generator)
                for image, generator in zip(exact.cpu(), generators)
            ]
            draws = {
                key: torch.stack([d[key] for d in per_image]).to(images.device)
                for key in (per_image[0] if per_image else {})
            }
        return self.apply(exact, severity, draws).clamp_(0.0, 1.0).to(torch.float32)


def length_scale(images: Tensor) -> float:
    """How much the published pixel lengths grow for these images (1 up to 32 pixels)."""
    return max(1.0, min(images.shape[-2:]) / CIFAR_SIDE)


# --- Weighted taps: filters and resampling as sums of shifted copies, elementwise. ---


def border_index(index: Tensor, size: int, mode: str) -> Tensor:
    """Indices outside [0, size) mapped inside: `edge` repeats the border pixel, `reflect101`
    mirrors about it (d c b | a b c d -> c b | a b c), `symmetric` mirrors including it
    (b a | a b c d).

    >>> border_index(torch.arange(-2, 6), 4, "reflect101").tolist()
    [2, 1, 0, 1, 2, 3, 2, 1]
    >>> border_index(torch.arange(-2, 6), 4, "symmetric").tolist()
    [1, 0, 0, 1, 2, 3, 3, 2]
    """
    if mode == "edge" or size == 1:
        return index.clamp(0, size - 1)
    if mode == "reflect101":
        period = 2 * size - 2
        index = index.remainder(period)
        return torch.where(index >= size, period - index, index)
    if mode == "symmetric":
        period = 2 * size
        index = index.remainder(period)
        return torch.where(index >= size, period - 1 - index, index)
    raise ValueError(f"unknown border mode {mode!r}")


def taps_along(images: Tensor, dim: int, index: Tensor, weight: Tensor) -> Tensor:
    """out[..., o, ...] = sum_k weight[o, k] * images[..., index[o, k], ...] along `dim`: a 1-D
    filter or resampling, added up tap by tap in a fixed order."""
    shape = [1] * images.dim()
    shape[dim] = -1
    index, weight = index.to(images.device), weight.to(images.device, images.dtype)
    out = images.index_select(dim, index[:, 0]) * weight[:, 0].view(shape)
    for k in range(1, index.shape[1]):
        out = out + images.index_select(dim, index[:, k]) * weight[:, k].view(shape)
    return out


def gaussian_weights(sigma: float, radius: int, one_sided: bool = False) -> Tensor:
    """A normalised Gaussian kernel over offsets -radius..radius (scipy.ndimage's, OpenCV's), or
    over 0..radius when `one_sided` (ImageMagick's motion blur)."""
    offsets = torch.arange(0 if one_sided else -radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * offsets**2 / sigma**2)
    return weights / weights.sum()


def filter_taps(size: int, weights: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """The taps of a centred 1-D kernel over an axis of `size` pixels, borders by `mode`."""
    radius = (len(weights) - 1) // 2
    index = torch.arange(size).view(-1, 1) + torch.arange(-radius, radius + 1).view(1, -1)
    return border_index(index, size, mode), weights.view(1, -1).expand(size, -1)


def gaussian_filter(images: Tensor, sigma: float, truncate: float, mode: str) -> Tensor:
    """scipy.ndimage.gaussian_filter over the last two axes (radius int(truncate * sigma + 0.5))."""
    if sigma <= 0:
        return images
    weights = gaussian_weights(sigma, int(truncate * sigma + 0.5))
    for dim in (-2, -1):
        size = images.shape[dim]
        images = taps_along(images, images.dim() + dim, *filter_taps(size, weights, mode))
    return images


def area_taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor]:
    """The taps of resampling `in_size` pixels to `out_size` by area: output pixel o covers
    [o, o + 1) * in_size / out_size of the input, and takes each input pixel by its overlap.

    >>> index, weight = area_taps(4, 2)
    >>> index.tolist(), weight.tolist()
    ([[0, 1], [2, 3]], [[0.5, 0.5], [0.5, 0.5]])
    """
    scale = in_size / out_size
    rows = []
    for out in range(out_size):
        start, end = out * scale, (out + 1) * scale
        first, last = math.floor(start), min(math.ceil(end), in_size)
        covered = [(i, min(end, i + 1) - max(start, i)) for i in range(first, last)]
        rows.append([(i, overlap / scale) for i, overlap in covered if overlap > 0])
    width = max(len(row) for row in rows)
    index = torch.tensor([[i for i, _ in row] + [row[-1][0]] * (width - len(row)) for row in rows])
    weight = torch.tensor(
        [[w for _, w in row] + [0.0] * (width - len(row)) for row in rows], dtype=torch.float64
    )
    return index, weight


# --- Noise ---


class GaussianNoise(Corruption):
    """x + N(0, sigma^2) per pixel."""

    name = "gaussian_noise"
    parameters = (0.04, 0.06, 0.08, 0.09, 0.10)

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        return {"noise": torch.randn(image.shape, generator=generator, dtype=torch.float64)}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        return images + draws["noise"] * self.parameters[severity - 1]


class ShotNoise(Corruption):
    """Photon counting: Poisson(x * rate) / rate per pixel (fewer photons, more noise)."""

    name = "shot_noise"
    parameters = (500, 250, 100, 75, 50)

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        rate = self.parameters[severity - 1]
        return {"counts": torch.poisson(image * rate, generator=generator)}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        return draws["counts"] / self.parameters[severity - 1]


class ImpulseNoise(Corruption):
    """Salt and pepper: a share of the pixel values set to 0 or 1, half each."""

    name = "impulse_noise"
    parameters = (0.01, 0.02, 0.03, 0.05, 0.07)

    def draw(self, image: Tensor, severity: int, generator: torch.Generator) -> dict[str, Tensor]:
        hit = torch.rand(image.shape, generator=generator, dtype=torch.float64)
        salt = torch.rand(image.shape, generator=generator, dtype=torch.float64)
        return {"hit": hit, "salt": salt}

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        impulse = (draws["salt"] < 0.5).to(images.dtype)
        return torch.where(draws["hit"] < self.parameters[severity - 1], impulse, images)


# --- Intensity and colour ---


class Contrast(Corruption):
    """Pixel values pulled towards each channel's mean: (x - mean) * factor + mean."""

    name = "contrast"
    parameters = (0.75, 0.5, 0.4, 0.3, 0.15)

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        means = images.mean(dim=(-2, -1), keepdim=True)
        return (images - means) * self.parameters[severity - 1] + means


class Brightness(Corruption):
    """The HSV value raised by a constant, hue and saturation kept (a gray pixel: x + c)."""

    name = "brightness"
    parameters = (0.05, 0.1, 0.15, 0.2, 0.3)

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        value = images.amax(dim=1, keepdim=True)
        raised = (value + self.parameters[severity - 1]).clamp(max=1.0)
        # With hue and saturation fixed, every channel is proportional to the value.
        scaled = images * (raised / value.clamp(min=1e-300))
        return torch.where(value > 0, scaled, raised.expand_as(images))


class Saturate(Corruption):
    """The HSV saturation scaled and shifted, hue and value kept: S' = clip(S * factor + shift).

    The five published (factor, shift) pairs are (0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1),
    (2.5, 0.2); in that order the change is not monotone (a 0.1x desaturation changes an image
    more than a 1.5x saturation), so severities 1-5 take them in the order of their mean change
    for uniformly spread saturation: 0.17, 0.30, 0.35, 0.37, 0.45. A gray pixel (S = 0) has hue 0
    (red), as skimage's rgb2hsv gives it, so a positive shift tints it red.
    """

    name = "saturate"
    parameters = ((1.5, 0.0), (2.0, 0.1), (0.3, 0.0), (2.5, 0.2), (0.1, 0.0))
    needs_colour = True

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        factor, shift = self.parameters[severity - 1]
        value = images.amax(dim=1, keepdim=True)
        lowest = images.amin(dim=1, keepdim=True)
        saturation = torch.where(value > 0, (value - lowest) / value.clamp(min=1e-300), 0.0)
        new = (saturation * factor + shift).clamp(0.0, 1.0)
        # For fixed hue and value, value - channel is proportional to the saturation.
        coloured = value - (value - images) * (new / saturation.clamp(min=1e-300))
        red = torch.cat([value, value * (1 - new), value * (1 - new)], dim=1)  # hue 0
        return torch.where(saturation > 0, coloured, red)


# --- Digital ---


class JpegCompression(Corruption):
    """Encoded and decoded as JPEG at a quality of 80 down to 40 (libjpeg, via torchvision)."""

    name = "jpeg_compression"
    parameters = (80, 65, 58, 50, 40)

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        import warnings

        from torchvision.io import decode_jpeg, encode_jpeg

        pixels = list(images.mul(255.0).round_().to(torch.uint8).cpu())
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its image codecs in favour of TorchCodec; they remain
            # libjpeg, as the published corruption (Pillow) used.
            warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
            encoded = encode_jpeg(pixels, quality=self.parameters[severity - 1])
            decoded = torch.stack(decode_jpeg(encoded))
        return decoded.to(images.device, torch.float64) / 255.0


class Pixelate(Corruption):
    """Down to int(side * fraction) pixels and back up, as published, but each pixel the
    area-weighted mean of the pixels it overlaps, both ways. The published code resizes with
    Pillow's BOX filter, which takes an input pixel whole or not at all by where its centre
    falls: at 32 -> 30 pixels it mostly copies pixels, so its mild severities change little and
    its effect jumps with the size, and on images under 32 pixels it aliases (an 8-pixel digit
    changed more at 6 pixels than at 5). Area weights grow smoothly with severity; on 32-pixel
    photo patches they change an image more than published at severity 1 (mean absolute change
    0.012 vs 0.004) and about as much at 5 (0.019 vs 0.021). An 8-pixel side has only 7, 7, 6,
    6 and 5 pixels to go down to: severities 1 and 2, and 3 and 4, are then the same.
    """

    name = "pixelate"
    parameters = (0.95, 0.9, 0.85, 0.75, 0.65)

    def apply(self, images: Tensor, severity: int, draws: dict[str, Tensor]) -> Tensor:
        fraction = self.parameters[severity - 1]
        for dim in (2, 3):
            size = images.shape[dim]
            small = max(1, int(size * fraction))
            images = taps_along(images, dim, *area_taps(size, small))
            images = taps_along(images, dim, *area_taps(small, size))
        return images

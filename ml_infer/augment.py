"""Test-time views of a batch: pure tensor ops on [B, C, H, W] images in [0, 1].

Every augmentation maps a whole batch to one or more views at once (never per sample) and
names each view it adds. `Views` puts the identity first and stacks the rest after it, giving
the [K, B, C, H, W] tensor the predictor runs. Brightness and contrast follow torchvision's
`adjust_brightness` / `adjust_contrast` formulas exactly, so they act before normalisation and
clamp to the valid pixel range.

Adding an augmentation: one class here (or anywhere importable) and one yaml file in
`conf/augmentation/` whose `_target_` names it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ml_infer.errors import UserError
from ml_infer.inputs import grayscale


class Augmentation:
    """Maps a batch [B, C, H, W] to `len(self.view_names)` views, stacked as [V, B, C, H, W]."""

    view_names: tuple[str, ...] = ()

    def __call__(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class _Geometric(Augmentation):
    """One view made by a dihedral symmetry of the pixel grid."""

    name = ""
    needs_square = False

    def __init__(self) -> None:
        self.view_names = (self.name,)

    def __call__(self, images: Tensor) -> Tensor:
        if self.needs_square and images.shape[-1] != images.shape[-2]:
            height, width = images.shape[-2:]
            raise UserError(
                f"augmentation {self.name!r} needs square images, got {height}x{width}; "
                "resize the data to a square size or drop it from tta.augmentations"
            )
        return self.apply(images).unsqueeze(0)

    def apply(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class Identity(_Geometric):
    name = "identity"

    def apply(self, images: Tensor) -> Tensor:
        return images


class HorizontalFlip(_Geometric):
    """Mirror left-right."""

    name = "horizontal_flip"

    def apply(self, images: Tensor) -> Tensor:
        return images.flip(-1)


class VerticalFlip(_Geometric):
    """Mirror top-bottom."""

    name = "vertical_flip"

    def apply(self, images: Tensor) -> Tensor:
        return images.flip(-2)


class Rotate90(_Geometric):
    """Rotate 90 degrees clockwise (torch.rot90 turns counter-clockwise for k > 0)."""

    name = "rotate_90"
    needs_square = True

    def apply(self, images: Tensor) -> Tensor:
        return images.rot90(-1, dims=(-2, -1))


class Rotate180(_Geometric):
    name = "rotate_180"

    def apply(self, images: Tensor) -> Tensor:
        return images.rot90(2, dims=(-2, -1))


class Rotate270(_Geometric):
    """Rotate 270 degrees clockwise, i.e. 90 degrees counter-clockwise."""

    name = "rotate_270"
    needs_square = True

    def apply(self, images: Tensor) -> Tensor:
        return images.rot90(1, dims=(-2, -1))


class Transpose(_Geometric):
    """Reflect across the main diagonal (top-left to bottom-right)."""

    name = "transpose"
    needs_square = True

    def apply(self, images: Tensor) -> Tensor:
        return images.transpose(-2, -1)


class Transverse(_Geometric):
    """Reflect across the anti-diagonal (top-right to bottom-left)."""

    name = "transverse"
    needs_square = True

    def apply(self, images: Tensor) -> Tensor:
        return images.rot90(2, dims=(-2, -1)).transpose(-2, -1)


class _Intensity(Augmentation):
    """One view per factor: a blend of the images with a per-image reference, clamped to [0, 1]."""

    name = ""

    def __init__(self, factors: Sequence[float] = (0.9, 1.1)) -> None:
        if len(factors) == 0 or any(not (f > 0) for f in factors):
            raise UserError(f"{self.name} factors must be positive numbers, got {list(factors)}")
        self.factors = tuple(float(f) for f in factors)
        self.view_names = tuple(f"{self.name}_{f:g}" for f in self.factors)

    def __call__(self, images: Tensor) -> Tensor:
        # torchvision's _blend, factor * images + (1 - factor) * reference, with the same scalars
        # and roundings, written view by view into one tensor: broadcasting a [V, 1, 1, 1, 1]
        # factor tensor over the batch measured 10-30x slower.
        views = images.new_empty((len(self.factors), *images.shape))
        reference = self.reference(images)
        for view, factor in zip(views, self.factors):
            torch.mul(images, factor, out=view)
            if reference is not None:
                view.add_(reference * (1.0 - factor))
        return views.clamp_(0.0, 1.0)

    def reference(self, images: Tensor) -> Tensor | None:
        """What each image is blended with, broadcastable to the images; None for zero."""
        raise NotImplementedError


class Brightness(_Intensity):
    """Scale pixel values by each factor (0.9 and 1.1 by default: +-10%)."""

    name = "brightness"

    def reference(self, images: Tensor) -> None:
        return None  # blending with black is scaling


class Contrast(_Intensity):
    """Move pixel values away from (factor > 1) or towards (< 1) each image's mean gray level."""

    name = "contrast"

    def reference(self, images: Tensor) -> Tensor:
        return grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)


class Views:
    """The identity view followed by every augmentation's views.

    >>> views = Views([HorizontalFlip(), Brightness()])
    >>> views.names
    ('identity', 'horizontal_flip', 'brightness_0.9', 'brightness_1.1')
    >>> views(torch.zeros(5, 3, 4, 4)).shape
    torch.Size([4, 5, 3, 4, 4])
    """

    def __init__(self, augmentations: Sequence[Augmentation]) -> None:
        self.augmentations = [Identity(), *augmentations]
        self.names = tuple(name for aug in self.augmentations for name in aug.view_names)
        duplicates = sorted({name for name in self.names if self.names.count(name) > 1})
        if duplicates:
            raise UserError(f"tta.augmentations repeats views {duplicates}; list each once")

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, images: Tensor) -> Tensor:
        if len(self.augmentations) == 1:
            return images.unsqueeze(0)
        return torch.cat([aug(images) for aug in self.augmentations], dim=0)

    def subset(self, names: Sequence[str]) -> ViewSubset:
        """Only the views `names` (in that order), made by the augmentations that make them."""
        return ViewSubset(self, names)


class ViewSubset(Views):
    """Some of a `Views`' views: what the prediction store still lacks.

    >>> subset = Views([HorizontalFlip(), Brightness()]).subset(["brightness_1.1", "identity"])
    >>> subset.names, subset(torch.zeros(5, 3, 4, 4)).shape
    (('brightness_1.1', 'identity'), torch.Size([2, 5, 3, 4, 4]))
    """

    def __init__(self, views: Views, names: Sequence[str]) -> None:
        unknown = sorted(set(names) - set(views.names))
        if unknown:
            raise UserError(f"views {unknown} are not among {list(views.names)}")
        self.augmentations = [
            aug for aug in views.augmentations if set(aug.view_names) & set(names)
        ]
        made = [name for aug in self.augmentations for name in aug.view_names]
        self.names = tuple(names)
        self._positions = torch.tensor([made.index(name) for name in names])
        self._all_made = len(made) == len(names) and list(made) == list(names)

    def __call__(self, images: Tensor) -> Tensor:
        views = torch.cat([aug(images) for aug in self.augmentations], dim=0)
        return views if self._all_made else views.index_select(0, self._positions)

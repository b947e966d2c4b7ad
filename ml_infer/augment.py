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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ml_infer.errors import UserError, one_of
from ml_infer.inputs import grayscale


class Augmentation:
    """Maps a batch [B, C, H, W] to `len(self.view_names)` views, stacked as [V, B, C, H, W].

    One that `needs_corners` is given the six crops of each photo instead ([B, 6, C, H, W],
    see ml_infer.photoviews), which the data set then reads."""

    view_names: tuple[str, ...] = ()
    needs_corners = False

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


COMPOSITIONS = ("sum", "product")


class Views:
    """The identity view followed by every augmentation's views (`compose="sum"`), or every
    combination of one view (or none) of each augmentation, in order (`"product"`: flips x
    scales gives 3 x 3 views, each named like "horizontal_flip+scale_0.9").

    >>> views = Views([HorizontalFlip(), Brightness()])
    >>> views.names
    ('identity', 'horizontal_flip', 'brightness_0.9', 'brightness_1.1')
    >>> views(torch.zeros(5, 3, 4, 4)).shape
    torch.Size([4, 5, 3, 4, 4])
    >>> Views([HorizontalFlip(), Brightness()], compose="product").names[:4]
    ('identity', 'brightness_0.9', 'brightness_1.1', 'horizontal_flip')
    """

    def __init__(self, augmentations: Sequence[Augmentation], compose: str = "sum") -> None:
        if compose not in COMPOSITIONS:
            raise one_of("tta.compose", compose, COMPOSITIONS)
        self.augmentations = [Identity(), *augmentations]
        self.compose = compose
        self.needs_corners = any(aug.needs_corners for aug in augmentations)
        if compose == "product" and any(aug.needs_corners for aug in augmentations[1:]):
            raise UserError("under tta.compose=product, a crop view must be the first augmentation")
        self.names = tuple(self._labels(lambda aug, name: name))
        duplicates = sorted({name for name in self.names if self.names.count(name) > 1})
        if duplicates:
            raise UserError(f"tta.augmentations repeats views {duplicates}; list each once")

    def view_ids(self) -> dict[str, str]:
        """Each view's name -> what makes it (augmentation classes and view names), for keys."""
        ids = self._labels(
            lambda aug, name: f"{type(aug).__module__}.{type(aug).__qualname__}:{name}"
        )
        return dict(zip(self.names, ids))

    def _labels(self, label: Callable[[Augmentation, str], str]) -> list[str]:
        identity, *others = self.augmentations
        if self.compose == "sum":
            return [label(aug, name) for aug in self.augmentations for name in aug.view_names]
        labels = [label(identity, "identity")]
        for aug in others:
            made = [label(aug, name) for name in aug.view_names]
            labels = [
                b if a == labels[0] and b is not None else a if b is None else f"{a}+{b}"
                for a in labels
                for b in (None, *made)
            ]
        return labels

    def __len__(self) -> int:
        return len(self.names)

    def __call__(self, images: Tensor) -> Tensor:
        """[B, C, H, W] images (or [B, 6, C, H, W] crops, the centre first) -> [V, B, C, H, W]."""
        centre = images[:, 0] if images.dim() == 5 else images
        if len(self.augmentations) == 1:
            return centre.unsqueeze(0)
        if self.compose == "sum":
            return torch.cat(
                [aug(images if aug.needs_corners else centre) for aug in self.augmentations]
            )
        views = centre.unsqueeze(0)
        for aug in self.augmentations[1:]:
            if aug.needs_corners:  # the first: views holds the identity alone
                views = torch.cat([views, aug(images)])
                continue
            made = aug(views.flatten(0, 1)).unflatten(1, views.shape[:2])  # [A, V, B, ...]
            views = torch.cat([views.unsqueeze(0), made]).transpose(0, 1).flatten(0, 1)
        return views

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
        self.parent, self.compose, self.needs_corners = views, views.compose, views.needs_corners
        self.augmentations = views.augmentations
        self.names = tuple(names)
        self._ids = {name: views.view_ids()[name] for name in names}
        if views.compose == "sum":  # only the augmentations that make the views asked for
            self.augmentations = [
                aug for aug in views.augmentations if set(aug.view_names) & set(names)
            ]
            made = [name for aug in self.augmentations for name in aug.view_names]
        else:
            made = list(views.names)
        self._positions = torch.tensor([made.index(name) for name in names])
        self._all_made = list(made) == list(names)

    def view_ids(self) -> dict[str, str]:
        return dict(self._ids)

    def __call__(self, images: Tensor) -> Tensor:
        if self.names == ("identity",):  # standard's timing passes: no other view is made
            return (images[:, 0] if images.dim() == 5 else images).unsqueeze(0)
        if self.compose == "product":
            views = self.parent(images)
        else:
            centre = images[:, 0] if images.dim() == 5 else images
            views = torch.cat(
                [aug(images if aug.needs_corners else centre) for aug in self.augmentations]
            )
        return views if self._all_made else views.index_select(0, self._positions)

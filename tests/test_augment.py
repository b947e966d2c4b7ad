"""View transforms: directions checked on a labelled asymmetric image, intensity views against
torchvision's per-image functions, view counts of every preset."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.functional as TF

from ml_infer.augment import (
    Brightness,
    Contrast,
    HorizontalFlip,
    Rotate90,
    Rotate180,
    Rotate270,
    Transpose,
    Transverse,
    VerticalFlip,
    Views,
)
from ml_infer.config import instantiate_named, options
from ml_infer.errors import UserError
from ml_infer.evaluate import build_views

from .conftest import compose_config

# A 2x3 image would not rotate into the batch; use 3x3 with distinct values:
#   1 2 3
#   4 5 6
#   7 8 9
GRID = torch.arange(1.0, 10.0).view(1, 1, 3, 3)


def single_view(augmentation, images=GRID):
    views = augmentation(images)
    assert views.shape == (1, *images.shape)
    return views[0, 0, 0].tolist()


def test_horizontal_flip_mirrors_left_right():
    assert single_view(HorizontalFlip()) == [[3, 2, 1], [6, 5, 4], [9, 8, 7]]


def test_vertical_flip_mirrors_top_bottom():
    assert single_view(VerticalFlip()) == [[7, 8, 9], [4, 5, 6], [1, 2, 3]]


def test_rotate_90_is_clockwise():
    # Clockwise: the left column (1, 4, 7) read bottom-up becomes the top row.
    assert single_view(Rotate90()) == [[7, 4, 1], [8, 5, 2], [9, 6, 3]]


def test_rotate_180():
    assert single_view(Rotate180()) == [[9, 8, 7], [6, 5, 4], [3, 2, 1]]


def test_rotate_270_is_counter_clockwise_90():
    assert single_view(Rotate270()) == [[3, 6, 9], [2, 5, 8], [1, 4, 7]]


def test_transpose_and_transverse_reflect_across_diagonals():
    assert single_view(Transpose()) == [[1, 4, 7], [2, 5, 8], [3, 6, 9]]
    assert single_view(Transverse()) == [[9, 6, 3], [8, 5, 2], [7, 4, 1]]


@pytest.mark.parametrize(
    ("augmentation", "reference"),
    [
        (HorizontalFlip(), TF.hflip),
        (VerticalFlip(), TF.vflip),
        (Rotate90(), lambda x: TF.rotate(x, -90)),
        (Rotate180(), lambda x: TF.rotate(x, 180)),
        (Rotate270(), lambda x: TF.rotate(x, 90)),
    ],
)
def test_geometric_views_equal_torchvision(augmentation, reference):
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augmentation(images)[0], reference(images))


def test_d4_views_are_the_eight_distinct_symmetries():
    views = build_views(compose_config(["tta=d4"]).tta.augmentations)(GRID)
    distinct = {tuple(v.flatten().tolist()) for v in views}
    assert len(views) == 8 and len(distinct) == 8


def batch_of_images(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(6, 3, 8, 8, generator=generator)
    images[0] = 1.0  # saturated image: brightness 1.1 must clamp
    images[1] = 0.0
    return images


@pytest.mark.parametrize("factor_index", [0, 1])
def test_brightness_equals_torchvision_per_image(factor_index):
    images = batch_of_images()
    views = Brightness(factors=(0.9, 1.1))(images)
    factor = (0.9, 1.1)[factor_index]
    expected = torch.stack([TF.adjust_brightness(image, factor) for image in images])
    assert torch.allclose(views[factor_index], expected, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("factor_index", [0, 1])
def test_contrast_equals_torchvision_per_image(factor_index, channels):
    images = batch_of_images()[:, :channels]
    views = Contrast(factors=(0.9, 1.1))(images)
    factor = (0.9, 1.1)[factor_index]
    expected = torch.stack([TF.adjust_contrast(image, factor) for image in images])
    assert torch.allclose(views[factor_index], expected, atol=1e-6)


@pytest.mark.parametrize("augmentation", [Brightness(), Contrast()])
def test_intensity_views_stay_in_pixel_range_and_change_pixels(augmentation):
    images = batch_of_images()
    views = augmentation(images)
    assert views.shape == (2, *images.shape)
    assert views.min() >= 0.0 and views.max() <= 1.0
    assert not torch.equal(views[0], images) and not torch.equal(views[1], images)


def test_views_of_a_batch_equal_views_built_image_by_image():
    images = batch_of_images()
    views = Views([HorizontalFlip(), Rotate90(), Brightness(), Contrast()])
    batched = views(images)
    one_by_one = torch.stack([views(image[None])[:, 0] for image in images], dim=1)
    assert torch.equal(batched, one_by_one)


def test_identity_is_always_the_first_view():
    images = batch_of_images()
    views = Views([VerticalFlip(), Brightness()])
    assert views.names[0] == "identity"
    assert torch.equal(views(images)[0], images)


@pytest.mark.parametrize(
    ("preset", "expected_views"),
    [
        ("none", 1),
        ("flips", 3),
        ("seed_all", 10),
        ("d4", 8),
        ("intensity", 5),
        ("rotations", 4),
        ("five_crop", 5),
        ("ten_crop", 10),
        ("flips_scales", 6),
    ],
)
def test_view_count_of_each_tta_preset(preset, expected_views):
    from ml_infer.config import options

    assert preset in options("tta")
    cfg = compose_config([f"tta={preset}"])
    views = build_views(cfg.tta.augmentations, cfg.tta.compose)
    assert len(views) == expected_views
    crops = torch.rand(2, 6, 1, 8, 8)  # photos read as their crops, for crop views
    assert views(crops if views.needs_corners else crops[:, 0]).shape[0] == expected_views


def test_every_tta_preset_is_listed_above():
    from ml_infer.config import options

    listed = {"none", "flips", "seed_all", "d4", "intensity", "rotations"}
    assert set(options("tta")) == listed | {"five_crop", "ten_crop", "flips_scales"}


def test_every_augmentation_yaml_builds():
    for name in options("augmentation"):
        augmentation = instantiate_named("augmentation", name, "augmentation")
        images = torch.rand(2, 6, 3, 4, 4) if augmentation.needs_corners else torch.rand(2, 3, 4, 4)
        assert augmentation(images).shape[0] == len(augmentation.view_names)


def test_unknown_augmentation_lists_valid_names():
    with pytest.raises(
        UserError, match=r"unknown augmentation 'mirror'; valid: brightness, contrast"
    ):
        build_views(["horizontal_flip", "mirror"])


def test_rotation_of_non_square_images_is_a_clear_error():
    with pytest.raises(UserError, match="needs square images, got 4x6"):
        Rotate90()(torch.rand(1, 1, 4, 6))


def test_repeated_augmentation_is_rejected():
    with pytest.raises(UserError, match="repeats views"):
        build_views(["horizontal_flip", "horizontal_flip"])

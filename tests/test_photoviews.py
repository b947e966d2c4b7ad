"""TTA views for photos: five_crop / ten_crop equal to torchvision's FiveCrop / TenCrop on the
same files, scale views, product composition, and the inputs they refuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml_infer.augment import HorizontalFlip, Views
from ml_infer.data import DigitsDataset, ImageFolderDataset
from ml_infer.errors import UserError
from ml_infer.photoviews import FiveCrop, Scale, TenCrop

from .conftest import scored_resnet18

TORCHVISION_ORDER = (
    "top_left",
    "top_right",
    "bottom_left",
    "bottom_right",
    "identity",
    # TenCrop crops the mirrored photo: its top-left crop is the top-right crop mirrored
    "top_right+horizontal_flip",
    "top_left+horizontal_flip",
    "bottom_right+horizontal_flip",
    "bottom_left+horizontal_flip",
    "mirrored_centre",
)


def torchvision_ten_crops(path: Path) -> dict[str, torch.Tensor]:
    from PIL import Image
    from torchvision import transforms

    with Image.open(path) as photo:
        resized = transforms.Resize(256, antialias=True)(photo.convert("RGB"))
        crops = transforms.TenCrop(224)(resized)
    return {
        name: transforms.functional.pil_to_tensor(crop)
        for name, crop in zip(TORCHVISION_ORDER, crops)
    }


def as_bytes(images: torch.Tensor) -> torch.Tensor:
    return images.mul(255).round().to(torch.uint8)


@pytest.mark.parametrize("stream", [False, True])
def test_ten_crop_equals_torchvisions_ten_crop_per_image(photo_folder, stream):
    data = ImageFolderDataset(
        photo_folder, image_size=(224, 224), resize=256, corners=True, stream=stream
    )
    crops = data.pixels()
    assert crops.shape == (12, 6, 3, 224, 224)
    views = Views([TenCrop()])
    made = dict(zip(views.names, as_bytes(views(crops))))
    assert set(made) == set(TORCHVISION_ORDER)
    for position, path in enumerate(data.sample_ids):
        expected = torchvision_ten_crops(photo_folder / path)
        for name, image in expected.items():
            assert torch.equal(made[name][position], image), (path, name)
    five = Views([FiveCrop()])
    assert five.names == ("identity", "top_left", "top_right", "bottom_left", "bottom_right")
    assert torch.equal(five(crops), views(crops)[:5])


def test_five_crop_times_a_flip_is_ten_crop_where_the_margins_are_even():
    crops = torch.rand(3, 6, 3, 16, 16)
    crops[:, 5] = crops[:, 0]  # an even margin: TenCrop's mirrored centre is the centre mirrored
    product = Views([FiveCrop(), HorizontalFlip()], compose="product")
    ten = Views([TenCrop()])
    same = {"horizontal_flip": "mirrored_centre"}  # TenCrop's name for its mirrored centre
    assert sorted(same.get(n, n) for n in product.names) == sorted(ten.names)
    by_name = dict(zip(ten.names, ten(crops)))
    for name, view in zip(product.names, product(crops)):
        assert torch.equal(view, by_name[same.get(name, name)]), name


def test_a_product_names_each_combination_and_applies_them_in_order():
    images = torch.rand(4, 3, 20, 30)
    views = Views([HorizontalFlip(), Scale([0.9, 1.1])], compose="product")
    assert views.names == (
        "identity",
        "scale_0.9",
        "scale_1.1",
        "horizontal_flip",
        "horizontal_flip+scale_0.9",
        "horizontal_flip+scale_1.1",
    )
    made = dict(zip(views.names, views(images)))
    assert torch.equal(made["identity"], images)
    assert torch.equal(made["horizontal_flip+scale_1.1"], Scale([1.1])(images.flip(-1))[0])
    ids = views.view_ids()
    assert ids["horizontal_flip+scale_0.9"].endswith(
        ":horizontal_flip+ml_infer.photoviews.Scale:scale_0.9"
    )
    subset = views.subset(["horizontal_flip+scale_0.9", "identity"])
    assert torch.equal(subset(images), torch.stack([made["horizontal_flip+scale_0.9"], images]))
    assert subset.view_ids() == {name: ids[name] for name in subset.names}


def test_scale_views_equal_torchvisions_resize_then_centre_crop_or_pad():
    from torchvision.transforms.v2 import functional as F

    images = torch.rand(2, 3, 40, 30)
    zoom_out, zoom_in = Scale([0.9, 1.1])(images)
    for view, size in ((zoom_out, [36, 27]), (zoom_in, [44, 33])):
        resized = F.resize(images, size, antialias=True).clamp(0, 1)
        assert torch.allclose(view, F.center_crop(resized, [40, 30]), atol=1e-6)
    assert (zoom_out[..., :2, :] == 0).all() and (zoom_in != 0).any()  # black border, zoomed


def test_crop_views_and_compositions_say_what_is_wrong(photo_folder):
    with pytest.raises(UserError, match="crop views .* need photos read with a resize"):
        DigitsDataset(split="test", corners=True)
    with pytest.raises(UserError, match="crop views .* need photos read with a resize"):
        ImageFolderDataset(photo_folder, image_size=(64, 64), corners=True)
    with pytest.raises(UserError, match="a crop view must be the first augmentation"):
        Views([HorizontalFlip(), FiveCrop()], compose="product")
    with pytest.raises(UserError, match="unknown tta.compose 'cartesian'; valid: sum, product"):
        Views([HorizontalFlip()], compose="cartesian")
    with pytest.raises(UserError, match="scale factors must lie in"):
        Scale([1.0])
    with pytest.raises(UserError, match="resize 200 is smaller than the 224x224 input"):
        ImageFolderDataset(photo_folder, image_size=(224, 224), resize=200, corners=True)
    assert Views([TenCrop(), HorizontalFlip()]).names[-1] == "horizontal_flip"  # no clash


@pytest.mark.slow
def test_a_ten_crop_run_gives_torchvisions_ten_crop_probabilities(photo_folder, tmp_path):
    """resnet18 (random weights, saved as torchvision saves them), tta=ten_crop on the photo
    folder: the mean of the softmax over torchvision's TenCrop of each photo, within 1e-5."""
    from torchvision import transforms

    model, metrics, rows = scored_resnet18(
        photo_folder, tmp_path, "data.dataset.stream=true", "strategy=tta", "tta=ten_crop"
    )
    assert metrics["forward_passes_per_image"] == 10
    normalise = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    for row in rows:
        crops = torch.stack(list(torchvision_ten_crops(photo_folder / row["path"]).values()))
        with torch.inference_mode():
            expected = model(normalise(crops.float() / 255)).softmax(dim=1).mean(dim=0).numpy()
        ours = np.array([float(row["prob_cat"]), float(row["prob_coffee"])])
        assert np.abs(ours - expected).max() < 1e-5, row["path"]

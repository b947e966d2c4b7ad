"""The photo pipeline: resize the shorter side, crop the centre, at the interpolation asked for,
equal to torchvision's transforms on the same files; a torchvision weights entry's evaluation
transform without downloading its weights."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ml_infer.data import ImageFolderDataset
from ml_infer.errors import UserError
from ml_infer.inputs import InputSpec, torchvision_weights_input

from .conftest import scored_resnet18


def torchvision_pixels(path: Path, resize: int, crop: int, interpolation: str) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    mode = transforms.InterpolationMode(interpolation)
    pipeline = transforms.Compose(
        [transforms.Resize(resize, mode, antialias=True), transforms.CenterCrop(crop)]
    )
    with Image.open(path) as image:
        return transforms.functional.pil_to_tensor(pipeline(image.convert("RGB")))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_resize_and_centre_crop_equal_torchvisions(photo_folder, interpolation, stream):
    """Equal to torchvision's PIL pipeline: JPEGs decode to the same pixels (libjpeg-turbo both
    ways, through torchvision.io here) and are resized by PIL, held or streamed."""
    data = ImageFolderDataset(
        photo_folder, image_size=(224, 224), resize=256, interpolation=interpolation, stream=stream
    )
    images = data.pixels().mul(255).round().to(torch.uint8)
    assert images.shape == (12, 3, 224, 224)
    for image, path in zip(images, data.sample_ids):
        expected = torchvision_pixels(photo_folder / path, 256, 224, interpolation)
        assert torch.equal(image, expected), path


def test_without_torchvisions_decoder_pil_decodes_the_same_pixels(photo_folder, monkeypatch):
    from ml_infer import decode

    assert decode._torchvision_jpeg_decoder() is not None  # torchvision 0.29 still has one
    fast = ImageFolderDataset(photo_folder, image_size=(224, 224), resize=256, stream=True)
    monkeypatch.setattr(decode, "_torchvision_jpeg_decoder", lambda: None)
    slow = ImageFolderDataset(photo_folder, image_size=(224, 224), resize=256, stream=True)
    assert torch.equal(fast.pixels(), slow.pixels())
    for image, path in zip(slow.pixels(), slow.sample_ids):
        expected = torchvision_pixels(photo_folder / path, 256, 224, "bilinear")
        assert torch.equal(image.mul(255).round().to(torch.uint8), expected), path


def test_a_cmyk_jpeg_is_read_as_pil_reads_it(tmp_path):
    from PIL import Image

    from ml_infer.decode import read_image

    path = tmp_path / "cmyk.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)).convert(
        "CMYK"
    ).save(path, quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
        expected = np.asarray(image.convert("RGB").resize((30, 20), Image.Resampling.BILINEAR))
    ours = read_image(path, size=(20, 30), channels=3)
    assert np.array_equal(ours, expected.transpose(2, 0, 1))


def test_a_crop_larger_than_the_resized_photo_is_padded_as_torchvision_pads(photo_folder):
    data = ImageFolderDataset(photo_folder, image_size=(300, 300), resize=256)
    for image, path in zip(data.images, data.sample_ids):
        assert torch.equal(image, torchvision_pixels(photo_folder / path, 256, 300, "bilinear"))


def test_timms_crop_pct_gives_the_resize():
    spec = InputSpec.from_dict(
        {"size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875}
    )
    assert spec.resize == math.floor(224 / 0.875) == 256 and spec.interpolation == "bilinear"
    assert InputSpec.from_dict(spec.to_dict()) == spec  # written into checkpoints and read back


def test_a_torchvision_weights_entry_gives_its_transform_without_downloading(
    photo_folder, monkeypatch
):
    import torchvision

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    spec = torchvision_weights_input("ResNet18_Weights.IMAGENET1K_V1")
    assert (spec.size, spec.resize, spec.interpolation) == ((224, 224), 256, "bilinear")
    data = ImageFolderDataset(photo_folder, **spec.fit())
    reference = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    from PIL import Image

    for image, path in zip(data.pixels(), data.sample_ids):
        with Image.open(photo_folder / path) as photo:
            expected = reference(photo.convert("RGB"))
        assert torch.allclose(spec.normalise(image), expected, atol=1e-6), path


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"interpolation": "nearest"}, "input interpolation 'nearest' is not one of"),
        ({"resize": 100}, "input resize 100 must be at least the crop size"),
        ({"crop_pct": 1.5}, "crop_pct must be in"),
    ],
)
def test_a_bad_photo_transform_says_what_is_wrong(spec, message):
    base = {"size": 224, "channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(UserError, match=message):
        InputSpec.from_dict(base | spec)
    with pytest.raises(UserError, match="is not a torchvision weights entry"):
        torchvision_weights_input("ResNet18_Weights.NOPE")


@pytest.mark.slow
def test_a_torchvision_model_with_its_weights_transform_scores_a_photo_folder(
    photo_folder, tmp_path
):
    """A plain resnet18 state dict (random weights, saved as torchvision saves them) scored on
    the photo folder gives the probabilities torchvision's model and transform give."""
    import torchvision
    from PIL import Image

    model, _, rows = scored_resnet18(photo_folder, tmp_path, "engine.fold_batch_norm=false")
    transform = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    for row in rows:
        with Image.open(photo_folder / row["path"]) as photo:
            batch = transform(photo.convert("RGB"))[None]
        with torch.inference_mode():
            expected = model(batch).softmax(dim=1)[0].numpy()
        ours = np.array([float(row["prob_cat"]), float(row["prob_coffee"])])
        assert np.abs(ours - expected).max() < 1e-4, row["path"]

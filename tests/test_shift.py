"""The corruptions of `shift=`: published parameters, valid pixels, more change with severity,
the same pixels whatever the batch or process, and hand-computed values."""

from __future__ import annotations

import functools
import hashlib
import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ml_infer.config import group_file
from ml_infer.corruptions import Brightness, Contrast, JpegCompression, Pixelate, Saturate
from ml_infer.data import DigitsDataset
from ml_infer.errors import UserError
from ml_infer.shift import Shift, corrupt, image_seed, shift_of, shifted

from .conftest import REPO, compose_config

NAMES = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "gaussian_blur",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "contrast",
    "brightness",
    "saturate",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
)


@functools.cache
def shift(name: str, severity: int, seed: int = 0) -> Shift:
    """What `shift=<name> shift.severity=<severity> shift.seed=<seed>` composes to (the group's
    yaml file read directly: composing the whole config for each would take seconds)."""
    block = OmegaConf.load(group_file("shift", name))
    block.severity, block.seed = severity, seed
    return shift_of(OmegaConf.create({"shift": block}))


@pytest.fixture(scope="module")
def digits() -> DigitsDataset:
    return DigitsDataset("test", image_size=(8, 8), channels=1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """48 colour patches of 32 x 32 pixels from scikit-image's bundled photographs."""
    import skimage.data

    patches = []
    for name in ("astronaut", "coffee", "chelsea"):
        photo = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        photo = torch.nn.functional.interpolate(
            photo[None], size=(128, 128), mode="bilinear", antialias=True
        )[0].clamp(0, 1)
        patches += [
            photo[:, i : i + 32, j : j + 32] for i in range(0, 128, 32) for j in range(0, 128, 32)
        ]
    return torch.stack(patches)


def test_every_corruption_has_a_config_file():
    from ml_infer.config import options

    assert set(options("shift")) == {"none", *NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_severity_zero_is_the_clean_data_set_itself(name, digits):
    data, report = shifted(digits, shift(name, 0), "digits")
    assert data is digits
    assert report["shift_applied"] is False and report["shift_mean_abs_change"] == 0.0
    images = digits.pixels()
    assert corrupt(images, digits.sample_ids, "digits", shift(name, 0)) is images


@pytest.mark.parametrize("name", NAMES)
def test_pixels_stay_valid_and_depend_only_on_the_image(name, photos):
    """In [0, 1], float32, and image k's pixels are the same in a batch of one and of 256."""
    images = photos[:, :, 8:24, 8:24].repeat(6, 1, 1, 1)[:256]  # 16 x 16: the same code paths
    ids = list(range(256))
    for severity in (1, 5):
        batch = corrupt(images, ids, "photos", shift(name, severity))
        assert batch.dtype == torch.float32 and batch.shape == images.shape
        assert float(batch.min()) >= 0.0 and float(batch.max()) <= 1.0
        for k in (0, 77, 255):
            alone = corrupt(images[k : k + 1], ids[k : k + 1], "photos", shift(name, severity))
            assert torch.equal(alone[0], batch[k]), (name, severity, k)


def _digest_of_every_corruption(images: torch.Tensor, ids: list) -> str:
    digest = hashlib.sha256()
    for name in NAMES:
        digest.update(corrupt(images, ids, "digits", shift(name, 4)).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.slow
def test_another_process_makes_the_same_pixels(digits):
    here = _digest_of_every_corruption(digits.pixels(), digits.sample_ids)
    script = (
        "from ml_infer.data import DigitsDataset\n"
        "from tests.test_shift import _digest_of_every_corruption\n"
        "d = DigitsDataset('test', image_size=(8, 8), channels=1)\n"
        "print(_digest_of_every_corruption(d.pixels(), d.sample_ids))\n"
    )
    there = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert there.stdout.strip() == here


def test_the_noise_of_an_image_follows_its_id_and_seed_not_its_position(digits):
    images = digits.pixels()[:4]
    ids = digits.sample_ids[:4]
    noisy = corrupt(images, ids, "digits", shift("gaussian_noise", 3))
    swapped = corrupt(images.flip(0), ids[::-1], "digits", shift("gaussian_noise", 3))
    assert torch.equal(noisy, swapped.flip(0))
    reseeded = corrupt(images, ids, "digits", shift("gaussian_noise", 3, seed=1))
    assert not torch.equal(noisy, reseeded)
    assert image_seed("digits", 1, "gaussian_noise", 0) != image_seed(
        "textures", 1, "gaussian_noise", 0
    )


def _changes(images: torch.Tensor, ids: list, name: str, data: str) -> list[float]:
    return [
        float((corrupt(images, ids, data, shift(name, s)) - images).abs().double().mean())
        for s in range(1, 6)
    ]


# As published, motion blur's severities 3 and 4 differ only in taps that weigh under 1e-7;
# an 8-pixel side pixelates to 7, 7, 6, 6 and 5 pixels (see the classes' docstrings).
TIES = {"motion_blur": {(3, 4)}}
GRAY_TIES = {"motion_blur": {(3, 4)}, "pixelate": {(1, 2), (3, 4)}}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_higher_severity_changes_colour_photos_more(name, photos):
    changes = _changes(photos, list(range(len(photos))), name, "photos")
    for severity, (lower, higher) in enumerate(itertools.pairwise(changes), start=1):
        if (severity, severity + 1) in TIES.get(name, set()):
            assert higher == pytest.approx(lower, abs=1e-6), changes
        else:
            assert higher > lower, (severity, changes)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n != "saturate"])
def test_a_higher_severity_changes_gray_digits_more(name, digits):
    changes = _changes(digits.pixels(), digits.sample_ids, name, "digits")
    for severity, (lower, higher) in enumerate(itertools.pairwise(changes), start=1):
        if (severity, severity + 1) in GRAY_TIES.get(name, set()):
            assert higher == pytest.approx(lower, abs=1e-6), changes
        else:
            assert higher > lower, (severity, changes)


def test_saturation_leaves_gray_images_as_they_are(digits):
    data, report = shifted(digits, shift("saturate", 5), "digits")
    assert data is digits and report["shift_applied"] is False


# --- The published parameters, checked against the libraries the published code used. ---


def test_noise_has_the_published_strength():
    flat = torch.full((1, 3, 96, 96), 0.5)
    for severity, sigma in enumerate((0.04, 0.06, 0.08, 0.09, 0.10), start=1):
        noise = corrupt(flat, [0], "flat", shift("gaussian_noise", severity)) - flat
        assert float(noise.std()) == pytest.approx(sigma, rel=0.03)
        assert abs(float(noise.mean())) < 0.003
    for severity, share in enumerate((0.01, 0.02, 0.03, 0.05, 0.07), start=1):
        hit = corrupt(flat, [0], "flat", shift("impulse_noise", severity)) != flat
        assert float(hit.double().mean()) == pytest.approx(share, rel=0.1)
    for severity, rate in enumerate((500, 250, 100, 75, 50), start=1):
        counts = corrupt(flat, [0], "flat", shift("shot_noise", severity)) * rate
        assert float(counts.mean()) == pytest.approx(0.5 * rate, rel=0.02)
        assert float(counts.var()) == pytest.approx(0.5 * rate, rel=0.1)  # Poisson: var = mean


def test_gaussian_blur_is_scikit_images(photos):
    from skimage.filters import gaussian

    for severity, sigma in ((1, 0.4), (5, 1.0)):
        ours = corrupt(photos[:4], list(range(4)), "photos", shift("gaussian_blur", severity))
        for k in range(4):
            theirs = gaussian(photos[k].double().numpy(), sigma=sigma, channel_axis=0)
            assert np.abs(ours[k].double().numpy() - theirs).max() < 1e-6


def test_brightness_and_saturation_are_hsv_as_scikit_image_does_it(photos):
    from skimage.color import hsv2rgb, rgb2hsv

    images = photos.double()
    hsv = rgb2hsv(images.permute(0, 2, 3, 1).numpy())
    for severity in (1, 5):
        lifted = hsv.copy()
        lifted[..., 2] = np.clip(lifted[..., 2] + Brightness.parameters[severity - 1], 0, 1)
        expected = torch.from_numpy(hsv2rgb(lifted)).permute(0, 3, 1, 2)
        ours = Brightness().apply(images, severity, {}).clamp(0, 1)
        assert float((ours - expected).abs().max()) < 1e-9
        factor, offset = Saturate.parameters[severity - 1]
        saturated = hsv.copy()
        saturated[..., 1] = np.clip(saturated[..., 1] * factor + offset, 0, 1)
        expected = torch.from_numpy(hsv2rgb(saturated)).permute(0, 3, 1, 2)
        ours = Saturate().apply(images, severity, {}).clamp(0, 1)
        assert float((ours - expected).abs().max()) < 1e-9


def test_jpeg_is_pillows_encoder_at_the_same_quality():
    from io import BytesIO

    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 1, 16, 16), generator=generator, dtype=torch.uint8)
    smooth = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1).round() / 255
    for severity, quality in ((1, 80), (5, 40)):
        ours = corrupt(smooth, list(range(6)), "x", shift("jpeg_compression", severity))
        for k in range(6):
            buffer = BytesIO()
            Image.fromarray((smooth[k, 0] * 255).round().byte().numpy()).save(
                buffer, "JPEG", quality=quality
            )
            theirs = np.asarray(Image.open(buffer), dtype=np.float64) / 255
            assert np.abs(ours[k, 0].double().numpy() - theirs).max() <= 1 / 255 + 1e-9


# --- Hand-computed values (contrast, brightness, pixelate, JPEG at two severities). ---


def test_contrast_by_hand():
    image = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]])  # mean 0.5
    expected = {1: [0.125, 0.875], 5: [0.425, 0.575]}  # 0.5 -+ 0.5 * 0.75, 0.5 -+ 0.5 * 0.15
    for severity, (low, high) in expected.items():
        out = Contrast()(image, severity, [torch.Generator()])
        assert out.flatten().tolist() == pytest.approx([low, high, low, high])


def test_brightness_by_hand():
    gray = torch.tensor([[[[0.5, 0.9]]]])
    assert Brightness()(gray, 1, [torch.Generator()])[0, 0, 0].tolist() == pytest.approx(
        [0.55, 0.95]
    )
    assert Brightness()(gray, 5, [torch.Generator()])[0, 0, 0].tolist() == pytest.approx([0.8, 1.0])
    # RGB (0.5, 0.25, 0): value 0.5 -> 0.6 at +0.1, hue and saturation kept: every channel x 1.2.
    rgb = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)
    assert Brightness()(rgb, 2, [torch.Generator()]).flatten().tolist() == pytest.approx(
        [0.6, 0.3, 0.0]
    )
    black = torch.zeros(1, 3, 1, 1)  # no hue: black becomes the gray of the new value
    assert Brightness()(black, 5, [torch.Generator()]).flatten().tolist() == pytest.approx(
        [0.3] * 3
    )


def test_pixelate_by_hand():
    ramp = torch.tensor([0.0, 1.0, 2.0, 3.0]).div(3).expand(1, 1, 4, 4).contiguous()
    # Severity 5: 4 -> int(2.6) = 2 pixels: pairs averaged, each copied back.
    out = Pixelate()(ramp, 5, [torch.Generator()])
    assert out[0, 0, 0].tolist() == pytest.approx([v / 3 for v in (0.5, 0.5, 2.5, 2.5)])
    # Severity 1: 4 -> int(3.8) = 3 cells of 4/3 pixels: (0 + 1/3) * 3/4, (1 + 2) / 2,
    # (2/3 + 3) * 3/4 = 0.25, 1.5, 2.75; back to 4 pixels of 3/4 cell each: 0.25,
    # (0.25 * 0.25 + 0.5 * 1.5) / 0.75 = 13/12, (0.5 * 1.5 + 0.25 * 2.75) / 0.75 = 23/12, 2.75.
    out = Pixelate()(ramp, 1, [torch.Generator()])
    assert out[0, 0, 1].tolist() == pytest.approx([v / 3 for v in (0.25, 13 / 12, 23 / 12, 2.75)])


def test_jpeg_by_hand():
    """A flat 8 x 8 gray block keeps only its DC coefficient, 8 * (v - 128), quantised by the
    luminance table's 16 scaled to the quality: 6 at quality 80, 20 at 40. Values whose DC is a
    multiple of the step come back exactly; 128 always does."""
    for severity, value in ((1, 200), (5, 208), (1, 128), (5, 128)):  # 576 = 96 x 6, 640 = 32 x 20
        flat = torch.full((1, 1, 8, 8), value / 255)
        out = JpegCompression()(flat, severity, [torch.Generator()])
        assert (out * 255).round().unique().tolist() == [value]
    # 194: DC 8 * 66 = 528 = 88 x 6 comes back at quality 80; at 40, 528 / 20 = 26.4 rounds to
    # 26, and 26 x 20 / 8 + 128 = 193.
    flat = torch.full((1, 1, 8, 8), 194 / 255)
    assert (JpegCompression()(flat, 1, [torch.Generator()]) * 255).round().unique().tolist() == [
        194
    ]
    assert (JpegCompression()(flat, 5, [torch.Generator()]) * 255).round().unique().tolist() == [
        193
    ]


# --- The shift block of the config. ---


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["shift=gaussian_noise", "shift.severity=7"], "shift.severity must be an integer from 0"),
        (["shift=gaussian_noise", "shift.severity=2.5"], "shift.severity must be an integer"),
        (["shift.severity=3"], "shift.severity=3 needs a corruption: add shift=NAME"),
        (["shift=pixelate", "shift.seed=abc"], "shift.seed must be an integer"),
    ],
)
def test_a_bad_shift_setting_says_what_is_wrong(overrides, message):
    with pytest.raises(UserError, match=message):
        shift_of(compose_config(overrides))

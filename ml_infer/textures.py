"""The second bundled data set: small texture patches cut from scikit-image's bundled photographs.

Here flips and rotations preserve the label (gravel turned upside down is still gravel), unlike
digits. Classes come from different source images; each source image is cut into vertical
bands, and train, val and test patches come from disjoint bands, so a test patch never shares
pixels with a training patch. Patches are small, grayscale, and jittered in brightness and
contrast so that the classes must be told apart by texture, not by mean intensity: a small
CNN scores in the 80-90% range rather than near 100%, which leaves TTA and ensembles something
to fix. The result is written in ImageFolder form: `<out>/<split>/<class>/<n>.png`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# class name -> scikit-image data functions whose images make up that class
SOURCES: dict[str, tuple[str, ...]] = {
    "brick": ("brick",),
    "grass": ("grass",),
    "gravel": ("gravel",),
    "moon": ("moon",),
    "microscopy": ("cell", "immunohistochemistry"),
    "retina": ("retina",),
}
# Share of each source image's width (left to right) that each split draws its patches from.
SPLIT_BANDS = {"train": (0.0, 0.7), "val": (0.7, 0.8), "test": (0.8, 1.0)}
PATCHES_PER_CLASS = {"train": 420, "val": 60, "test": 120}


def source_image(name: str) -> np.ndarray:
    """A bundled scikit-image picture as float grayscale [H, W] in [0, 1], borders trimmed."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float

    image = img_as_float(getattr(skimage.data, name)())
    if image.ndim == 3:
        image = rgb2gray(image[..., :3])
    if name == "retina":  # keep the inside of the fundus disc, not the black surround
        side = image.shape[0]
        image = image[int(0.25 * side) : int(0.75 * side), int(0.25 * side) : int(0.75 * side)]
    return image


def cut_patches(
    image: np.ndarray, band: tuple[float, float], count: int, size: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` random size x size patches whose pixels all lie in the vertical band of `image`."""
    height, width = image.shape
    left, right = int(band[0] * width), int(band[1] * width) - size
    if right <= left:
        raise ValueError(f"a band of {band} of a {width}-pixel-wide image is narrower than {size}")
    rows = rng.integers(0, height - size + 1, count)
    cols = rng.integers(left, right + 1, count)
    return np.stack([image[r : r + size, c : c + size] for r, c in zip(rows, cols)])


def jitter(patches: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random per-patch contrast and brightness, so mean intensity does not give the class away."""
    n = len(patches)
    gain = rng.uniform(1 - strength, 1 + strength, (n, 1, 1))
    offset = rng.uniform(-strength / 2, strength / 2, (n, 1, 1))
    means = patches.mean(axis=(1, 2), keepdims=True)
    target_means = rng.uniform(0.3, 0.7, (n, 1, 1))
    return np.clip((patches - means) * gain + target_means + offset, 0.0, 1.0)


def build_textures(
    out_dir: str | Path,
    *,
    patch_size: int = 16,
    seed: int = 0,
    jitter_strength: float = 0.3,
    patches_per_class: dict[str, int] | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Writes the data set; returns the number of images per split."""
    from PIL import Image

    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{out_dir} exists; pass overwrite=True (--overwrite) to rebuild it"
            )
        shutil.rmtree(out_dir)
    counts = patches_per_class or PATCHES_PER_CLASS
    rng = np.random.default_rng(seed)
    written = dict.fromkeys(SPLIT_BANDS, 0)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for class_name, sources in SOURCES.items():
        images = [source_image(name) for name in sources]
        for split, band in SPLIT_BANDS.items():
            per_source = np.array_split(np.arange(counts[split]), len(images))
            patches = np.concatenate(
                [
                    cut_patches(img, band, len(part), patch_size, rng)
                    for img, part in zip(images, per_source)
                ]
            )
            patches = jitter(patches, rng, jitter_strength)
            folder = partial / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            for index, patch in enumerate(patches):
                pixels = (patch * 255.0 + 0.5).astype(np.uint8)
                Image.fromarray(pixels, "L").save(folder / f"{index:04d}.png")
            written[split] += len(patches)
    partial.rename(out_dir)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python scripts/make_textures.py",
        description="Write the bundled textures data set (ImageFolder layout) from scikit-image's "
        "bundled photographs. Nothing is downloaded.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("datasets/textures"),
        help="output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--patch-size", type=int, default=16, help="patch side in pixels (default: 16)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.3,
        help="brightness/contrast jitter strength (default: 0.3)",
    )
    parser.add_argument(
        "--test-patches",
        type=int,
        default=PATCHES_PER_CLASS["test"],
        help="test patches per class (default: %(default)s; e.g. 1667 for a 10,000-image test "
        "split, cut from the same test band of each photograph)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing data set")
    args = parser.parse_args(argv)
    try:
        written = build_textures(
            args.out,
            patch_size=args.patch_size,
            seed=args.seed,
            jitter_strength=args.jitter,
            overwrite=args.overwrite,
            patches_per_class=PATCHES_PER_CLASS | {"test": args.test_patches},
        )
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    classes = ", ".join(SOURCES)
    print(
        f"wrote {args.out}: {written} images of {args.patch_size}x{args.patch_size} px; "
        f"classes: {classes}"
    )
    return 0

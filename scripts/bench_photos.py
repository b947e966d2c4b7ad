#!/usr/bin/env python
"""ml_infer's evaluation loop on a folder of photographs, beside the loop a user would write.

    python scripts/bench_photos.py                         # 1,000 JPEGs, resnet18 at 224, CPU
    python scripts/bench_photos.py --images 2000 --workers 4 --rounds 5 --device cuda

Writes (once) a folder of JPEG photographs 256-512 px on a side, cut from scikit-image's bundled
photographs, then times whole passes over it, in one process, interleaved round by round:

- reference: timm's validate.py loop: torchvision's ImageFolder (PIL decode, Resize(256),
  CenterCrop(224), ToTensor, Normalize) + a DataLoader with --workers workers + the same
  resnet18 (random weights) in eval mode under torch.no_grad;
- ml_infer streamed: the folder opened with `stream=true` (each batch decoded where it is
  fetched) and ml_infer's `standard` loop (predict_dataset, the engine: BatchNorm folded into the
  convolutions, channels_last);
- ml_infer held: the same loop over the folder decoded once and held in memory;
- pure forward: the engine's model alone on the images already decoded and normalised.

Prints images/s per row (median round, with its range), the ratios the issue set as targets
(streamed >= 1.0x the reference; >= 0.8x pure forward), and the machine. Opening the folder
(hashing and test-decoding each file once) is timed on its own: it is not part of a pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # scripts/benchlib

from scripts.benchlib.output import machine_summary  # noqa: E402

SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """`count` JPEGs in class folders (one class per source photograph), 256-512 px a side."""
    import skimage.data
    from PIL import Image

    folder = root / f"photos_{count}"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.jpg")) == count:
        return folder
    rng = np.random.default_rng(seed)
    for index in range(count):
        name = SOURCES[index % len(SOURCES)]
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = rng.uniform(0.5, 1.0)  # a random crop of the source, then a random photo size
        width, height = int(photo.width * side), int(photo.height * side)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height))
        size = (int(rng.integers(256, 513)), int(rng.integers(256, 513)))
        (folder / name).mkdir(parents=True, exist_ok=True)
        crop.resize(size, Image.Resampling.BICUBIC).save(
            folder / name / f"{index:05d}.jpg", quality=90
        )
    return folder


def reference_loop(
    folder: Path, model: torch.nn.Module, batch_size: int, workers: int, device: torch.device
) -> Callable[[], int]:
    """timm validate.py's shape: ImageFolder + DataLoader + model.eval() under no_grad."""
    from torchvision import datasets, transforms

    transform = transforms.Compose(
        [
            transforms.Resize(256, antialias=True),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder), transform=transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )

    def run() -> int:
        seen = 0
        with torch.no_grad():
            for images, _ in loader:
                model(images.to(device, non_blocking=True)).cpu()
                seen += len(images)
        return seen

    return run


def main(argv: list[str] | None = None) -> int:
    from ml_infer.aggregate import SoftVoting
    from ml_infer.augment import Views
    from ml_infer.data import ImageFolderDataset, make_loader
    from ml_infer.inputs import torchvision_weights_input
    from ml_infer.passes import predict_dataset
    from ml_infer.predictor import EngineSettings, Predictor

    parser = argparse.ArgumentParser(
        prog="python scripts/bench_photos.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loops")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_photos")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    folder = write_photos(args.out, args.images)

    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=len(SOURCES)).eval().to(device)
    spec = torchvision_weights_input("ResNet18_Weights.IMAGENET1K_V1")
    predictor = Predictor(
        [model],
        Views([]),
        SoftVoting(),
        SoftVoting(),
        spec,
        device=device,
        autocast_dtype=None,
        engine=EngineSettings(channels_last=True),  # the config's defaults
        member_names=["resnet18"],
    )
    started = time.perf_counter()
    streamed = ImageFolderDataset(folder, stream=True, **spec.fit())
    opening_s = time.perf_counter() - started
    held = ImageFolderDataset(folder, stream=False, **spec.fit())
    pin = device.type == "cuda"

    def ml_infer_loop(dataset) -> Callable[[], int]:
        loader = make_loader(
            dataset, batch_size=args.batch_size, num_workers=args.workers, pin_memory=pin
        )
        return lambda: len(
            predict_dataset(predictor, loader, warmup_batches=0, progress=False).labels
        )

    batches = [
        predictor.model_input(held.pixels(slice(s, s + args.batch_size)).to(device))
        for s in range(0, len(held), args.batch_size)
    ]

    def pure_forward() -> int:
        with torch.inference_mode():
            for batch in batches:
                predictor.models[0](batch).cpu()
        return len(held)

    rows = {
        "reference (ImageFolder + DataLoader + eval model)": reference_loop(
            folder, model, args.batch_size, args.workers, device
        ),
        "ml_infer standard, streamed": ml_infer_loop(streamed),
        "ml_infer standard, held in memory": ml_infer_loop(held),
        "pure forward (engine model, decoded tensors)": pure_forward,
    }
    for run in rows.values():  # warm-up: workers started, kernels chosen
        run()
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for round_index in range(args.rounds):
        names = list(rows)
        names = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in names:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            seen = rows[name]()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[name].append(seen / (time.perf_counter() - start))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    def ratio(name: str, reference: str) -> tuple[float, float, float]:
        per_round = [a / b for a, b in zip(rates[name], rates[reference])]
        return statistics.median(per_round), min(per_round), max(per_round)

    lines = [
        f"$ python scripts/bench_photos.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        *machine_summary(device),
    ]
    lines.append(
        f"{len(held)} JPEGs, 256-512 px, resnet18 at 224 (resize 256, centre crop), batch "
        f"{args.batch_size}, {args.workers} workers, {args.rounds} rounds; opening the streamed "
        f"folder (hash + test-decode every file): {opening_s:.1f} s"
    )
    lines += ["", "| loop | images/s (median) | range |", "|---|---|---|"]
    for name, values in rates.items():
        lines.append(
            f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} |"
        )
    reference_name, streamed_name, held_name, forward_name = rows
    lines += [
        "",
        "| ratio (per round, one process) | median | range | target |",
        "|---|---|---|---|",
    ]
    for name, against, target in (
        (streamed_name, reference_name, 1.0),
        (streamed_name, forward_name, 0.8),
        (held_name, forward_name, None),
    ):
        middle, low, high = ratio(name, against)
        verdict = (
            "" if target is None else f">= {target} {'met' if middle >= target else 'NOT met'}"
        )
        lines.append(f"| {name} / {against} | {middle:.2f} | {low:.2f}-{high:.2f} | {verdict} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

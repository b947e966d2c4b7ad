"""The least a checkpoint-on-a-folder evaluation does, in plain PyTorch: what `ml-inference
--checkpoint_path CKPT --data-dir DIR` is compared with in `bench_startup.py` (the seed project's
CLI is not available here; this stands in for it, and does less: no config, no timing rounds,
no calibration figures, no pictures, no files).

    python scripts/benchlib/plain_reference.py CKPT FOLDER
"""

from __future__ import annotations

import sys

import torch
import torchvision  # noqa: F401 - the seed's CLI imports it; its import time is part of the cost
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from ml_infer.models import SmallCNN


def main(checkpoint_path: str, folder: str) -> None:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    spec, stats = checkpoint["model"], checkpoint["input"]
    model = SmallCNN(spec["in_channels"], spec["num_classes"], spec["width"], spec["dropout"])
    model.load_state_dict(checkpoint["model_state_dict"])
    model.eval()
    transform = v2.Compose(
        [
            v2.Grayscale(stats["channels"]),
            v2.Resize(stats["size"]),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(stats["mean"], stats["std"]),
        ]
    )
    images = ImageFolder(folder, transform=transform)
    loader = torch.utils.data.DataLoader(images, batch_size=64)
    correct = 0
    with torch.inference_mode():
        for batch, labels in loader:
            correct += int((model(batch).argmax(dim=1) == labels).sum())
    print(f"accuracy {correct / len(images):.4f} on {len(images)} images")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""k-fold trainer with EMA weights: writes the demo's checkpoints.

    ml-infer-train                       # 5 folds of SmallCNN on digits -> runs/digits/fold_<k>/
    ml-infer-train folds=3 epochs=10     # any key of conf/train.yaml

It exists so that the demo and the tests have real checkpoints; it is not a training
framework. The folds are disjoint (StratifiedKFold over the train split) and fold k trains
from seed + k, so the models differ enough for an ensemble to have something to gain. Each
epoch evaluates raw and EMA weights on the fold's held-out part; the best epoch is chosen on the
raw weights (the checkpoint's default) and both weight sets of that epoch are saved.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ml_infer.checkpoints import save_checkpoint
from ml_infer.config import conf_dir, instantiate, plain_dict
from ml_infer.data import build_dataset
from ml_infer.device import resolve_device
from ml_infer.errors import Interrupted, UserError, exit_interrupted, exit_with, stop_on_signals
from ml_infer.inputs import InputSpec
from ml_infer.precheck import check_command_line

log = logging.getLogger(__name__)


class ModelEma:
    """Exponential moving average of a model's parameters and float buffers.

    The decay ramps up as min(decay, (1 + n) / (10 + n)) over the first updates, so early EMA
    weights are not dominated by the random initialisation.
    """

    def __init__(self, model: Any, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay
        self.updates = 0
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    def update(self, model: Any) -> None:
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            model_state = model.state_dict()
            for name, ema_value in self.module.state_dict().items():
                value = model_state[name]
                if ema_value.dtype.is_floating_point:
                    ema_value.mul_(decay).add_(value.detach(), alpha=1 - decay)
                else:
                    ema_value.copy_(value)


def train_folds(cfg: DictConfig) -> list[Path]:
    """Trains `cfg.folds` models and returns their checkpoint paths."""
    import numpy as np
    import torch
    from sklearn.model_selection import StratifiedKFold
    from tqdm.auto import tqdm

    if cfg.folds < 2:
        raise UserError(f"folds must be at least 2 (k-fold cross-validation), got {cfg.folds}")
    device = resolve_device(cfg.device)
    dataset = build_dataset(cfg.data, "train", **_fit_kwargs(cfg))
    images, labels = dataset.pixels(), dataset.labels
    channels = images.shape[1]
    input_spec = InputSpec(
        size=(images.shape[-2], images.shape[-1]),
        channels=channels,
        mean=tuple(images.mean(dim=(0, 2, 3)).tolist()),
        std=tuple(images.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist()),
    )
    splitter = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    runs_dir = Path(cfg.runs_dir)
    written = []
    log.info(
        "training %d folds of %s on %s (%d train images, %d classes) on %s",
        cfg.folds,
        cfg.model._target_,
        cfg.data.name,
        len(labels),
        len(dataset.classes),
        device,
    )
    for fold, (train_idx, val_idx) in enumerate(
        splitter.split(np.zeros(len(labels)), labels.numpy())
    ):
        seed = cfg.seed + fold
        torch.manual_seed(seed)
        model_config = plain_dict(cfg.model) | {
            "in_channels": channels,
            "num_classes": len(dataset.classes),
        }

        model = instantiate(model_config).to(device)
        ema = ModelEma(model, cfg.ema_decay)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = -(-len(train_idx) // cfg.batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch
        )
        generator = torch.Generator().manual_seed(seed)
        train_images, train_labels = images[train_idx], labels[train_idx]
        val_images, val_labels = images[val_idx].to(device), labels[val_idx].to(device)
        best: dict[str, Any] = {"val_accuracy": -1.0}
        history: list[float] = []
        started = time.perf_counter()
        epochs = tqdm(
            range(cfg.epochs), desc=f"fold {fold}", unit="epoch", disable=None, leave=False
        )
        for epoch in epochs:
            model.train()
            order = torch.randperm(len(train_idx), generator=generator)
            for start in range(0, len(order), cfg.batch_size):
                batch = order[start : start + cfg.batch_size]
                x = _augment(train_images[batch], cfg.augment, generator).to(device)
                loss = torch.nn.functional.cross_entropy(
                    model(input_spec.normalise(x)),
                    train_labels[batch].to(device),
                    label_smoothing=cfg.label_smoothing,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                ema.update(model)
            raw_accuracy = _accuracy(model, input_spec.normalise(val_images), val_labels)
            ema_accuracy = _accuracy(ema.module, input_spec.normalise(val_images), val_labels)
            epochs.set_postfix(val=f"{raw_accuracy:.3f}", ema=f"{ema_accuracy:.3f}")
            history.append(raw_accuracy)
            if raw_accuracy > best["val_accuracy"]:
                best = {
                    "epoch": epoch,
                    "val_accuracy": raw_accuracy,
                    "val_accuracy_ema": ema_accuracy,
                    "model_state_dict": copy.deepcopy(model.state_dict()),
                    "ema_state_dict": copy.deepcopy(ema.module.state_dict()),
                }
        path = runs_dir / f"fold_{fold}" / "weights" / "best.pt"
        metrics = {k: best[k] for k in ("epoch", "val_accuracy", "val_accuracy_ema")}
        metrics |= {
            "epochs": cfg.epochs,
            "val_accuracy_history": history,
            "val_ids": [dataset.sample_ids[i] for i in val_idx.tolist()],
            "seed": seed,
            "train_size": len(train_idx),
            "val_size": len(val_idx),
            "train_seconds": time.perf_counter() - started,
        }
        save_checkpoint(
            path,
            model_config=model_config,
            model_state_dict=best["model_state_dict"],
            ema_state_dict=best["ema_state_dict"],
            classes=dataset.classes,
            input_spec=input_spec,
            fold=fold,
            metrics=metrics | {"data": cfg.data.name},
        )
        winner = "EMA wins" if best["val_accuracy_ema"] > best["val_accuracy"] else "raw wins"
        if best["val_accuracy_ema"] == best["val_accuracy"]:
            winner = "a tie"
        log.info(
            "fold %d: best epoch %d/%d, val accuracy raw %.4f, EMA %.4f (%s), %.1fs -> %s",
            fold,
            best["epoch"] + 1,
            cfg.epochs,
            best["val_accuracy"],
            best["val_accuracy_ema"],
            winner,
            metrics["train_seconds"],
            path,
        )
        written.append(path)
    return written


def _fit_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Size / channel overrides for the training images (`image_size`, `channels` in train.yaml)."""
    kwargs: dict[str, Any] = {}
    if cfg.get("image_size") is not None:
        size = cfg.image_size
        kwargs["image_size"] = [size, size] if isinstance(size, int) else list(size)
    if cfg.get("channels") is not None:
        kwargs["channels"] = cfg.channels
    return kwargs


def _augment(images: Any, mode: str, generator: Any) -> Any:
    """Training-time augmentation: `none`, or `dihedral` (a random symmetry of the square each).

    Images are grouped by their drawn symmetry, so the work is 8 batched ops, not one per image.
    """
    if mode == "none":
        return images
    if mode != "dihedral":
        raise UserError(f"unknown training augment {mode!r}; valid: none, dihedral")
    import torch

    symmetry = torch.randint(8, (len(images),), generator=generator)
    augmented = images.clone()
    for index in range(1, 8):
        chosen = symmetry == index
        if chosen.any():
            turned = images[chosen].rot90(index % 4, dims=(-2, -1))
            augmented[chosen] = turned.flip(-1) if index >= 4 else turned
    return augmented


def _accuracy(model: Any, images: Any, labels: Any) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        preds = torch.cat([model(chunk).argmax(-1) for chunk in images.split(512)])
    return float((preds == labels).float().mean())


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def _hydra_entry(cfg: DictConfig) -> None:
    try:
        train_folds(cfg)
    except UserError as error:
        exit_with(error)


def main() -> None:
    """`ml-infer-train` / `python -m ml_infer.train`."""
    stop_on_signals()
    try:
        check_command_line(sys.argv[1:], config_name="train")
    except UserError as error:
        exit_with(error)
    try:
        _hydra_entry()
    except Interrupted as interrupted:
        exit_interrupted(interrupted, "training stopped; folds already written are complete")


if __name__ == "__main__":
    main()

"""Classifier architectures that checkpoints name by `_target_`.

A checkpoint stores its model as a Hydra config (`{"_target_": "ml_infer.models.SmallCNN",
...}`), so an architecture is any public callable returning an `nn.Module`. A checkpoint's own
config is built only when `check_trusted_architecture` accepts it: its `_target_` is exactly one
of `TRUSTED_ARCHITECTURES` (a prefix check would let `torchvision.models.resnet.torch.load`
through), its arguments are plain values, and it asks for no pretrained download. A user who
trusts another module names it with `model=` on the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ml_infer.errors import UserError

TRUSTED_ARCHITECTURES = frozenset(
    {"ml_infer.models.SmallCNN", "ml_infer.models.torchvision_classifier"}
)
_DOWNLOAD_ARGUMENTS = ("weights", "pretrained", "weights_backbone")


def check_trusted_architecture(config: Any, source: str) -> None:
    """Raises a UserError unless `config` is a flat call of a trusted architecture.

    >>> check_trusted_architecture({"_target_": "ml_infer.models.SmallCNN", "width": 8}, "x.pt")
    >>> check_trusted_architecture(
    ...     {"_target_": "torchvision.models.resnet.torch.load"}, "x.pt"
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ml_infer.errors.UserError: x.pt names architecture 'torchvision.models.resnet.torch.load', ...
    """
    if not isinstance(config, Mapping):
        raise UserError(f"{source} has a model config that is not a mapping")
    target = config.get("_target_")
    if target not in TRUSTED_ARCHITECTURES:
        raise UserError(
            f"{source} names architecture {target!r}, which is not one ml_infer builds from a "
            f"checkpoint ({', '.join(sorted(TRUSTED_ARCHITECTURES))}); "
            "to trust it, name it yourself with model="
        )
    for key, value in config.items():
        if key != "_target_" and str(key).startswith("_"):
            raise UserError(f"{source}: model config key {key!r} is not allowed in a checkpoint")
        if key in _DOWNLOAD_ARGUMENTS:
            raise UserError(
                f"{source}: model config asks for {key}={value!r}; nothing is downloaded"
            )
        values = value if isinstance(value, (list, tuple)) else [value]
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise UserError(f"{source}: model config argument {key!r} must be a plain value")


class SmallCNN(nn.Sequential):
    """Three conv blocks and a linear head: the demo model for small images.

    Works for any input of at least 2x2 pixels (one 2x2 max-pool, then global average pool).

    >>> import torch
    >>> SmallCNN(in_channels=1, num_classes=10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.1):
        super().__init__(
            _conv_block(in_channels, width),
            _conv_block(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_block(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(4 * width, num_classes),
        )


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def torchvision_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A torchvision architecture (untrained) with its stem and head fitted to the data.

    >>> torchvision_classifier("resnet18", in_channels=1, num_classes=5).fc.out_features
    5
    """
    from torchvision import models

    valid = sorted(models.list_models(module=models))
    if name not in valid:
        raise UserError(f"unknown torchvision model {name!r}; valid: {', '.join(valid)}")
    model = models.get_model_builder(name)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_first_conv(model, in_channels)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                replacement = nn.Conv2d(
                    in_channels,
                    child.out_channels,
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    bias=child.bias is not None,
                )
                setattr(parent, child_name, replacement)
                return
    raise UserError(f"no 3-channel input convolution to adapt to {in_channels} channels")

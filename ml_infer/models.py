"""Classifier architectures that checkpoints name by `_target_`.

A checkpoint stores its model as a Hydra config (`{"_target_": "ml_infer.models.SmallCNN",
...}`), so an architecture is any public callable returning an `nn.Module`. Only targets
under the prefixes in `TRUSTED_MODEL_TARGETS` are built from a checkpoint's own config; a user
who trusts another module names it with `model=` on the command line.
"""

from __future__ import annotations

from torch import nn

TRUSTED_MODEL_TARGETS = ("ml_infer.models.", "torchvision.models.")


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

    try:
        builder = models.get_model_builder(name)
    except ValueError as error:
        valid = ", ".join(sorted(models.list_models(module=models)))
        raise ValueError(f"unknown torchvision model {name!r}; valid: {valid}") from error
    model = builder(weights=None, num_classes=num_classes)
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
    raise ValueError("no 3-channel input convolution found to adapt")

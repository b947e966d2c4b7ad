"""Classifier architectures a checkpoint may name, and how they are built from its config.

A checkpoint stores its model as `{"_target_": "ml_infer.models.SmallCNN", <arguments>}`. That
config is data from whoever made the file, so it is never handed to Hydra or OmegaConf (which
resolve `${...}` interpolations, and `${oc.create:...}` builds a nested `_target_` config after
any check of the outer one). `ARCHITECTURES` maps each trusted name to its Python callable, and
`checked_architecture` calls it with arguments type-checked against that callable's signature:
integers, finite floats, booleans and, for `torchvision_classifier`, a torchvision classifier
name from torchvision's own list. Anything else is refused with one line naming the file and
the key. A user who trusts another module names it with `model=` on the command line: that
config is the user's own and goes through Hydra.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any, cast

from torch import nn

from ml_infer.errors import UserError
from ml_infer.filedata import refuse_interpolations

_DOWNLOAD_ARGUMENTS = ("weights", "pretrained", "weights_backbone")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A trusted architecture and the checked arguments to build it with."""

    target: str
    arguments: dict[str, Any]

    def build(self) -> nn.Module:
        return ARCHITECTURES[self.target](**self.arguments)


def checked_architecture(config: Any, source: str) -> Architecture:
    """A checkpoint's model config as a call of a trusted architecture with checked arguments.

    >>> checked_architecture(
    ...     {"_target_": "ml_infer.models.SmallCNN", "in_channels": 1, "num_classes": 2}, "x.pt"
    ... ).arguments
    {'in_channels': 1, 'num_classes': 2}
    >>> checked_architecture(
    ...     {"_target_": "torchvision.models.resnet.torch.load"}, "x.pt"
    ... )  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ml_infer.errors.UserError: x.pt names architecture 'torchvision.models.resnet.torch.load', ...
    """
    if not isinstance(config, Mapping):
        raise UserError(f"{source} has a model config that is not a mapping")
    refuse_interpolations(config, source, "model")
    target = config.get("_target_")
    if not isinstance(target, str) or target not in ARCHITECTURES:
        raise UserError(
            f"{source} names architecture {target!r}, which is not one ml_infer builds from a "
            f"checkpoint ({', '.join(sorted(ARCHITECTURES))}); "
            "to trust it, name it yourself with model="
        )
    builder = ARCHITECTURES[target]
    parameters = inspect.signature(builder, eval_str=True).parameters
    arguments: dict[str, Any] = {}
    for key, value in config.items():
        if key == "_target_":
            continue
        if not isinstance(key, str) or key.startswith("_"):
            raise UserError(f"{source}: model config key {key!r} is not allowed in a checkpoint")
        if key in _DOWNLOAD_ARGUMENTS:
            raise UserError(
                f"{source}: model config asks for {key}={value!r}; nothing is downloaded"
            )
        if key not in parameters:
            raise UserError(
                f"{source}: model config argument {key!r} is not one {target} takes; "
                f"valid: {', '.join(parameters)}"
            )
        arguments[key] = _checked_argument(value, parameters[key].annotation, key, source, target)
    missing = [
        name
        for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty and name not in arguments
    ]
    if missing:
        raise UserError(f"{source}: model config lacks {', '.join(missing)} for {target}")
    return Architecture(target, arguments)


# Upper bounds that keep a hostile config from allocating without limit before its weights are
# compared (a model is first built on the meta device, which allocates nothing, see checkpoints).
_ARGUMENT_RANGES: dict[str, tuple[float, float]] = {
    "in_channels": (1, 3),
    "num_classes": (1, 100_000),
    "width": (1, 4096),
    "dropout": (0.0, 1.0),
}


def _checked_argument(value: Any, expected: Any, key: str, source: str, target: str) -> Any:
    where = f"{source}: model config argument {key!r}"
    if isinstance(value, (dict, list, tuple)) or value is None:
        kind = "nothing" if value is None else f"a {type(value).__name__}"
        raise UserError(f"{where} must be a plain value ({_type_name(expected)}), got {kind}")
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and math.isfinite(value)
    elif expected is str:
        valid = _STRING_CHOICES[(target, key)]()
        if not isinstance(value, str) or value not in valid:
            raise UserError(f"{where} is {value!r}; valid: {', '.join(valid)}")
        return value
    else:  # an argument type this loader has no check for: not settable from a checkpoint
        raise UserError(f"{where} cannot be set from a checkpoint")
    if not ok:
        raise UserError(
            f"{where} must be {_type_name(expected)}, got {type(value).__name__} {value!r}"
        )
    low, high = _ARGUMENT_RANGES.get(key, (-math.inf, math.inf))
    if not low <= value <= high:
        raise UserError(f"{where} is {value!r}; valid: {low:g} to {high:g}")
    return value


def _type_name(expected: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a name"}
    return names.get(expected, str(expected))


def torchvision_classifier_names() -> list[str]:
    """The classification architectures torchvision builds (no detection/segmentation/video)."""
    from torchvision import models

    return sorted(models.list_models(module=models))


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

    valid = torchvision_classifier_names()
    if name not in valid:
        raise UserError(f"unknown torchvision model {name!r}; valid: {', '.join(valid)}")
    model: nn.Module = models.get_model_builder(name)(weights=None, num_classes=num_classes)
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
                    kernel_size=cast(tuple[int, int], child.kernel_size),
                    stride=cast(tuple[int, int], child.stride),
                    padding=cast(tuple[int, int], child.padding),
                    bias=child.bias is not None,
                )
                setattr(parent, child_name, replacement)
                return
    raise UserError(f"no 3-channel input convolution to adapt to {in_channels} channels")


def timm_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A timm architecture, untrained (nothing is downloaded), with `in_channels` inputs and
    `num_classes` outputs (the optional extra: pip install 'ml-infer[timm]')."""
    timm = _timm()
    if name not in timm.list_models():
        raise UserError(f"unknown timm model {name!r}; valid: timm.list_models() names it")
    model: nn.Module = timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels
    )
    return model


def timm_classifier_names() -> list[str]:
    return list(_timm().list_models())


def timm_input(name: str) -> dict[str, Any]:
    """The evaluation input timm's own data config gives model `name` (input size, crop_pct,
    interpolation, mean, std), from its pretrained config in timm's code: nothing downloaded."""
    timm = _timm()  # its submodules are imported with it
    pretrained = timm.models.get_pretrained_cfg(name)
    if pretrained is None:
        raise UserError(f"timm has no data config for {name!r}; set checkpoint.input.* yourself")
    config = timm.data.resolve_data_config({}, pretrained_cfg=pretrained.to_dict())
    return {
        "size": list(config["input_size"][1:]),
        "channels": config["input_size"][0],
        "mean": list(config["mean"]),
        "std": list(config["std"]),
        "crop_pct": config["crop_pct"],
        "interpolation": config["interpolation"],
    }


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError(
            "model=timm needs timm: pip install 'ml-infer[timm]' (or pip install timm)"
        ) from None
    return timm


# The architectures a checkpoint may name, by the `_target_` it names them with.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "ml_infer.models.SmallCNN": SmallCNN,
    "ml_infer.models.torchvision_classifier": torchvision_classifier,
    "ml_infer.models.timm_classifier": timm_classifier,
}
# The valid values of each string argument of a trusted architecture, by (target, argument).
_STRING_CHOICES: dict[tuple[str, str], Callable[[], list[str]]] = {
    ("ml_infer.models.torchvision_classifier", "name"): torchvision_classifier_names,
    ("ml_infer.models.timm_classifier", "name"): timm_classifier_names,
}

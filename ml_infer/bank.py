"""Checkpoints -> a bank of models: each built, given raw or EMA weights, and checked to agree.

A checkpoint's own architecture is built only through `models.checked_architecture` (a trusted
name and type-checked arguments, first on the meta device, which allocates nothing); the
user's `model=` config, which is how a user says "I trust this code", goes through Hydra. The
weights must fit the model: missing, unexpected or misshapen tensors are named. Ensemble
members must agree on classes and input, and on architecture unless mixing is allowed.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ml_infer.checkpoints import open_checkpoint
from ml_infer.config import instantiate
from ml_infer.errors import UserError, one_of
from ml_infer.formats import CheckpointFile
from ml_infer.inputs import InputSpec, torchvision_weights_input
from ml_infer.models import checked_architecture, timm_input

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Classifier:
    """A loaded checkpoint: the model in eval mode and what it was trained on."""

    path: Path
    model: nn.Module
    model_config: dict[str, Any]
    classes: list[str]
    input_spec: InputSpec
    weights: Literal["raw", "ema"]
    sha256: str
    format: str = "ml_infer"


def load_classifier(
    checkpoint: str | Path | CheckpointFile,
    *,
    use_ema: bool = False,
    model_config: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    input_spec: InputSpec | None = None,
) -> Classifier:
    """Builds the checkpoint's model, loads raw or EMA weights, and puts it in eval mode.

    `model_config` (the user's `model=` choice) overrides the architecture the checkpoint names;
    `classes` and `input_spec` describe checkpoints that do not describe themselves.
    """
    if not isinstance(checkpoint, CheckpointFile):
        checkpoint = open_checkpoint(checkpoint)
    path = checkpoint.path
    classes = checkpoint.classes or (list(classes) if classes else None)
    if not classes:
        raise UserError(
            f"checkpoint {path} ({checkpoint.format}) does not list its classes; "
            "set checkpoint.classes=[...] or evaluate on data with class folders"
        )
    if checkpoint.num_classes is not None and checkpoint.num_classes != len(classes):
        raise _OutputsDiffer(
            f"checkpoint {path} was trained on {checkpoint.num_classes} classes, "
            f"the data has {len(classes)}: {classes}"
        )
    input_spec = checkpoint.input_spec or input_spec
    if input_spec is None:
        raise UserError(
            f"checkpoint {path} ({checkpoint.format}) does not describe its input; set "
            "checkpoint.input.size=[H,W] checkpoint.input.mean=[...] checkpoint.input.std=[...]"
        )
    state_dict, weights = _select_weights(checkpoint, use_ema)
    if model_config is None:
        if not checkpoint.model_config or "_target_" not in checkpoint.model_config:
            raise UserError(
                f"checkpoint {path} ({checkpoint.format}) does not name its architecture; "
                "choose one with model= (e.g. model=small_cnn or model=resnet18)"
            )
        architecture = checked_architecture(checkpoint.model_config, f"checkpoint {path}")
        declared = architecture.arguments.get("num_classes")
        if declared is not None and declared != len(classes):
            listed = "it lists" if checkpoint.classes else "it was given"
            raise _OutputsDiffer(
                f"checkpoint {path}: its model has {declared} outputs but {listed} "
                f"{len(classes)} classes"
            )
        # Built on the meta device first (allocating nothing), so that weights of another shape
        # are refused before a hostile config can ask for a huge model.
        with torch.device("meta"):
            skeleton = architecture.build()
        check_weights_fit(skeleton, state_dict, path, architecture.target)
        model = architecture.build()
        model_config = {"_target_": architecture.target, **architecture.arguments}
        model_kwargs: dict[str, Any] = {}
    else:
        model_kwargs = {"in_channels": input_spec.channels, "num_classes": len(classes)}
        model = instantiate(dict(model_config), **model_kwargs)  # the user's own config
        check_weights_fit(model, state_dict, path, str(model_config.get("_target_")))
    model.load_state_dict(state_dict)
    return Classifier(
        path=path,
        model=model.eval(),
        model_config=dict(model_config) | model_kwargs,
        classes=list(classes),
        input_spec=input_spec,
        weights=weights,
        sha256=checkpoint.sha256,
        format=checkpoint.format,
    )


def check_weights_fit(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], path: Path, target: str
) -> None:
    """A UserError naming the first few missing, unexpected or misshapen weights, if any."""
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshapen = [
        key
        for key in expected
        if key in state_dict
        and (
            not isinstance(state_dict[key], torch.Tensor)
            or tuple(state_dict[key].shape) != tuple(expected[key].shape)
        )
    ]
    problems = []
    error_type = UserError
    if missing:
        problems.append(f"missing weights {_first_few(missing)}")
    if unexpected:
        problems.append(f"unexpected weights {_first_few(unexpected)}")
    if misshapen:
        key = misshapen[0]
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        else:
            have, want = list(value.shape), list(expected[key].shape)
            hint = _shape_hint(key, have, want, list(expected))
            problems.append(f"{key} has shape {have}, the model {want}{hint}")
            if "outputs, the model" in hint:
                error_type = _OutputsDiffer
        if len(misshapen) > 1:
            problems[-1] += f" (and {len(misshapen) - 1} more of another shape)"
    if problems:
        raise error_type(
            f"checkpoint {path} does not fit architecture {target}: {'; '.join(problems)}"
        )


class _OutputsDiffer(UserError):
    """The checkpoint's weights give another number of outputs than the classes named."""


def _shape_hint(key: str, have: list[int], want: list[int], keys: list[str]) -> str:
    """What a shape mismatch usually means: other input channels, or another number of classes."""
    weights = [k for k in keys if k.endswith("weight")]
    if len(have) == 4 == len(want) and weights and key == weights[0] and have[1] != want[1]:
        return f": the checkpoint takes {have[1]} input channel(s), the model {want[1]}"
    if key in keys[-2:] and have[:1] != want[:1]:
        return f": the checkpoint has {have[0]} outputs, the model {want[0]} classes"
    return ""


def _first_few(keys: Sequence[str], shown: int = 3) -> str:
    """
    >>> _first_few(["a", "b", "c", "d", "e"])
    'a, b, c (and 2 more)'
    """
    more = f" (and {len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_ensemble(
    checkpoints: Sequence[str | Path | CheckpointFile],
    *,
    use_ema: bool = False,
    model_config: Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    input_spec: InputSpec | None = None,
    allow_mixed_architectures: bool = False,
    classes_from_folder: bool = False,
) -> list[Classifier]:
    """Loads every member; they must agree on classes, input and (by default) architecture.
    `classes_from_folder`: `classes` are a folder's sorted class names, given to checkpoints
    that do not name theirs."""
    try:
        members = [
            load_classifier(
                c,
                use_ema=use_ema,
                model_config=model_config,
                classes=classes,
                input_spec=input_spec,
            )
            for c in checkpoints
        ]
    except _OutputsDiffer as error:
        if not classes_from_folder:
            raise
        raise UserError(
            f"{error}; a checkpoint without class names takes the folder's sorted class names: "
            "set checkpoint.classes=[...] to score a folder with some of them"
        ) from None
    first = members[0]
    for other in members[1:]:
        if other.classes != first.classes:
            raise UserError(
                f"ensemble members disagree on classes: {first.path} has {first.classes}, "
                f"{other.path} has {other.classes}"
            )
        if other.input_spec != first.input_spec:
            raise UserError(
                f"ensemble members disagree on input: {first.path} expects {first.input_spec}, "
                f"{other.path} expects {other.input_spec}"
            )
        if other.model_config != first.model_config and not allow_mixed_architectures:
            raise UserError(
                f"ensemble members differ in architecture: {first.path} is {first.model_config}, "
                f"{other.path} is {other.model_config}; "
                "set ensemble.allow_mixed_architectures=true if that is intended"
            )
    return members


ENSEMBLE_MEMBERS = ("all", "first")


def strategy_checkpoints(ensemble: Any) -> list[Path]:
    """The checkpoints a strategy runs: every one of `ensemble.checkpoints` (globs expanded), or
    the first alone for the single-model presets (`ensemble=single` says `members: first`), so
    that `standard` and `tta` stay one model when the list names several."""
    paths = expand_checkpoint_paths(ensemble.checkpoints)
    members = ensemble.get("members", "all")
    if members not in ENSEMBLE_MEMBERS:
        raise one_of("ensemble.members", members, ENSEMBLE_MEMBERS)
    if members == "first" and len(paths) > 1:
        log.info("one model: the first of %d checkpoints, %s", len(paths), paths[0])
        return paths[:1]
    return paths


def expand_checkpoint_paths(patterns: str | Path | Sequence[str | Path] | None) -> list[Path]:
    """Expands glob patterns in natural order (fold_2 before fold_10); a plain path is kept even
    when missing, to be reported when it is read.

    >>> [p.name for p in expand_checkpoint_paths(["a/fold_10.pt", "a/fold_2.pt"])]
    ['fold_10.pt', 'fold_2.pt']
    """
    if patterns is None:
        patterns = []
    elif isinstance(patterns, (str, Path)):
        patterns = [patterns]  # ensemble.checkpoints=path.pt rather than [path.pt]
    paths: list[Path] = []
    for pattern in map(str, patterns):
        if any(char in pattern for char in "*?["):
            matches = sorted(glob.glob(pattern), key=natural_key)
            if not matches:
                raise UserError(
                    f"no checkpoint matches {pattern!r}; train folds with ml-infer-train "
                    "or point ensemble.checkpoints at existing files"
                )
            paths.extend(Path(match) for match in matches)
        else:
            paths.append(Path(pattern))
    if not paths:
        raise UserError("ensemble.checkpoints is empty; give at least one checkpoint path")
    repeated = sorted({str(p) for p in paths if paths.count(p) > 1})
    if repeated:
        raise UserError(f"ensemble.checkpoints lists {repeated} more than once")
    return paths


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value.

    >>> sorted(["fold_10", "fold_2", "fold_1"], key=natural_key)
    ['fold_1', 'fold_2', 'fold_10']
    """
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _select_weights(
    checkpoint: CheckpointFile, use_ema: bool
) -> tuple[Mapping[str, torch.Tensor], Literal["raw", "ema"]]:
    if use_ema:
        if checkpoint.ema_state_dict:
            return _unwrapped(checkpoint.ema_state_dict), "ema"
        log.warning("checkpoint %s has no EMA weights; using its raw weights", checkpoint.path)
    return _unwrapped(checkpoint.state_dict), "raw"


def _unwrapped(state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Drops the key prefix that DataParallel / EMA wrappers ("module.") or torch.compile
    ("_orig_mod.") add, when every key carries it.

    >>> list(_unwrapped({"module.fc.weight": 1, "module.fc.bias": 2}))
    ['fc.weight', 'fc.bias']
    """
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items()}
    return state_dict


def configured_input_spec(cfg: Any, path: Path) -> InputSpec:
    """`checkpoint.input` for checkpoints that do not describe their input themselves: a
    torchvision weights entry's evaluation transform, or size, mean and std given."""
    given = cfg.checkpoint.input
    if given.get("weights"):
        return torchvision_weights_input(str(given.weights))
    model = cfg.get("model")
    if model is not None and model.get("_target_") == "ml_infer.models.timm_classifier":
        # timm's own data config for the model, with what checkpoint.input sets on top
        spec = timm_input(str(model.get("name"))) | {
            key: value for key, value in given.items() if value is not None and key != "weights"
        }
        return InputSpec.from_dict(spec)
    if given.size is None or given.mean is None or given.std is None:
        raise UserError(
            f"checkpoint {path} does not describe its input; set checkpoint.input.size=[H,W] "
            "checkpoint.input.mean=[...] checkpoint.input.std=[...] (one value per channel), "
            "or checkpoint.input.weights=<a torchvision weights entry>"
        )
    return InputSpec.from_dict(
        {
            "size": given.size,
            "channels": len(given.mean),
            "mean": given.mean,
            "std": given.std,
            "resize": given.get("resize"),
            "crop_pct": given.get("crop_pct"),
            "interpolation": given.get("interpolation"),
        }
    )

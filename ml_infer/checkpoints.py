"""Saving and safely loading classifier checkpoints. Nothing else in ml_infer calls torch.load.

Our format (written by `ml_infer.train`) is a plain dict that `torch.load(weights_only=True)`
reads without unpickling any code:

    model            the architecture as a Hydra config: {"_target_": ..., constructor args}
    model_state_dict raw weights
    ema_state_dict   EMA weights (optional)
    classes          class names, in output order
    input            {"size": [H, W], "channels": C, "mean": [...], "std": [...]}
    fold, metrics    provenance: which fold, and its validation figures

Other formats load too, none of them by unpickling code:

- the seed project's `best.pt` (`model_state_dict`, optional `ema_state.ema_model_state`, and its
  run `config` with the input size and normalisation). Its numpy RNG state needs numpy's array
  reconstruction allow-listed, nothing more (`NUMPY_DATA_GLOBALS`);
- a plain state dict (a dict of tensors, or `{"state_dict": ...}`);
- `.safetensors` weights.

These do not say which architecture, classes or input they have: the architecture comes from
the user's `model=` config, the classes from `checkpoint.classes` or the data set's class
folders, the input from `checkpoint.input` (or the seed's run config).

A checkpoint's own model config is only built when `models.check_trusted_architecture` accepts it
(an exact allow-list of architectures, plain arguments, no download); any other architecture is
named by the user's `model=` config instead.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ml_infer.config import instantiate
from ml_infer.errors import UserError, brief
from ml_infer.models import checked_architecture, refuse_interpolations

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model expects: image size, channels, and the normalisation of [0, 1] pixels."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> InputSpec:
        """Checks and converts {"size", "channels", "mean", "std"}; a UserError names the problem.

        >>> InputSpec.from_dict({"size": 8, "channels": 1, "mean": [0.5], "std": [0.2]}).size
        (8, 8)
        """
        try:
            size = spec["size"]
            size = (
                (int(size), int(size)) if isinstance(size, (int, float)) else tuple(map(int, size))
            )
            result = cls(
                size=size,
                channels=int(spec["channels"]),
                mean=tuple(float(m) for m in spec["mean"]),
                std=tuple(float(s) for s in spec["std"]),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"input spec {dict(spec)} is malformed ({error!r})") from None
        if len(result.size) != 2 or min(result.size) < 1:
            raise UserError(f"input size must be [height, width] > 0, got {list(result.size)}")
        if result.channels not in (1, 3):
            raise UserError(f"input channels must be 1 or 3, got {result.channels}")
        if len(result.mean) != result.channels or len(result.std) != result.channels:
            raise UserError(
                f"input mean {list(result.mean)} and std {list(result.std)} need one value per "
                f"channel ({result.channels})"
            )
        if min(result.std) <= 0:
            raise UserError(f"input std must be positive, got {list(result.std)}")
        return result

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(images - mean) / std per channel, for [..., C, H, W] images in [0, 1]."""
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


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


def save_checkpoint(
    path: str | Path,
    *,
    model_config: Mapping[str, Any],
    model_state_dict: Mapping[str, torch.Tensor],
    classes: Sequence[str],
    input_spec: InputSpec,
    ema_state_dict: Mapping[str, torch.Tensor] | None = None,
    fold: int | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Writes a checkpoint atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": dict(model_config),
        "model_state_dict": {k: v.detach().cpu().clone() for k, v in model_state_dict.items()},
        "classes": list(classes),
        "input": input_spec.to_dict(),
        "fold": fold,
        "metrics": dict(metrics or {}),
    }
    if ema_state_dict is not None:
        payload["ema_state_dict"] = {k: v.detach().cpu().clone() for k, v in ema_state_dict.items()}
    partial = path.with_name(path.name + ".partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


@dataclasses.dataclass
class CheckpointFile:
    """What one checkpoint file says about itself; None where it is silent."""

    path: Path
    sha256: str
    format: Literal["ml_infer", "seed", "state_dict", "safetensors"]
    state_dict: Mapping[str, torch.Tensor]
    ema_state_dict: Mapping[str, torch.Tensor] | None = None
    model_config: dict[str, Any] | None = None
    classes: list[str] | None = None
    input_spec: InputSpec | None = None
    num_classes: int | None = None


def _numpy_data_globals() -> list[Any]:
    """numpy's array and scalar reconstruction: data only, no code (the seed's RNG state needs it).

    Files pickled under numpy 1 name the same functions `numpy.core.*`, hence the aliases.
    """
    import importlib

    import numpy as np
    import numpy.dtypes

    multiarray = importlib.import_module("numpy._core.multiarray")
    reconstruct = multiarray._reconstruct
    scalar = multiarray.scalar
    dtype_classes = [getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    return [
        np.ndarray,
        np.dtype,
        reconstruct,
        scalar,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (scalar, "numpy.core.multiarray.scalar"),
        *dtype_classes,
    ]


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], str]:
    """The checkpoint's contents and the SHA-256 of its bytes, loaded without unpickling code.

    Tensors are memory-mapped from the file rather than read into a second copy.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise UserError(f"checkpoint is empty: {path}")
    digest = _sha256(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path), digest
    try:
        contents = _torch_load(path)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        if blocked:
            raise UserError(
                f"checkpoint {path} holds a {blocked.group(1)} object, which is not safe to "
                "unpickle; only tensors and plain data are loaded"
            ) from None
        raise UserError(
            f"checkpoint {path} is corrupt or truncated, or not a PyTorch file"
        ) from None
    except (RuntimeError, EOFError, IndexError, ValueError, zipfile.BadZipFile) as error:
        reason = brief(error) or type(error).__name__
        raise UserError(
            f"checkpoint {path} is corrupt or truncated, or not a PyTorch file ({reason})"
        ) from None
    if not isinstance(contents, dict):
        raise UserError(f"checkpoint {path} holds a {type(contents).__name__}, not a dict")
    return contents, digest


def _torch_load(path: Path) -> Any:
    with torch.serialization.safe_globals(_numpy_data_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # Files in torch's legacy (pre-zip) format cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        raise UserError(
            f"checkpoint {path} is not a valid safetensors file ({brief(error)})"
        ) from None


def open_checkpoint(path: str | Path) -> CheckpointFile:
    """Reads a checkpoint of any supported format and says what it describes about itself."""
    path = Path(path)
    try:
        return _describe(path, *read_checkpoint(path))
    except UserError as error:
        message = str(error)
        raise UserError(
            message if str(path) in message else f"checkpoint {path}: {message}"
        ) from None


def _describe(path: Path, contents: dict[str, Any], digest: str) -> CheckpointFile:
    if path.suffix == ".safetensors":
        return CheckpointFile(path, digest, "safetensors", contents)
    if {"model_state_dict", "classes", "input"} <= contents.keys():
        version = contents.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(
                f"checkpoint {path} is format {version!r}, not one this ml_infer reads "
                f"(up to {FORMAT_VERSION}); upgrade ml_infer"
            )
        classes = contents["classes"]
        if not isinstance(classes, (list, tuple)) or not all(
            isinstance(name, (str, int)) for name in classes
        ):
            raise UserError(f"checkpoint {path}: classes must be a list of names")
        if not isinstance(contents["input"], Mapping):
            raise UserError(
                f"checkpoint {path}: input must be a mapping, got {contents['input']!r}"
            )
        return CheckpointFile(
            path,
            digest,
            "ml_infer",
            _state_dict(contents["model_state_dict"], path, "model_state_dict"),
            ema_state_dict=None
            if contents.get("ema_state_dict") is None
            else _state_dict(contents["ema_state_dict"], path, "ema_state_dict"),
            model_config=contents.get("model"),
            classes=[str(name) for name in classes],
            input_spec=InputSpec.from_dict(contents["input"]),
        )
    if "model_state_dict" in contents:
        source = f"checkpoint {path}"
        run_config = contents.get("config")
        if not run_config:
            run_config = _seed_run_config(path)
            source = f"run config {path.parent.parent / 'config.yaml'}"
        if not isinstance(run_config, Mapping):
            raise UserError(f"checkpoint {path}: its config is a {type(run_config).__name__}")
        ema = contents.get("ema_state") or {}
        num_classes = _get(run_config, "model", "num_classes")
        refuse_interpolations(num_classes, source, "model.num_classes")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int)
        ):
            raise UserError(f"{source}: model.num_classes must be an integer, got {num_classes!r}")
        ema_weights = ema.get("ema_model_state") if isinstance(ema, Mapping) else None
        return CheckpointFile(
            path,
            digest,
            "seed",
            _state_dict(contents["model_state_dict"], path, "model_state_dict"),
            ema_state_dict=None
            if ema_weights is None
            else _state_dict(ema_weights, path, "ema_state.ema_model_state"),
            input_spec=_seed_input_spec(run_config, source),
            num_classes=num_classes,
        )
    state_dict = contents.get("state_dict", contents)
    if state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return CheckpointFile(path, digest, "state_dict", state_dict)
    keys = ", ".join(sorted(map(str, contents))[:12])
    raise UserError(
        f"checkpoint {path} is not a format ml_infer reads (ml_infer's, the seed's best.pt, a "
        f"state dict, .safetensors); its keys: {keys}"
    )


def _state_dict(value: Any, path: Path, key: str) -> Mapping[str, torch.Tensor]:
    """`value` if it is a mapping of names to tensors, else a UserError naming the key."""
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
    ):
        raise UserError(f"checkpoint {path}: {key} must map parameter names to tensors")
    return value


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
        raise UserError(
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
            raise UserError(
                f"checkpoint {path}: its model has {declared} outputs but it lists "
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
        if len(misshapen) > 1:
            problems[-1] += f" (and {len(misshapen) - 1} more of another shape)"
    if problems:
        raise UserError(
            f"checkpoint {path} does not fit architecture {target}: {'; '.join(problems)}"
        )


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
) -> list[Classifier]:
    """Loads every member; they must agree on classes, input and (by default) architecture."""
    members = [
        load_classifier(
            c, use_ema=use_ema, model_config=model_config, classes=classes, input_spec=input_spec
        )
        for c in checkpoints
    ]
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


def _seed_run_config(path: Path) -> dict[str, Any]:
    """The seed project's run config.yaml, beside the weights/ folder that holds `path`.

    Read as plain YAML data: `${...}` interpolations stay literal strings (and are refused where
    a value is used), nothing is resolved or instantiated.
    """
    candidate = path.parent.parent / "config.yaml"
    if not candidate.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(candidate.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as error:
        reason = " ".join(str(error).split())[:160]
        raise UserError(f"run config {candidate} is not readable YAML ({reason})") from None
    if not isinstance(config, Mapping):
        raise UserError(f"run config {candidate} is not a mapping of settings")
    return dict(config)


def _seed_input_spec(run_config: Mapping[str, Any], source: str) -> InputSpec | None:
    """Input size and normalisation from the seed's run config, if it has them."""
    keys = {
        "size": ("transforms", "test", "resize"),
        "input_size": ("model", "input_size"),
        "mean": ("transforms", "test", "normalize", "mean"),
        "std": ("transforms", "test", "normalize", "std"),
    }
    values = {name: _get(run_config, *path) for name, path in keys.items()}
    for name, path in keys.items():
        refuse_interpolations(values[name], source, ".".join(path))
    size = values["size"] or values["input_size"]
    mean, std = values["mean"], values["std"]
    if size is None or mean is None or std is None:
        return None
    if not isinstance(mean, list):
        raise UserError(f"{source}: transforms.test.normalize.mean must be a list, got {mean!r}")
    return InputSpec.from_dict({"size": size, "channels": len(mean), "mean": mean, "std": std})


def _get(config: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, Mapping) or key not in config:
            return None
        config = config[key]
    return config


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

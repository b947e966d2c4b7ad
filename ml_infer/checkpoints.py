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
- timm's `train.py` checkpoints (`state_dict`, `state_dict_ema` or `model_ema` for
  `use_ema=true`, `arch`, and its argparse arguments under `args`: an `argparse.Namespace`, a
  plain attribute holder, allow-listed as data);
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

import argparse
import dataclasses
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

from ml_infer.errors import UserError, brief
from ml_infer.filedata import refuse_interpolations
from ml_infer.inputs import InputSpec

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


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
    format: Literal["ml_infer", "seed", "timm", "state_dict", "safetensors"]
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
        argparse.Namespace,  # timm's train.py saves its arguments: plain attributes, no code
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
    timm_ema = contents.get("state_dict_ema", contents.get("model_ema"))
    if isinstance(contents.get("state_dict"), Mapping) and ("arch" in contents or timm_ema):
        return CheckpointFile(
            path,
            digest,
            "timm",
            _state_dict(contents["state_dict"], path, "state_dict"),
            ema_state_dict=None
            if timm_ema is None
            else _state_dict(timm_ema, path, "state_dict_ema"),
        )
    state_dict = contents.get("state_dict", contents)
    if state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return CheckpointFile(path, digest, "state_dict", state_dict)
    keys = ", ".join(sorted(map(str, contents))[:12])
    raise UserError(
        f"checkpoint {path} is not a format ml_infer reads (ml_infer's, the seed's best.pt, "
        f"timm's, a state dict, .safetensors); its keys: {keys}"
    )


def _state_dict(value: Any, path: Path, key: str) -> Mapping[str, torch.Tensor]:
    """`value` if it is a mapping of names to tensors, else a UserError naming the key."""
    if not isinstance(value, Mapping) or not all(
        isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in value.items()
    ):
        raise UserError(f"checkpoint {path}: {key} must map parameter names to tensors")
    return value


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

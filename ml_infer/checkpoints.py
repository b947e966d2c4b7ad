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
- Lightning `.ckpt` files: the LightningModule's `state_dict`, its keys prefixed by the
  attribute that holds the network (`model.`), found as the one prefix under which weight
  matrices are stored, or named with `checkpoint.state_dict_prefix`; `hyper_parameters` read as
  data (their `num_classes`, when there is one, is checked against the classes);
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
import hashlib
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ml_infer.errors import UserError, brief
from ml_infer.formats import FORMAT_VERSION, CheckpointFile, describe, without_prefix
from ml_infer.inputs import InputSpec

log = logging.getLogger(__name__)


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


def open_checkpoint(path: str | Path, state_dict_prefix: str | None = None) -> CheckpointFile:
    """Reads a checkpoint of any supported format and says what it describes about itself.
    `state_dict_prefix` names the LightningModule attribute whose weights to take."""
    path = Path(path)
    try:
        found = describe(path, *read_checkpoint(path))
        if found.format == "lightning":
            found = without_prefix(found, state_dict_prefix)
        return found
    except UserError as error:
        message = str(error)
        raise UserError(
            message if str(path) in message else f"checkpoint {path}: {message}"
        ) from None

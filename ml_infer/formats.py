"""The checkpoint formats ml_infer reads, told apart by their keys, and what each says about
itself (`CheckpointFile`). The files are read, as data only, by `ml_infer.checkpoints`; see its
docstring for the formats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ml_infer.errors import UserError
from ml_infer.filedata import refuse_interpolations
from ml_infer.inputs import InputSpec

FORMAT_VERSION = 1  # of ml_infer's own checkpoints (checkpoints.save_checkpoint)


@dataclasses.dataclass
class CheckpointFile:
    """What one checkpoint file says about itself; None where it is silent."""

    path: Path
    sha256: str
    format: Literal["ml_infer", "seed", "timm", "lightning", "state_dict", "safetensors"]
    state_dict: Mapping[str, torch.Tensor]
    ema_state_dict: Mapping[str, torch.Tensor] | None = None
    model_config: dict[str, Any] | None = None
    classes: list[str] | None = None
    input_spec: InputSpec | None = None
    num_classes: int | None = None


def describe(path: Path, contents: dict[str, Any], digest: str) -> CheckpointFile:
    """What a checkpoint's contents (read as data by `checkpoints.read_checkpoint`) say about
    themselves, by format."""
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
            ema_state_dict=_optional_state_dict(
                contents.get("ema_state_dict"), path, "ema_state_dict"
            ),
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
            ema_state_dict=_optional_state_dict(ema_weights, path, "ema_state.ema_model_state"),
            input_spec=_seed_input_spec(run_config, source),
            num_classes=num_classes,
        )
    if "pytorch-lightning_version" in contents and isinstance(contents.get("state_dict"), Mapping):
        hyper_parameters = contents.get("hyper_parameters")
        declared = (
            hyper_parameters.get("num_classes") if isinstance(hyper_parameters, Mapping) else None
        )
        return CheckpointFile(
            path,
            digest,
            "lightning",
            _state_dict(contents["state_dict"], path, "state_dict"),
            num_classes=declared if isinstance(declared, int) and declared > 0 else None,
        )
    timm_ema = contents.get("state_dict_ema", contents.get("model_ema"))
    if isinstance(contents.get("state_dict"), Mapping) and ("arch" in contents or timm_ema):
        return CheckpointFile(
            path,
            digest,
            "timm",
            _state_dict(contents["state_dict"], path, "state_dict"),
            ema_state_dict=_optional_state_dict(timm_ema, path, "state_dict_ema"),
        )
    state_dict = contents.get("state_dict", contents)
    if state_dict and all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        return CheckpointFile(path, digest, "state_dict", state_dict)
    keys = ", ".join(sorted(map(str, contents))[:12])
    raise UserError(
        f"checkpoint {path} is not a format ml_infer reads (ml_infer's, the seed's best.pt, "
        f"timm's, a state dict, .safetensors); its keys: {keys}"
    )


def without_prefix(checkpoint: CheckpointFile, prefix: str | None) -> CheckpointFile:
    """A Lightning checkpoint's weights under `prefix` (default: the one attribute under which
    weight matrices are stored), the prefix removed."""
    weights = checkpoint.state_dict
    holders = sorted({key.split(".", 1)[0] for key in weights if "." in key})
    if prefix is None:
        with_matrices = sorted(
            {
                key.split(".", 1)[0]
                for key, value in weights.items()
                if "." in key and value.dim() > 1
            }
        )
        if len(with_matrices) != 1:
            raise UserError(
                f"checkpoint {checkpoint.path} holds the weights of {len(with_matrices)} modules "
                f"({', '.join(with_matrices)}); say which with checkpoint.state_dict_prefix=NAME"
            )
        prefix = with_matrices[0]
    if prefix not in holders:
        raise UserError(
            f"checkpoint {checkpoint.path} has no weights under {prefix!r}; its modules: "
            f"{', '.join(holders)}"
        )
    start = len(prefix) + 1
    kept = {key[start:]: value for key, value in weights.items() if key.startswith(prefix + ".")}
    return dataclasses.replace(checkpoint, state_dict=kept)


def _optional_state_dict(value: Any, path: Path, key: str) -> Mapping[str, torch.Tensor] | None:
    return None if value is None else _state_dict(value, path, key)


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

"""Files a user was handed, read as data: nothing in them is resolved, instantiated or run.

JSON is read with `json`, YAML with `yaml.safe_load`; a `${...}` string (an OmegaConf
interpolation, which Hydra would resolve and `oc.create` would turn into a config with its own
`_target_`) stays a literal string, or is refused where a value is used.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ml_infer.errors import UserError

_INTERPOLATION = "${"


def find_interpolation(value: Any, path: str) -> tuple[str, str] | None:
    """The first `${...}` string inside `value` (dicts, lists, tuples searched), as (path, text).

    Shared containers (a pickle may reference one list many times) are visited once.

    >>> find_interpolation({"a": [1, "${oc.env:HOME}"]}, "model")
    ('model.a[1]', '${oc.env:HOME}')
    >>> find_interpolation({"a": "plain $ text"}, "model") is None
    True
    """
    seen: set[int] = set()
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _INTERPOLATION in item:
                return where, item
            continue
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, Mapping):
            children = [(v, f"{where}.{k}") for k, v in item.items()]
            children += [(k, f"{where} (a key)") for k in item]
        elif isinstance(item, (list, tuple)):
            children = [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))
    return None


def refuse_interpolations(value: Any, source: str, path: str) -> None:
    """A UserError naming `source` and the key when `value` holds a `${...}` string anywhere."""
    found = find_interpolation(value, path)
    if found is not None:
        where, text = found
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UserError(
            f"{source}: {where} holds the interpolation {shown!r}; strings in a file are data "
            "and are never resolved"
        )


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; ValueError naming what is wrong with it otherwise
    (OSError when it cannot be read)."""
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise ValueError(f"{path.name} is not text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path.name} is not valid JSON ({error.msg}, line {error.lineno})"
        ) from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path.name} holds a {type(payload).__name__}, not a JSON object")
    return payload


def read_yaml_data(path: Path) -> Any:
    """A YAML file's plain data (`yaml.safe_load`: no tags, no objects, nothing resolved)."""
    import yaml

    return yaml.safe_load(path.read_text())

"""Where the configs live, and the one place that turns a `_target_` config into an object.

Augmentations and aggregators are chosen by name (`tta.aggregation=max`,
`tta.augmentations=[horizontal_flip]`), as the seed's config does. A name resolves to the yaml
file of that name in the matching `conf/` folder, which holds the `_target_` to build. A config
entry may also be an inline mapping with its own `_target_`, for parts defined outside ml_infer.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from ml_infer.errors import UserError, one_of

log = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The config tree: `ml_infer/conf` in a wheel, `conf/` beside the package in a checkout."""
    for candidate in (_PACKAGE_DIR / "conf", _PACKAGE_DIR.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"ml_infer's conf/ folder is missing (looked beside {_PACKAGE_DIR})")


# Presets written by `mode=tune`, relative to the working directory; conf/config.yaml puts it on
# Hydra's search path, so `tta=<name>` finds presets/tta/<name>.yaml.
PRESETS_DIR = Path("presets")
# Until mode=tune first writes it, Hydra warns on every run that ./presets is missing.
warnings.filterwarnings(
    "ignore", message="provider=hydra.searchpath in main, path=presets is not available"
)


def options(group: str) -> list[str]:
    """The option names of a config group: its yaml files in conf/ and in ./presets/, sorted.

    >>> "tta_ensemble" in options("strategy")
    True
    """
    return sorted({path.stem for path in _group_dirs(group) for path in path.glob("*.yaml")})


CLEAN_SHIFT = "none"  # conf/shift/none.yaml: the images as they are


def corruption_names() -> list[str]:
    """The corruptions `shift=` offers (conf/shift/ less `none`).

    >>> "pixelate" in corruption_names() and "none" not in corruption_names()
    True
    """
    return [name for name in options("shift") if name != CLEAN_SHIFT]


def group_file(group: str, name: str) -> Path:
    """The yaml file of option `name` of `group` (conf/ first, then ./presets/)."""
    for folder in _group_dirs(group):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise one_of(group, name, options(group))


def _group_dirs(group: str) -> list[Path]:
    return [conf_dir() / group, PRESETS_DIR / group]


def plain_dict(node: Any) -> dict[str, Any]:
    """A config mapping as a plain dict, interpolations resolved (for the user's own config only:
    a file's contents are never resolved)."""
    from omegaconf import OmegaConf

    container = OmegaConf.to_container(node, resolve=True)
    if not isinstance(container, dict):
        raise UserError(f"expected a mapping, got {container!r}")
    return {str(key): value for key, value in container.items()}


def instantiate(config: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, logging what it builds; a UserError raised inside stays one."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    log.debug("Instantiating <%s>", config.get("_target_"))
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def instantiate_named(group: str, entry: Any, kind: str, **kwargs: Any) -> Any:
    """Builds `entry`: an option name in `conf/<group>/`, or a mapping with a `_target_`."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(entry, (dict, DictConfig)):
        if "_target_" not in entry:
            raise UserError(f"{kind} {OmegaConf.to_container(DictConfig(entry))} has no _target_")
        return instantiate(entry, **kwargs)
    name = str(entry)
    valid = options(group)
    if name not in valid:
        raise one_of(kind, name, valid)
    return instantiate(OmegaConf.load(group_file(group, name)), **kwargs)


# Overrides shared by every run of a sweep, or only about where things go: not part of a label.
_UNLABELLED_OVERRIDES = (
    "hydra",
    "tracking",
    "runs_dir",
    "experiment=",
    "engine.progress",
    "engine.store",
)


def run_label(overrides: list[str]) -> str:
    """A short name for a run from its command-line overrides.

    >>> run_label(["+comparison=tta_d4_vote", "+experiment=compare_all", "tracking.uri=x"])
    'tta_d4_vote'
    >>> run_label(["strategy=tta", "tta=flips", "hydra.run.dir=/tmp/x"])
    'strategy=tta tta=flips'
    """
    stripped = [str(o).lstrip("+") for o in overrides]
    shown = [
        o.removeprefix("comparison=") for o in stripped if not o.startswith(_UNLABELLED_OVERRIDES)
    ]
    return " ".join(shown)


_PLAIN_VALUE = re.compile(r"^[A-Za-z0-9_./:@+-]+$")


def quote_override_value(value: str) -> str:
    """A Hydra override value: plain when safe, else single-quoted with escapes.

    >>> quote_override_value("runs/fold_0/best.pt"), quote_override_value("my runs/a,b.pt")
    ('runs/fold_0/best.pt', "'my runs/a,b.pt'")
    """
    if _PLAIN_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def process_rank() -> int:
    """This process's rank under torchrun / accelerate launch (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def register_sweeper() -> None:
    """Makes ml_infer's sweeper, which conf/config.yaml selects for every sweep, known to Hydra:
    its config node and its class (Hydra finds plugins only in installed `hydra_plugins`
    folders, and an editable install is not one). Called before composing conf/."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.ml_infer_sweeper import MLInferSweeper

    Plugins.instance().register(MLInferSweeper)

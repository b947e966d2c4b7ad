"""What can be judged about a command line before a run starts, each as a one-line UserError.

Option names are checked against the yaml files of `conf/` without importing Hydra or torch (so
`strategy=nope` answers at once); then Hydra's own parser and config composition find overrides
that do not parse, a comma in a single run, unknown or misspelt keys, and an output directory
that cannot be written.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ml_infer.config import conf_dir, options, register_sweeper
from ml_infer.errors import UserError, brief, one_of

# Keys whose value names a yaml file in a conf/ folder rather than a config group option.
NAMED_VALUE_KEYS = {
    "tta.aggregation": ("tta_aggregation", "TTA aggregation"),
    "ensemble.aggregation": ("ensemble_aggregation", "ensemble aggregation"),
    "tta.augmentations": ("augmentation", "augmentation"),
}


def check_overrides(overrides: list[str]) -> None:
    """Fails fast, before Hydra or torch start, on an unknown option name in command-line overrides.

    Checks `group=option` (and sweeps `group=a,b`) against the yaml files of `conf/<group>/`, and
    the names given to `tta.aggregation`, `ensemble.aggregation` and `tta.augmentations`. Anything
    it does not understand (interpolations, sweep functions) is left for Hydra to judge.
    """
    for override in overrides:
        key, sep, value = override.partition("=")
        key = key.lstrip("+~")
        if not sep or any(c in value for c in "(${") or key.startswith("hydra"):
            continue  # sweep functions, interpolations, inline mappings: Hydra's to judge
        names = [name.strip().strip("'\"") for name in value.strip("[]").split(",")]
        names = [name for name in names if name]
        if key in NAMED_VALUE_KEYS:
            group, kind = NAMED_VALUE_KEYS[key]
            if value == "null":  # tta.augmentations=null: no augmentation
                continue
        elif (conf_dir() / key).is_dir() and "/" not in key and "." not in key:
            group, kind = key, key
            if value in ("null", ""):
                continue
        else:
            continue
        valid = options(group)
        for name in names:
            if name not in valid:
                raise one_of(kind, name, valid)


# Hydra's options that only show something (help, the config, plugin info) and run no job.
_SHOW_ONLY = frozenset(
    {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info"}
    | {"-sc", "--shell-completion", "--resolve", "-p", "--package"}
)


@dataclasses.dataclass(frozen=True)
class CommandLine:
    """What a checked command line will run: a single run or a sweep, and where it writes (the
    run directory, or the sweep directory; None where only Hydra's job can resolve it)."""

    multirun: bool
    output_dir: Path | None


def check_command_line(argv: Sequence[str], config_name: str = "config") -> CommandLine | None:
    """Everything about a command line that can be judged before a run starts, each as a
    one-line UserError: unknown option names (without importing Hydra), then with Hydra's
    parser and config composition: overrides that do not parse, a comma in a single run,
    unknown or misspelt keys (with the closest valid key), and an output directory that cannot
    be written. Returns None for Hydra's options that show something and run no job (--help,
    --cfg, ...), and for its config-path options (-cp, -cn, -cd), whose configs these checks
    do not see.
    """
    flags = [arg.split("=", 1)[0] for arg in argv if arg.startswith("-")]
    if set(flags) & _SHOW_ONLY:
        return None
    if set(flags) - {"-m", "--multirun"}:
        if {"-m", "--multirun"} & set(flags):
            raise UserError(
                f"a sweep (-m) with Hydra's option {sorted(set(flags) - {'-m', '--multirun'})[0]} "
                "is not supported: ml_infer must know the sweep's directory before it starts; "
                "put your config files in conf/ instead"
            )
        return None
    overrides = [arg for arg in argv if not arg.startswith("-")]
    check_overrides(overrides)
    if "+experiment=compare_tuned" in overrides and "tuned" not in options("strategy"):
        raise UserError(
            "+experiment=compare_tuned compares the presets `python -m ml_infer.tune` writes, "
            "and ./presets/strategy/tuned.yaml is missing here; run the tuning first, in this "
            "folder"
        )
    parsed = _parse(overrides)
    unexpanded: set[str] = set()  # groups swept by glob(): only Hydra's loader can list them

    def first_value(override: Any) -> str | None:
        if not override.is_sweep_override():
            return str(override.input_line)
        try:
            value = next(iter(override.sweep_string_iterator()))
        except Exception:  # noqa: BLE001 - glob() sweeps need Hydra's loader: Hydra judges them
            unexpanded.add(str(override.key_or_group))
            return None
        prefix = override.input_line.split("=", 1)[0]
        return f"{prefix}={value}"

    def is_group(override: Any) -> bool:
        key = override.key_or_group
        return "/" in key or (conf_dir() / key).is_dir()

    def composed(selected: list[Any]) -> Any:
        values = [(override, first_value(override)) for override in selected]
        lines = [  # keys under a group swept by glob() cannot be composed here
            line
            for override, line in values
            if line is not None and override.key_or_group.split(".")[0] not in unexpanded
        ]
        return _compose(config_name, lines)

    try:
        cfg = composed(parsed)
    except UserError:
        # Hydra's message for a misspelt key names no valid one: find the key and say which
        groups_only = composed([o for o in parsed if is_group(o)])
        for override in parsed:
            if is_group(override) or override.is_add() or override.is_delete():
                continue
            line = str(override.input_line)
            if line.startswith("++") or override.key_or_group.split(".")[0] in unexpanded:
                continue
            _check_key(groups_only, override.key_or_group, line)
        raise
    multirun = bool(flags) or str(cfg.hydra.mode).endswith("MULTIRUN")
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise UserError(
            f"{sweeps[0].input_line!r} is a sweep (several values); to sweep, add -m; "
            f"for one value that holds commas, quote it: {sweeps[0].key_or_group}='...'"
        )
    if multirun:  # Hydra resolves the sweep directory without the swept overrides
        cfg = composed([o for o in parsed if not o.is_sweep_override()])
    directory = _select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir")
    if directory is not None:
        check_writable(directory, "output directory")
    return CommandLine(multirun, directory)


def _parse(overrides: list[str]) -> list[Any]:
    """Hydra's parse of each override; one that does not parse is a UserError naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed: list[Any] = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as error:
            lines = str(error).strip().splitlines()
            reasons = [x for x in lines if not x.startswith(("See ", "Error parsing override"))]
            reason = reasons[0] if reasons else lines[0]
            raise UserError(f"cannot parse the override {line!r}: {brief(reason)}") from None
    return parsed


def _compose(config_name: str, overrides: list[str]) -> Any:
    """The config Hydra would compose, with Hydra's own node (`return_hydra_config`)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_sweeper()

    try:
        # job_name as Hydra names the job of `python -m ml_infer`, for ${hydra.job.name}
        with initialize_config_dir(
            config_dir=str(conf_dir()), version_base="1.3", job_name="__main__"
        ):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise UserError(f"the overrides do not compose: {brief(error)}") from None


def _select(cfg: Any, key: str) -> Path | None:
    """A directory setting resolved as Hydra will; None when only Hydra's job can resolve it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        value = OmegaConf.select(cfg, key)
    except OmegaConfBaseException:
        return None
    return Path(str(value)) if value else None


def _check_key(cfg: Any, key: str, override: str) -> None:
    """A UserError naming the closest valid key when `key` is not in the composed `cfg`."""
    import difflib

    from omegaconf import DictConfig

    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, DictConfig):
            return  # inside a list or a plain value: Hydra judges it
        if part in node.keys():  # noqa: SIM118 - `in node` is False for a required (???) value
            node = node._get_node(part)
            continue
        parent = ".".join(parts[:depth])
        if depth == 0 and (conf_dir() / part).is_dir():
            choices = ", ".join(f"{part}={option}" for option in options(part))
            raise UserError(
                f"config key {key!r} (in {override!r}) belongs to the {part} group, and no "
                f"{part} is chosen; choose one first: {choices}"
            )
        siblings = [str(name) for name in node if str(name) != "hydra"]
        if depth == 0:
            siblings += [p.name for p in conf_dir().iterdir() if p.is_dir()]
        close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.6)
        if close:
            suggestion = ".".join([*parts[:depth], close[0]])
            raise UserError(
                f"unknown config key {key!r} (in {override!r}); did you mean {suggestion!r}?"
            )
        where = f"under {parent}" if parent else "at the top level"
        raise UserError(
            f"unknown config key {key!r} (in {override!r}); valid keys {where}: "
            f"{', '.join(sorted(set(siblings)))}"
        )


def check_writable(directory: Path, what: str) -> None:
    """A UserError naming `directory` unless files can be written there: the nearest existing
    folder on its path takes a 64 KiB probe file (deleted at once), so a read-only or full disk
    is reported before a run starts rather than as a traceback halfway through it."""
    import tempfile

    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write the {what} {directory}: {existing} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ml_infer_probe_") as probe:
            probe.write(bytes(1 << 16))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError(f"cannot write the {what} {directory} ({reason})") from None

"""`ml-inference`: the seed project's command-line flags, mapped onto the Hydra config.

    ml-inference --checkpoint_path runs/digits/fold_0/weights/best.pt --tta
    ml-inference --ensemble runs/digits/fold_0/weights/best.pt runs/digits/fold_1/weights/best.pt
    ml-inference --predict photos/ --checkpoint_path best.pt tracking=none

The flags become Hydra overrides (printed as the equivalent `python -m ml_infer ...` command)
and run through the same entry point, so there is no second code path. Parsing imports neither
torch nor Hydra: `--help` and flag errors answer at once.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ml_infer.config import options, quote_override_value

SPLITS = ("train", "val", "test")
# The seed calls hard voting over views "voting"; ml_infer's TTA aggregation is named "vote".
TTA_AGGREGATION_ALIASES = {"voting": "vote"}
_OVERRIDE = re.compile(r"^[+~]{0,2}[A-Za-z_][A-Za-z0-9_.@/-]*=")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ml-inference",
        description="Evaluate an inference strategy with the seed project's flags "
        "(each maps onto a `python -m ml_infer` override, printed before the run).",
        epilog="Trailing Hydra overrides pass through unchanged, e.g. tracking=none "
        "engine.forward_batch_size=128. See README.md for the config groups.",
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument(
        "--checkpoint_path",
        "--checkpoint-path",
        metavar="PATH",
        help="one checkpoint (.pt, the seed's best.pt, or .safetensors)",
    )
    weights.add_argument(
        "--ensemble",
        nargs="+",
        metavar="PATH",
        help="several checkpoints to ensemble (paths or glob patterns)",
    )
    parser.add_argument(
        "--strategy",
        choices=options("strategy"),
        help="a strategy preset (default: inferred from --tta / --ensemble)",
    )
    parser.add_argument(
        "--tta",
        action="store_true",
        help="test-time augmentation (the seed's seven augmentations unless "
        "--tta-augmentations says otherwise)",
    )
    parser.add_argument(
        "--tta-augmentations",
        nargs="+",
        metavar="NAME",
        choices=options("augmentation"),
        help=f"augmentations to add to the identity view: {', '.join(options('augmentation'))}",
    )
    parser.add_argument(
        "--tta-aggregation",
        choices=[*options("tta_aggregation"), *TTA_AGGREGATION_ALIASES],
        help="how views merge (voting = vote)",
    )
    parser.add_argument(
        "--ensemble-aggregation",
        choices=options("ensemble_aggregation"),
        help="how models merge (default: soft_voting; weighted with --ensemble-weights)",
    )
    parser.add_argument(
        "--ensemble-weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per checkpoint (normalised to sum to 1)",
    )
    parser.add_argument(
        "--use-ema", "--use_ema", action="store_true", help="use the checkpoints' EMA weights"
    )
    parser.add_argument(
        "--data_dir",
        "--data-dir",
        metavar="DIR",
        help="labelled images in ImageFolder layout (DIR/[split/]<class>/<image>)",
    )
    parser.add_argument("--split", choices=SPLITS, help="which split of the data (default: test)")
    parser.add_argument(
        "--predict",
        metavar="DIR",
        help="predict the images of DIR (no labels needed) instead of scoring",
    )
    parser.add_argument(
        "--calibration",
        choices=options("calibration"),
        help="post-hoc calibration fitted on the data's val split (default: none)",
    )
    parser.add_argument(
        "--conformal",
        choices=options("conformal"),
        help="conformal prediction sets calibrated on the val split (default: none)",
    )
    parser.add_argument(
        "--alpha",
        type=_level,
        metavar="A",
        help="miscoverage of the conformal sets (default 0.1: sets hold the class 90%% of images)",
    )
    parser.add_argument(
        "--shift",
        choices=[name for name in options("shift") if name != "none"],
        metavar="NAME",
        help=f"score the images corrupted: {', '.join(n for n in options('shift') if n != 'none')}",
    )
    parser.add_argument(
        "--severity",
        type=int,
        choices=range(0, 6),
        metavar="N",
        help="severity of --shift, 1 (mild) to 5 (severe); 0 is the clean image (default 3)",
    )
    parser.add_argument(
        "--batch-size", "--batch_size", type=_positive_int, metavar="N", help="images per batch"
    )
    parser.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "-m",
        "--multirun",
        action="store_true",
        help="run a Hydra sweep over comma-separated override values",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. tracking=none"
    )
    return parser


def implied_strategy(args: argparse.Namespace) -> str | None:
    """The strategy that --tta, --tta-augmentations and --ensemble ask for, if any."""
    wants_tta = args.tta or bool(args.tta_augmentations)
    if args.ensemble:
        return "tta_ensemble" if wants_tta else "ensemble"
    return "tta" if wants_tta else None


def strategy_conflict(args: argparse.Namespace) -> str | None:
    """Why --strategy contradicts the other flags, or None when it does not."""
    implied = implied_strategy(args)
    if args.strategy and implied and args.strategy != implied:
        return (
            f"argument --strategy: {args.strategy!r} contradicts --tta/--tta-augmentations/"
            f"--ensemble, which mean {implied!r}; give one or the other"
        )
    return None


def to_overrides(args: argparse.Namespace) -> list[str]:
    """The Hydra overrides that mean what the flags say."""
    strategy = args.strategy or implied_strategy(args)
    overrides = [f"strategy={strategy}"] if strategy else []
    if args.checkpoint_path:
        overrides.append(f"ensemble.checkpoints={_list([args.checkpoint_path])}")
    if args.ensemble:
        overrides.append(f"ensemble.checkpoints={_list(args.ensemble)}")
    if args.tta_augmentations:
        overrides.append(f"tta.augmentations={_list(args.tta_augmentations)}")
    if args.tta_aggregation:
        name = TTA_AGGREGATION_ALIASES.get(args.tta_aggregation, args.tta_aggregation)
        overrides.append(f"tta.aggregation={name}")
    if args.ensemble_weights:
        overrides.append(f"ensemble.weights=[{','.join(f'{w:g}' for w in args.ensemble_weights)}]")
        if not args.ensemble_aggregation:
            overrides.append("ensemble.aggregation=weighted")
    if args.ensemble_aggregation:
        overrides.append(f"ensemble.aggregation={args.ensemble_aggregation}")
    if args.use_ema:
        overrides.append("use_ema=true")
    if args.data_dir:
        overrides += ["data=imagefolder", f"data.root={quote_override_value(args.data_dir)}"]
    if args.split:
        overrides.append(f"data.split={args.split}")
    if args.predict:
        overrides += ["mode=predict", f"predict.root={quote_override_value(args.predict)}"]
    if args.calibration:
        overrides.append(f"calibration={args.calibration}")
    if args.conformal:
        overrides.append(f"conformal={args.conformal}")
    if args.alpha is not None:
        overrides.append(f"conformal.alpha={args.alpha:g}")
    if args.shift:
        overrides.append(f"shift={args.shift}")
    if args.severity is not None:
        overrides.append(f"shift.severity={args.severity}")
    if args.batch_size:
        overrides.append(f"data.batch_size={args.batch_size}")
    if args.device:
        overrides.append(f"device={quote_override_value(args.device)}")
    return overrides + list(args.overrides)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates Hydra overrides (`key=value`) from flags, wherever they stand: a trailing
    override after `--ensemble a.pt b.pt` is not a checkpoint. The value of a one-value flag,
    and a token naming an existing file, stay with the flags.

    >>> split_overrides(["--ensemble", "a.pt", "b.pt", "tracking=none"])
    (['--ensemble', 'a.pt', 'b.pt'], ['tracking=none'])
    >>> split_overrides(["--checkpoint_path", "runs/lr=0.1/best.pt", "seed=1"])
    (['--checkpoint_path', 'runs/lr=0.1/best.pt'], ['seed=1'])
    """
    one_value_flags = {
        option
        for action in build_parser()._actions
        if action.nargs is None and action.option_strings
        for option in action.option_strings
    }
    flags: list[str] = []
    overrides: list[str] = []
    for index, token in enumerate(argv):
        follows_flag = index > 0 and argv[index - 1] in one_value_flags
        is_override = _OVERRIDE.match(token) and not follows_flag and not Path(token).exists()
        (overrides if is_override else flags).append(token)
    return flags, overrides


def main(argv: Sequence[str] | None = None) -> None:
    flags, hydra_overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(flags)
    conflict = strategy_conflict(args)
    if conflict:
        parser.error(conflict)
    args.overrides = [*hydra_overrides, *args.overrides]
    overrides = to_overrides(args)
    flags = ["-m"] if args.multirun else []
    print("equivalent: python -m ml_infer " + shlex.join([*flags, *overrides]), flush=True)
    # Imported here: `ml-inference --help` and flag errors answer without Hydra (tested).
    from ml_infer.__main__ import main as run_hydra

    sys.argv = ["ml-inference", *flags, *overrides]
    run_hydra()


def _list(values: Sequence[str]) -> str:
    return "[" + ",".join(quote_override_value(v) for v in values) + "]"


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def command() -> None:
    """The `ml-inference` console script: `main` as a shell command."""
    from ml_infer.errors import run_as_command

    run_as_command(main)


if __name__ == "__main__":
    command()

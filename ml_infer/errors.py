"""The one exception type that means "the user asked for something we cannot do".

Entry points print its message as a single line and exit non-zero; anything else is a bug
and keeps its traceback.
"""

import os
import sys
from typing import NoReturn


class UserError(ValueError):
    """Bad input: the message names the bad value and, where there is a list, the valid ones."""


def one_of(kind: str, value: object, valid: list[str] | tuple[str, ...]) -> UserError:
    """The standard "unknown X" error.

    >>> str(one_of("aggregation", "avg", ["max", "mean"]))
    "unknown aggregation 'avg'; valid: max, mean"
    """
    return UserError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


def exit_with(error: UserError) -> NoReturn:
    """One line on stderr and exit code 2; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)

"""ml_infer's Hydra sweeper: Hydra's basic sweeper, less the jobs that would repeat another.

A sweep over `shift=none,gaussian_noise shift.severity=1,2,3` asks, in Hydra's product, for
`shift=none` three times: the clean images have no severity (or corruption seed). This sweeper
runs such a job once, with severity 0, and numbers the jobs that are left without gaps.
`+experiment=shift` selects it (`hydra/sweeper=ml_infer` does for any sweep). It lives in
`hydra_plugins` because Hydra instantiates sweepers only from there; ml_infer's entry point also
registers it, for installs where Hydra's plugin scan does not reach this folder.
"""

# No `from __future__ import annotations`: Hydra's plugin scan executes this module outside
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override

# Settings of the shift block that mean nothing for the clean images.
_CLEAN_IGNORES = ("shift.severity", "shift.seed")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def without_repeats(jobs: list[list[str]]) -> list[list[str]]:
    """The jobs (each a list of overrides) with a clean shift's severity set to 0 and its seed
    dropped, each distinct job once, in their first order.

    >>> without_repeats([["shift=none", "shift.severity=1"], ["shift=none", "++shift.severity=2"],
    ...                  ["shift=blur", "shift.severity=1"]])
    [['shift=none', 'shift.severity=0'], ['shift=blur', 'shift.severity=1']]
    """
    kept: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for job in jobs:
        if any(_key(o) == "shift" and o.split("=", 1)[1] == "none" for o in job):
            job = [o for o in job if _key(o) not in _CLEAN_IGNORES] + ["shift.severity=0"]
        if tuple(job) not in seen:
            seen.add(tuple(job))
            kept.append(job)
    return kept


class MLInferSweeper(BasicSweeper):
    @staticmethod
    def split_arguments(
        overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        batches = BasicSweeper.split_arguments(overrides, None)
        jobs = without_repeats([job for batch in batches for job in batch])
        if max_batch_size is None:
            return [jobs]
        return [jobs[i : i + max_batch_size] for i in range(0, len(jobs), max_batch_size)]


@dataclass
class MLInferSweeperConf:
    _target_: str = "hydra_plugins.ml_infer_sweeper.MLInferSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="ml_infer", node=MLInferSweeperConf, provider="ml_infer"
)

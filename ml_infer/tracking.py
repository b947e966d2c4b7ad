"""Experiment tracking and the end-of-sweep report, as a Hydra callback.

`SweepReport` is registered in `conf/hydra/default.yaml`, so it runs under every launcher: when a
multirun ends it writes the comparison of its runs into the sweep directory and prints it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepReport(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ml_infer.report import markdown_table, write_comparison

        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_comparison(sweep_dir)
        if rows:
            print(
                f"\nComparison of {len(rows)} runs ({sweep_dir / 'comparison.md'}):\n", flush=True
            )
            print(markdown_table(rows), flush=True)

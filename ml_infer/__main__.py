"""`python -m ml_infer [overrides]`: evaluate one strategy (or sweep several with -m).

python -m ml_infer strategy=tta_ensemble
python -m ml_infer -m strategy=standard,tta,ensemble,tta_ensemble
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from ml_infer.config import conf_dir, process_rank, quote_override_value, register_sweeper
from ml_infer.errors import (
    Interrupted,
    UserError,
    brief,
    exit_interrupted,
    exit_with,
    raise_if_interrupted,
    received_interrupt,
    run_as_command,
    stop_on_signals,
)
from ml_infer.outputs import (
    failed_jobs,
    new_sweep_id,
    remove_stale_results,
    start_sweep,
    sweep_job_dir,
    write_job_error,
)
from ml_infer.precheck import check_command_line
from ml_infer.sweeplock import acquire_sweep_lock, release_sweep_lock

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """The task: evaluate, record, track, and print a summary.

    A UserError ends a single run with one line on stderr and exit code 2. In a sweep it fails
    only its own job (written to the job's error.txt); the sweep goes on, reports the runs that
    finished, and exits 2 at the end. Whatever stops a run (bad input, a full disk, SIGINT or
    SIGTERM) leaves no result file in its run directory that could pass for a complete run.
    """
    # Imported here, not at the top: the name checks of main() answer before torch is imported.
    from ml_infer.task import NotLogged, hydra_run_dir, run_evaluation

    run_dir = hydra_run_dir()
    try:
        raise_if_interrupted()  # a signal swallowed between two jobs of a sweep
        metrics = run_evaluation(cfg, run_dir)
    except BaseException as error:
        interrupted = received_interrupt()
        if isinstance(error, NotLogged) and interrupted is None:
            return _failed(error)  # the results are complete and written; only logging failed
        remove_stale_results(run_dir)
        if interrupted is not None:
            raise interrupted from None  # whatever a library made of the signal
        if isinstance(error, UserError):
            return _failed(error)
        if isinstance(error, OSError):  # a full disk or a folder that turned unwritable mid-run
            where = f": {error.filename}" if error.filename else ""
            return _failed(UserError(f"{error.strerror or brief(error)}{where}"))
        raise
    if metrics:
        print(summary(metrics), flush=True)
        print(f"  results in {run_dir}", flush=True)
    return metrics


def _failed(error: UserError) -> dict[str, Any]:
    job_dir = sweep_job_dir()
    if job_dir is None:
        exit_with(error)
    log.error("error: %s", error)
    write_job_error(job_dir, error)
    return {}


def summary(metrics: dict[str, Any]) -> str:
    """A few readable lines of the figures a user compares strategies by."""
    m = metrics
    if m["mode"] == "tune":
        return tune_summary(m)
    speed = (
        f"  {m['images_per_s']:.0f} images/s  batch latency p50 {m['latency_ms_p50']:.1f} ms, "
        f"p95 {m['latency_ms_p95']:.1f} ms  peak memory {m['peak_mem_mb']:.0f} MB"
    )
    if m["mode"] == "predict":
        counts = ", ".join(f"{name} {count}" for name, count in m["predicted_counts"].items())
        return "\n".join(
            [
                f"{m['strategy']} predicted {m['n']} images of {m['split']}{shift_words(m)} "
                f"({m['skipped_files']} files skipped): {m['views']} view(s) x {m['models']} "
                f"model(s), {m['precision']} on {m['device']}",
                f"  predicted: {counts}; mean confidence {m['mean_confidence']:.3f}",
                *posthoc_lines(m),
                speed,
            ]
        )
    return "\n".join(
        [
            f"{m['strategy']} on {m['data']}/{m['split']}{shift_words(m)} ({m['n']} images): "
            f"{m['views']} view(s) x "
            f"{m['models']} model(s) = {m['forward_passes_per_image']:g} forward passes per image, "
            f"{m['precision']} on {m['device']}",
            f"  accuracy {m['accuracy']:.4f} (95% CI {m['accuracy_ci95_low']:.4f}-"
            f"{m['accuracy_ci95_high']:.4f})  macro-F1 {m['macro_f1']:.4f}  NLL {m['nll']:.4f}  "
            f"ECE {m['ece']:.4f}  Brier {m['brier']:.4f}",
            f"  vs standard: accuracy {m['accuracy_delta_vs_standard']:+.4f} (95% CI "
            f"{m['accuracy_delta_ci95_low']:+.4f} to {m['accuracy_delta_ci95_high']:+.4f}), "
            f"McNemar p = {m['mcnemar_p_vs_standard']:.3g}",
            *posthoc_lines(m),
            speed,
        ]
    )


def shift_words(m: dict[str, Any]) -> str:
    """How the summary names a shift: ' under gaussian_noise at severity 3', or nothing."""
    if m.get("shift", "none") == "none" or not m.get("severity"):
        return ""
    applied = "" if m.get("shift_applied") else " (not applied: these images have no colour)"
    return f" under {m['shift']} at severity {m['severity']}{applied}"


def tune_summary(m: dict[str, Any]) -> str:
    """What a tuning chose and how it compares with the best hand preset."""
    hand = m["hand_preset_scores"]
    best = min(hand, key=hand.get)
    lines = [
        f"tuned on {m['calibration_n']} calibration images ({m['calibration_split']}), "
        f"objective {m['objective']} (lower is better; search {m['search_s']:.2f} s)",
        f"  TTA: {', '.join(m['tta_chosen_views'])}: {m['tta_score']:.4f}  "
        f"(best hand preset {best}: {hand[best]:.4f}; identity alone "
        f"{m['view_scores']['identity']:.4f})",
    ]
    if "ensemble_weights" in m:
        weights = ", ".join(f"{w:.2f}" for w in m["ensemble_weights"])
        lines.append(f"  ensemble weights [{weights}]: {m['ensemble_score']:.4f}")
    lines.append("  wrote " + ", ".join(m["presets"]))
    return "\n".join(lines)


def posthoc_lines(m: dict[str, Any]) -> list[str]:
    """Calibration and conformal sets, when the run fitted them."""
    lines = []
    if m.get("calibration_method", "none") != "none":
        fit = ", ".join(f"{k} {v:.3g}" for k, v in list(m["calibration_fit"].items())[:4])
        line = f"  {m['calibration_method']} scaling ({m['calibration_stage']}; {fit}) "
        line += f"fitted on {m['calibration_n']} images ({m['calibration_split']})"
        if "ece_calibrated" in m:
            line += (
                f": NLL {m['nll_calibrated']:.4f}  ECE {m['ece_calibrated']:.4f}  "
                f"Brier {m['brier_calibrated']:.4f}"
            )
        lines.append(line)
    if "conformal_method" in m:
        line = (
            f"  {m['conformal_method'].upper()} sets at alpha {m['conformal_alpha']}: "
            f"mean size {m['mean_set_size']:.2f}"
        )
        if "coverage" in m:
            line += f", coverage {m['coverage']:.3f}"
        lines.append(line)
    return lines


register_sweeper()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def _hydra_entry(cfg: DictConfig) -> None:
    run(cfg)


def side_process_overrides(rank: int) -> list[str]:
    """Under torchrun every rank runs Hydra; only rank 0 may write into outputs/. The others get a
    private scratch run directory, no .hydra/ copy, and warnings-only logging."""
    import atexit
    import shutil
    import tempfile

    scratch = tempfile.mkdtemp(prefix=f"ml_infer_rank{rank}_")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return [
        f"hydra.run.dir={scratch}/run",
        f"hydra.sweep.dir={scratch}/sweep",
        "hydra.output_subdir=null",
        "hydra.job_logging.root.level=WARNING",
    ]


def _close_process_group() -> None:
    """Ends the collective group of a torchrun / accelerate launch job before the process exits,
    as torch asks (NCCL warns of leaked resources otherwise: seen on an H100). Not per run: a
    sweep's later runs in the same processes use the same group."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def main() -> None:
    stop_on_signals()
    try:
        _main()
    except Interrupted as interrupted:
        sweep = {"-m", "--multirun"} & set(sys.argv[1:])
        exit_interrupted(
            interrupted,
            "the sweep stopped; its finished runs keep their results, the interrupted one left none"
            if sweep
            else "the run stopped and left no results",
        )


def _main() -> None:
    try:
        command_line = check_command_line(sys.argv[1:])
    except UserError as error:
        exit_with(error)
    rank = process_rank()
    if rank > 0:
        sys.argv += side_process_overrides(rank)
        sweep_dir = None
    elif command_line is not None and command_line.multirun:
        sweep_dir = command_line.output_dir
        if sweep_dir is None:
            exit_with(
                UserError(
                    "ml_infer must know a sweep's directory before the sweep starts, and "
                    "hydra.sweep.dir uses what only a running job can resolve; give it a path "
                    "(interpolations of the config and ${now:...} are fine)"
                )
            )
    else:
        sweep_dir = None
    if sweep_dir is None:
        _run_hydra()
        return
    # The sweep owns its directory from before its first job to its end (its jobs, on any
    # launcher, share it); the directory is pinned so that Hydra uses the one that was locked.
    sys.argv.append(f"hydra.sweep.dir={quote_override_value(str(sweep_dir))}")
    sweep_id = new_sweep_id()
    try:
        lock = acquire_sweep_lock(sweep_dir, sweep_id)
    except UserError as error:
        exit_with(error)
    try:
        start_sweep(sweep_dir, sweep_id)
        _run_hydra()
    except Interrupted:
        from ml_infer.tracking.sweep import end_interrupted_parent

        end_interrupted_parent(sweep_dir)
        raise
    finally:
        release_sweep_lock(lock)
    if failed_jobs(sweep_dir, sweep_id):
        sys.exit(2)


def _run_hydra() -> None:
    try:
        _hydra_entry()
    finally:
        _close_process_group()
    raise_if_interrupted()  # a signal whose exception Python had to swallow


if __name__ == "__main__":
    run_as_command(main)

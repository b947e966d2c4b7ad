"""The rows compared, per workload: what each runs on a batch, and what it measured.

Our engine (standard, before tuning, mixed precision, tta <preset>, ensemble xM, tta_ensemble),
the engine's model alone (pure forward), the evaluation loop with its loader workers, and beside
them the references of references.py (seed-style TTA, ttach d4, stacked ensembles).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import statistics
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ml_infer.augment import Views
from ml_infer.data import make_loader
from ml_infer.device import resolve_autocast_dtype
from ml_infer.imagesets import TensorImages
from ml_infer.passes import predict_dataset
from ml_infer.predictor import EngineSettings, Predictor

from .references import (
    seed_style_tta,
    seed_style_view_functions,
    stacked_ensemble,
    ttach_d4,
    ttach_installed,
)
from .workloads import (
    BEFORE_TUNING,
    ENSEMBLE_SIZES,
    MEMBERS,
    Workload,
    engine_predictor,
    preset_views,
)

TTA_PRESETS = ("flips", "seed_all", "d4")
# Warming up runs every code path once on a few images; whatever depends on the batch shape warms
# up in the first timed round, which the median of three or more rounds outvotes.
WARMUP_IMAGES = 8


@dataclasses.dataclass
class Row:
    """One measured row: `step(i)` runs the row on batch i of its workload; the step of a
    `whole_pass` row runs every batch (a whole pass), as often as others run one batch."""

    workload: str
    name: str
    group: str
    forwards_per_image: int
    n_images: int
    step: Callable[[int], Any]
    warm_up: Callable[[], Any]
    note: str = ""
    whole_pass: bool = False
    passes_per_round: int = 1  # a whole-pass row runs a pass at every batch of a round
    seconds: list[float] = dataclasses.field(default_factory=list)  # per round
    # Per round: what `standard` took for the same images, from its steps in that round.
    standard_seconds: list[float] = dataclasses.field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.n_images * self.passes_per_round / statistics.median(self.seconds)

    @property
    def efficiency(self) -> float:
        """Median over rounds of standard's time / this row's time, x forwards per image."""
        return statistics.median(
            reference / own * self.forwards_per_image
            for reference, own in zip(self.standard_seconds, self.seconds)
        )

    @property
    def relative_speed(self) -> float:
        """Images/s relative to standard's, measured side by side (efficiency / forwards)."""
        return self.efficiency / self.forwards_per_image


def per_batch(function: Callable[[Tensor], Any], batches: list[Tensor]) -> dict[str, Callable]:
    """`step` and `warm_up` of a row that runs `function` on each batch."""
    return dict(
        step=lambda index: function(batches[index]),
        warm_up=lambda: function(batches[0][:WARMUP_IMAGES]),
    )


def pure_forward(workload: Workload, predictor: Predictor) -> dict[str, Callable]:
    """The engine's model alone on preloaded chunks, normalised and laid out beforehand."""
    model = predictor.models[0]
    chunks_per_batch = [
        list(
            workload.input_spec.normalise(batch)
            .contiguous(memory_format=predictor.memory_format)
            .split(predictor.forward_batch_size)
        )
        for batch in workload.batches
    ]

    @torch.inference_mode()
    def step(index: int) -> None:
        for chunk in chunks_per_batch[index]:
            model(chunk)

    @torch.inference_mode()
    def warm_up() -> None:
        model(chunks_per_batch[0][0][:WARMUP_IMAGES])

    return dict(step=step, warm_up=warm_up)


def evaluation_loop(
    workload: Workload, predictor: Predictor, workers: int, device: torch.device
) -> dict[str, Any]:
    """Whole passes of predict_dataset over a DataLoader from make_loader, as evaluate() runs."""
    classes = [str(label) for label in range(10)]
    dataset = TensorImages(
        workload.images.cpu(), workload.labels, list(range(len(workload.labels))), classes
    )
    loader = make_loader(
        dataset,
        batch_size=workload.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
    )
    run = functools.partial(predict_dataset, predictor, loader, warmup_batches=0, progress=False)
    return dict(step=lambda index: run(), warm_up=run, whole_pass=True)


def build_rows(
    workload: Workload, device: torch.device, settings: EngineSettings, args: argparse.Namespace
) -> list[Row]:
    """Every row of the table for one workload."""
    batches, spec = workload.batches, workload.input_spec
    rows: list[Row] = []

    def add(name: str, group: str, forwards: int, note: str = "", **runs: Any) -> None:
        rows.append(
            Row(workload.name, name, group, forwards, len(workload.images), note=note, **runs)
        )

    def engine(views: Views | None = None, n_models: int = 1, **options: Any) -> Predictor:
        views = Views([]) if views is None else views  # no views: one, the identity
        return engine_predictor(
            workload, views, n_models, device, **{"settings": settings, **options}
        )

    standard = engine()
    layout = "channels_last" if settings.channels_last else "contiguous"
    folded = ", BatchNorm folded" if settings.fold_batch_norm else ""
    note = f"chunks of {standard.forward_batch_size}, {layout}{folded}"
    add("standard", "standard", 1, note, **per_batch(standard, batches))
    before = engine(settings=BEFORE_TUNING)
    note = "chunks of 256, contiguous, BatchNorm kept"
    add("standard, before tuning", "standard", 1, note, **per_batch(before, batches))
    add("pure forward", "loop", 1, "the engine's model only", **pure_forward(workload, standard))
    for workers in args.loader_workers:
        name = "evaluation loop" + (f" ({workers} workers)" if workers else "")
        note = "predict_dataset + DataLoader, whole passes"
        loop = evaluation_loop(workload, standard, workers, device)
        group = "loader workers" if workers else "loop"
        add(name, group, 1, note, passes_per_round=len(batches), **loop)

    mixed = engine(autocast_dtype=resolve_autocast_dtype("autocast", "auto", device))
    note = f"runs {mixed.precision_name}" + (" (fallback)" if mixed.autocast_dtype is None else "")
    add("mixed_precision", "precision", 1, note, **per_batch(mixed, batches))
    if device.type == "cuda":
        for dtype in (torch.float16, torch.bfloat16):
            if dtype == torch.float16 or torch.cuda.is_bf16_supported():
                forced = engine(autocast_dtype=dtype)
                add(
                    f"autocast {forced.precision_name}",
                    "precision",
                    1,
                    **per_batch(forced, batches),
                )

    for preset in TTA_PRESETS:
        views = preset_views(preset)
        add(f"tta {preset}", "tta", len(views), **per_batch(engine(views), batches))
        functions = seed_style_view_functions(views, extra_hv_flip=preset == "seed_all")
        seed = seed_style_tta(workload.models[0], functions, spec)
        add(f"seed-style {preset}", "seed-style", len(functions), **per_batch(seed, batches))
    if ttach_installed():
        add("ttach d4", "ttach", 8, **per_batch(ttach_d4(workload.models[0], spec), batches))

    for members in ENSEMBLE_SIZES:
        ensemble = engine(n_models=members)
        add(f"ensemble x{members}", "ensemble", members, **per_batch(ensemble, batches))
        if args.stacked and members > 1:
            stacked = stacked_ensemble(ensemble)
            add(
                f"ensemble x{members} stacked",
                "ensemble-stacked",
                members,
                "torch.func vmap, contiguous",
                **per_batch(stacked, batches),
            )
    if args.tta_ensemble:
        both = engine(preset_views("seed_all"), MEMBERS)
        forwards = both.forward_passes_per_image
        add("tta_ensemble", "tta_ensemble", forwards, "seed_all x 5", **per_batch(both, batches))
    return rows


def ttach_difference(workload: Workload, device: torch.device, settings: EngineSettings) -> float:
    """Largest |ours - ttach| over the d4 mean-of-softmax probabilities of the first batch.

    Compared in full fp32: CUDA convolutions run in TF32 by default, whose 10-bit mantissa alone
    moves probabilities by ~1e-4 between two layouts of the same model.
    """
    if not ttach_installed():
        return math.nan
    batch = workload.batches[0]
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            ours = engine_predictor(workload, preset_views("d4"), 1, device, settings)(batch)
            theirs = ttach_d4(workload.models[0], workload.input_spec)(batch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return float((ours.probs - theirs.float()).abs().max())

"""What every inference strategy costs, measured side by side in one process.

For the digits CNN (the folds `ml-infer-train` wrote under runs/digits; random weights where there
are none) and resnet18 at 3x64x64 (random weights), every row runs the same preloaded images in
the same batches and reports images/s and

    efficiency = images/s x forward passes per image / images/s of `standard`

so 1.00 means a strategy costs exactly its forward passes and nothing else. Rows:

- `standard`: our engine (ml_infer.predictor.Predictor), one view, one model, fp32, with the
  engine settings of conf/config.yaml (forward chunk size, channels_last, BatchNorm folding).
- `standard, before tuning`: the same with the engine's settings before issue 6 (chunks of 256,
  contiguous memory, BatchNorm kept): the model as loaded, as the seed-style and ttach rows run it.
- `pure forward`: the engine's model alone on preloaded, normalised chunks: no views, no merging.
- `evaluation loop`: whole passes of ml_infer.predictor.predict_dataset over a DataLoader from
  ml_infer.data.make_loader (data loading included), as `python -m ml_infer` runs them;
  `evaluation loop (N workers)`: the same with N loader worker processes.
- `mixed_precision`: autocast as the engine resolves it here: bf16 only where the CPU has native
  support, otherwise a warning and fp32. On CUDA also `autocast fp16` and `autocast bf16`.
- `tta <preset>`: our engine with the views of conf/tta/<preset>.yaml (flips, seed_all, d4).
- `seed-style <preset>`: the same views run the seed's way (a reference loop written here): the
  model as loaded, one forward per view of the whole batch, brightness and contrast built image by
  image in a Python loop, logits averaged. The seed's seed_all runs 11 forwards: its set has an
  extra hv-flip view, which duplicates rotate_180.
- `ttach d4`: ttach's ClassificationTTAWrapper with its d4 set on the model as loaded, merging
  softmax outputs by mean.
- `ensemble xM`: M models looped by our engine; `ensemble xM stacked`: the same M (tuned) models
  as one call over their stacked weights with torch.func (vmap + functional_call).
- `tta_ensemble`: the seed_all views x 5 models.

Timing: every row first runs on a few images (warm-up). Then, `--repeats` times (rounds), every
batch is run by every row in turn, in an order rotated from batch to batch, each step after a
`standard` step on the same batch. Standard's time in a round is the median of those many steps,
and a row's efficiency is the median over rounds of standard's time / its time in the same round
(x forwards per image): a slow spell on a shared machine hardly moves a median of many short
steps, and a round that runs slower or faster as a whole moves both sides of its ratios. A row's
images/s is the median of its rounds; ratios between two rows (ours / ttach, ...) divide their
efficiencies. The targets of issue 6 are checked at the end. The table goes to a CSV and a PNG
bar chart (outputs/bench/ by default).

Usage:
    python scripts/bench.py                  # the full table: about 4 minutes on 2 CPU cores
    python scripts/bench.py --quick          # fewer images and rows: under a minute
    python scripts/bench.py --sweep-only     # images/s of the bare forward per batch size
    python scripts/bench.py --device cuda    # plus fp16/bf16 autocast, batch sizes up to OOM
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml_infer.aggregate import SoftVoting
from ml_infer.augment import Brightness, Contrast, Views
from ml_infer.bank import load_classifier
from ml_infer.config import conf_dir
from ml_infer.data import DigitsDataset, TensorImages, make_loader
from ml_infer.device import cpu_supports_bf16, resolve_autocast_dtype, resolve_device, synchronize
from ml_infer.errors import UserError, exit_with
from ml_infer.evaluate import build_views
from ml_infer.inputs import InputSpec, fit_images
from ml_infer.models import SmallCNN, torchvision_classifier
from ml_infer.predictor import EngineSettings, Predictor
from ml_infer.runners import predict_dataset

log = logging.getLogger("bench")

REPO = Path(__file__).resolve().parent.parent
TTA_PRESETS = ("flips", "seed_all", "d4")
ENSEMBLE_SIZES = (1, 3, 5)
MEMBERS = max(ENSEMBLE_SIZES)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Warming up runs every code path once on a few images; whatever depends on the batch shape warms
# up in the first timed round, which the median of three or more rounds outvotes.
WARMUP_IMAGES = 8

# The targets of issue 6, checked on every run.
TTA_MIN_EFFICIENCY = 0.95
SEED_ALL_MIN_SPEEDUP = 1.15  # ours over the seed-style reference, digits model
ENSEMBLE_MIN_EFFICIENCY = 0.95
LOOP_MIN_FRACTION = 0.90  # evaluation loop over pure forward
FALLBACK_MIN_FRACTION = 0.97  # mixed_precision over fp32, where it falls back to fp32
TTACH_TOLERANCE = 1e-5


# How the engine ran before issue 6: chunks of 256, contiguous memory, BatchNorm kept.
BEFORE_TUNING = EngineSettings(forward_batch_size=256, channels_last=False, fold_batch_norm=False)


@dataclasses.dataclass
class Workload:
    """One model family: its members, their input, and the preloaded images every row runs."""

    name: str
    models: list[nn.Module]
    input_spec: InputSpec
    images: Tensor  # [N, C, H, W] in [0, 1], on the benchmark device
    labels: Tensor
    batch_size: int
    note: str

    @functools.cached_property
    def batches(self) -> list[Tensor]:
        return list(self.images.split(self.batch_size))


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


@dataclasses.dataclass
class Target:
    description: str
    measured: float
    threshold: float
    unit: str = ""
    at_most: bool = False

    @property
    def holds(self) -> bool:
        if not math.isfinite(self.measured):
            return False
        if self.at_most:
            return self.measured <= self.threshold
        return self.measured >= self.threshold


# ---------------------------------------------------------------------------------------------
# Machine


def cpu_flags() -> dict[str, bool]:
    """Which of the bf16-relevant CPU flags /proc/cpuinfo lists (all False where it is absent)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags_line = next((line for line in cpuinfo if line.startswith("flags")), "")
    except OSError:
        flags_line = ""
    present = set(flags_line.partition(":")[2].split())
    return {flag: flag in present for flag in BF16_CPU_FLAGS}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine_summary(device: torch.device) -> list[str]:
    flags = ", ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in cpu_flags().items())
    lines = [
        f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"device {device}",
        f"CPU flags: {flags}; torch.ops.mkldnn._is_mkldnn_bf16_supported()={cpu_supports_bf16()}",
    ]
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        lines.append(
            f"GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, "
            f"bf16={torch.cuda.is_bf16_supported()}"
        )
    return lines


class OtherLoad:
    """How much of the machine's CPU time other processes took while this one ran (Linux).

    On a shared machine this says how far to trust a run: the ratios hold up to moderate load,
    the absolute images/s do not.
    """

    def __init__(self) -> None:
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import os
        import resource

        try:
            with open("/proc/stat") as stat:
                jiffies = [int(value) for value in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = jiffies[3] + jiffies[4]  # idle + iowait
        own = sum(
            usage.ru_utime + usage.ru_stime
            for usage in (
                resource.getrusage(resource.RUSAGE_SELF),
                resource.getrusage(resource.RUSAGE_CHILDREN),
            )
        )
        ticks = os.sysconf("SC_CLK_TCK")
        return sum(jiffies) / ticks, (sum(jiffies) - idle) / ticks, own

    def fraction(self) -> float:
        """Other processes' share of all CPU time since construction (nan where unknown)."""
        end = self._sample()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return math.nan
        total, busy, own = (after - before for after, before in zip(end, self.start))
        return max(0.0, busy - own) / total


# ---------------------------------------------------------------------------------------------
# Workloads


def digits_workload(
    runs_dir: Path, n_images: int, batch_size: int, device: torch.device
) -> Workload:
    """The digits CNN: the trained folds where they exist, random SmallCNNs for the rest."""
    paths = sorted(runs_dir.glob("fold_*/weights/best.pt"))[:MEMBERS]
    classifiers = [load_classifier(path) for path in paths]
    models = [classifier.model for classifier in classifiers]
    if classifiers:
        input_spec = classifiers[0].input_spec
        note = f"{len(paths)} trained fold(s) from {runs_dir}"
    else:
        input_spec = InputSpec(size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))
        note = f"no folds under {runs_dir}: random weights"
    torch.manual_seed(0)
    if classifiers and len(models) < MEMBERS:
        note += f" + {MEMBERS - len(models)} random SmallCNN(s)"
    while len(models) < MEMBERS:
        models.append(SmallCNN(in_channels=1, num_classes=10))
    images, labels = tiled_digits(n_images, image_size=input_spec.size, channels=1)
    return Workload(
        name="digits_cnn",
        models=[model.eval().to(device) for model in models],
        input_spec=input_spec,
        images=images.to(device),
        labels=labels,
        batch_size=batch_size,
        note=f"{note}; {n_images} images of 1x8x8 in batches of {batch_size}",
    )


def resnet_workload(n_images: int, batch_size: int, device: torch.device) -> Workload:
    """torchvision's resnet18 (random weights) on the digits, resized to 3x64x64."""
    torch.manual_seed(0)
    models = [torchvision_classifier("resnet18", in_channels=3, num_classes=10) for _ in range(5)]
    images, labels = tiled_digits(n_images, image_size=(64, 64), channels=3)
    return Workload(
        name="resnet18@64",
        models=[model.eval().to(device) for model in models],
        input_spec=InputSpec(size=(64, 64), channels=3, mean=IMAGENET_MEAN, std=IMAGENET_STD),
        images=images.to(device),
        labels=labels,
        batch_size=batch_size,
        note=f"random weights; {n_images} images of 3x64x64 in batches of {batch_size}",
    )


def tiled_digits(
    n_images: int, *, image_size: Sequence[int], channels: int
) -> tuple[Tensor, Tensor]:
    """`n_images` real digits (the test split, repeated as often as needed), fitted to a model."""
    digits = DigitsDataset(split="test")
    images, labels, _ = next(iter(make_loader(digits, batch_size=len(digits))))
    repeats = math.ceil(n_images / len(digits))
    images, labels = images.repeat(repeats, 1, 1, 1)[:n_images], labels.repeat(repeats)[:n_images]
    return fit_images(images, image_size=image_size, channels=channels), labels


# ---------------------------------------------------------------------------------------------
# What the rows run


def per_batch(function: Callable[[Tensor], Any], batches: list[Tensor]) -> dict[str, Callable]:
    """`step` and `warm_up` of a row that runs `function` on each batch."""
    return dict(
        step=lambda index: function(batches[index]),
        warm_up=lambda: function(batches[0][:WARMUP_IMAGES]),
    )


def engine_predictor(
    workload: Workload,
    views: Views,
    n_models: int,
    device: torch.device,
    settings: EngineSettings,
    autocast_dtype: torch.dtype | None = None,
) -> Predictor:
    """Our engine on copies of the first `n_models` models (a Predictor converts what it gets)."""
    return Predictor(
        [copy.deepcopy(model) for model in workload.models[:n_models]],
        views,
        SoftVoting(),
        SoftVoting(),
        workload.input_spec,
        device=device,
        autocast_dtype=autocast_dtype,
        engine=settings,
    )


def preset_views(preset: str) -> Views:
    """The views of conf/tta/<preset>.yaml."""
    from omegaconf import OmegaConf

    return build_views(list(OmegaConf.load(conf_dir() / "tta" / f"{preset}.yaml").augmentations))


def seed_style_view_functions(views: Views, extra_hv_flip: bool) -> list[Callable]:
    """The seed's way of building `views`, one function per view: geometric views as tensor ops,
    brightness and contrast image by image with torchvision's functions."""
    import torchvision.transforms.functional as TF

    functions: list[Callable[[Tensor], Tensor]] = []
    for augmentation in views.augmentations:
        if isinstance(augmentation, (Brightness, Contrast)):
            adjust = (
                TF.adjust_brightness if isinstance(augmentation, Brightness) else TF.adjust_contrast
            )
            functions += [
                functools.partial(image_by_image, adjust, factor) for factor in augmentation.factors
            ]
        else:
            functions.append(augmentation.apply)
    if extra_hv_flip:
        functions.append(lambda images: images.flip(-1).flip(-2))
    return functions


def image_by_image(adjust: Callable, factor: float, images: Tensor) -> Tensor:
    return torch.stack([adjust(image, factor) for image in images])


def seed_style_tta(
    model: nn.Module, view_functions: list[Callable], input_spec: InputSpec
) -> Callable[[Tensor], Tensor]:
    """The seed's TTA: one forward per view of the whole batch, logits averaged, then softmax."""

    @torch.inference_mode()
    def predict(images: Tensor) -> Tensor:
        logits_sum = sum(model(input_spec.normalise(view(images))) for view in view_functions)
        return (logits_sum / len(view_functions)).softmax(dim=-1)

    return predict


def ttach_d4(model: nn.Module, input_spec: InputSpec) -> Callable[[Tensor], Tensor]:
    """ttach's d4 TTA merging softmax outputs by mean. The d4 views commute with per-channel
    normalisation, so the batch is normalised once, as a ttach user would feed it."""
    import ttach

    wrapper = ttach.ClassificationTTAWrapper(
        nn.Sequential(model, nn.Softmax(dim=-1)), ttach.aliases.d4_transform(), merge_mode="mean"
    )

    @torch.inference_mode()
    def predict(images: Tensor) -> Tensor:
        return wrapper(input_spec.normalise(images))

    return predict


def stacked_ensemble(predictor: Predictor) -> Callable[[Tensor], Tensor]:
    """The predictor's models as one vmapped call over their stacked weights (torch.func), merged
    by the mean of softmax like the engine's soft voting, in the same chunks. Contiguous memory:
    vmap has no batching rule for channels_last pooling and would fall back to a slow loop."""
    from torch.func import functional_call, vmap

    def stacked(named: Callable[[nn.Module], Any]) -> dict[str, Tensor]:
        per_model = [dict(named(model)) for model in predictor.models]
        return {
            name: torch.stack([state[name].contiguous() for state in per_model])
            for name in per_model[0]
        }

    parameters = stacked(lambda model: model.named_parameters())
    buffers = stacked(lambda model: model.named_buffers())
    template = copy.deepcopy(predictor.models[0])
    for module in template.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False  # vmap has no batching rule for in-place ops: a slow fallback

    def one_model(params: dict, buffs: dict, chunk: Tensor) -> Tensor:
        return functional_call(template, (params, buffs), (chunk,))

    every_model = vmap(one_model, in_dims=(0, 0, None))
    spec, chunk_size = predictor.input_spec, predictor.forward_batch_size

    @torch.inference_mode()
    def predict(images: Tensor) -> Tensor:
        chunks = spec.normalise(images).split(chunk_size)
        logits = torch.cat([every_model(parameters, buffers, chunk) for chunk in chunks], dim=1)
        return logits.softmax(dim=-1).mean(dim=0)

    return predict


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

    def engine(views: Views = Views([]), n_models: int = 1, **options: Any) -> Predictor:
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


def ttach_installed() -> bool:
    try:
        import ttach  # noqa: F401
    except ImportError:
        log.warning("ttach is not installed (pip install ttach==0.0.3): its rows are skipped")
        return False
    return True


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


# ---------------------------------------------------------------------------------------------
# Measuring


def measure(
    rows: list[Row],
    standard: Row,
    batch_sizes: Sequence[int],
    repeats: int,
    device: torch.device,
    *,
    record_standard: bool = True,
) -> None:
    """Warms every row up, then times `repeats` rounds. Within a round every batch is run by every
    row in turn, in an order rotated from batch to batch, with a `standard` step on the same
    batch before each. Standard's time in a round is the median of those steps per image, times
    the images: many samples spread over the round, so a slow spell on a shared machine shifts
    it little (and a short last batch counts for its size), and a machine
    that is slower or faster in one round than in another moves both sides of that round's
    ratios. `standard`'s own figures come from those steps (`record_standard`)."""

    def timed(step: Callable[[int], Any], index: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        step(index)
        synchronize(device)
        return time.perf_counter() - start

    for row in [standard, *rows]:
        row.warm_up()
    n_batches = len(batch_sizes)
    for round_index in range(repeats):
        standard_seconds_per_image: list[float] = []  # per image: batches may differ in size
        for row in rows:
            row.seconds.append(0.0)
        for batch_index in range(n_batches):
            shift = (round_index + batch_index) % len(rows)
            for row in rows[shift:] + rows[:shift]:
                seconds = timed(standard.step, batch_index)
                standard_seconds_per_image.append(seconds / batch_sizes[batch_index])
                row.seconds[-1] += timed(row.step, batch_index)
        standard_round = statistics.median(standard_seconds_per_image) * sum(batch_sizes)
        for row in rows:
            row.standard_seconds.append(standard_round * row.passes_per_round)
        if record_standard:
            standard.seconds.append(standard_round)
            standard.standard_seconds.append(standard_round)
        log.info("%s: round %d/%d done", standard.workload, round_index + 1, repeats)


def sweep_forward_batch_sizes(
    workload: Workload,
    sizes: Sequence[int],
    repeats: int,
    device: torch.device,
    settings: EngineSettings,
) -> dict[int, float]:
    """Images/s of the engine's model alone per forward batch size (interleaved, median round).

    On CUDA the sizes go on doubling from 32 until the GPU runs out of memory.
    """
    predictor = engine_predictor(workload, Views([]), 1, device, settings)
    model, memory_format = predictor.models[0], predictor.memory_format
    shape = workload.images.shape[1:]
    if device.type == "cuda":
        sizes = [2**power for power in range(5, 17)]
    inputs: dict[int, Tensor] = {}
    with torch.inference_mode():
        for size in sizes:
            try:
                inputs[size] = torch.rand(size, *shape, device=device).contiguous(
                    memory_format=memory_format
                )
                model(inputs[size])
                synchronize(device)
            except torch.cuda.OutOfMemoryError:
                inputs.pop(size, None)
                torch.cuda.empty_cache()
                log.info("a batch of %d does not fit in GPU memory: the sweep stops there", size)
                break
        # Every size runs the same number of images: the workload's, or one batch of the largest.
        n_images = max(max(inputs), len(workload.images))
        rates: dict[int, list[float]] = {size: [] for size in inputs}
        usable = list(inputs)
        for round_index in range(repeats):
            shift = round_index % len(usable)
            for size in usable[shift:] + usable[:shift]:
                forwards = math.ceil(n_images / size)
                synchronize(device)
                start = time.perf_counter()
                for _ in range(forwards):
                    model(inputs[size])
                synchronize(device)
                rates[size].append(forwards * size / (time.perf_counter() - start))
    return {size: statistics.median(values) for size, values in rates.items()}


# ---------------------------------------------------------------------------------------------
# Reporting


def check_targets(rows: list[Row], ttach_differences: dict[str, float]) -> list[Target]:
    """The targets of issue 6, from this run's rows (a missing row reads as not holding)."""
    by_name = {(row.workload, row.name): row for row in rows}
    efficiency = {key: row.efficiency for key, row in by_name.items()}
    targets: list[Target] = []

    def ratio(workload: str, name: str, reference: str) -> float:
        """Images/s of `name` over those of `reference`, each measured beside `standard`."""
        if (workload, name) not in by_name or (workload, reference) not in by_name:
            return math.nan
        return by_name[workload, name].relative_speed / by_name[workload, reference].relative_speed

    for workload in dict.fromkeys(row.workload for row in rows):
        for preset in TTA_PRESETS:
            measured = efficiency.get((workload, f"tta {preset}"), math.nan)
            targets.append(
                Target(f"{workload}: tta {preset} efficiency", measured, TTA_MIN_EFFICIENCY)
            )
        if workload == "digits_cnn":
            measured = ratio(workload, "tta seed_all", "seed-style seed_all")
            description = f"{workload}: tta seed_all / seed-style seed_all"
            targets.append(Target(description, measured, SEED_ALL_MIN_SPEEDUP, "x"))
        measured = ratio(workload, "tta d4", "ttach d4")
        targets.append(Target(f"{workload}: tta d4 / ttach d4", measured, 1.0, "x"))
        difference = ttach_differences.get(workload, math.nan)
        description = f"{workload}: max abs(tta d4 - ttach d4) probability"
        targets.append(Target(description, difference, TTACH_TOLERANCE, at_most=True))
        for members in ENSEMBLE_SIZES[1:]:
            measured = efficiency.get((workload, f"ensemble x{members}"), math.nan)
            description = f"{workload}: ensemble x{members} efficiency"
            targets.append(Target(description, measured, ENSEMBLE_MIN_EFFICIENCY))
        measured = ratio(workload, "evaluation loop", "pure forward")
        description = f"{workload}: evaluation loop / pure forward"
        targets.append(Target(description, measured, LOOP_MIN_FRACTION, "x"))
        if "fallback" in getattr(by_name.get((workload, "mixed_precision")), "note", ""):
            measured = ratio(workload, "mixed_precision", "standard")
            description = f"{workload}: mixed_precision (fp32 fallback) / fp32"
            targets.append(Target(description, measured, FALLBACK_MIN_FRACTION, "x"))
    return targets


def markdown(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    return "\n".join(
        "| " + " | ".join(cells) + " |" for cells in [header, ["---"] * len(header), *lines]
    )


def format_table(rows: list[Row]) -> str:
    return markdown(
        ("model", "row", "fwd/img", "images/s", "efficiency", "note"),
        [
            (
                row.workload,
                row.name,
                str(row.forwards_per_image),
                f"{row.images_per_s:,.0f}",
                f"{row.efficiency:.2f}",
                row.note,
            )
            for row in rows
        ],
    )


def format_targets(targets: list[Target]) -> str:
    lines = []
    for target in targets:
        if target.at_most:
            measured, threshold = f"{target.measured:.1e}", f"<= {target.threshold:.0e}"
        else:
            measured = f"{target.measured:.2f}{target.unit}"
            threshold = f">= {target.threshold:.2f}{target.unit}"
        lines.append((target.description, measured, threshold, "yes" if target.holds else "NO"))
    return markdown(("target", "measured", "threshold", "holds"), lines)


def format_sweep(sweeps: dict[str, dict[int, float]]) -> str:
    sizes = sorted({size for sweep in sweeps.values() for size in sweep})
    lines = []
    for name, sweep in sweeps.items():
        best = max(sweep.values())
        cells = [
            f"{sweep[size]:,.0f} ({sweep[size] / best:.2f})" if size in sweep else "-"
            for size in sizes
        ]
        lines.append((name, *cells, str(max(sweep, key=sweep.__getitem__))))
    table = markdown(("model", *(str(size) for size in sizes), "best"), lines)
    return "images/s of the engine's model alone (fraction of the best) per batch size:\n" + table


def write_csv(rows: list[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "model",
                "row",
                "group",
                "forward_passes_per_image",
                "images",
                "images_per_s",
                "efficiency",
                "note",
                "seconds_per_round",
                "standard_seconds_per_round",
            ]
        )
        for row in rows:
            writer.writerow(
                [
                    row.workload,
                    row.name,
                    row.group,
                    row.forwards_per_image,
                    row.n_images,
                    f"{row.images_per_s:.2f}",
                    f"{row.efficiency:.4f}",
                    row.note,
                    " ".join(f"{seconds:.4f}" for seconds in row.seconds),
                    " ".join(f"{seconds:.4f}" for seconds in row.standard_seconds),
                ]
            )


def plot(rows: list[Row], path: Path) -> None:
    """Efficiency of every row, one panel per model, with the 0.95 target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(row.workload for row in rows))
    groups = list(dict.fromkeys(row.group for row in rows))
    colours = {group: plt.cm.tab10(index % 10) for index, group in enumerate(groups)}
    tallest = max(sum(row.workload == workload for row in rows) for workload in workloads)
    figure, axes = plt.subplots(
        1, len(workloads), figsize=(6.5 * len(workloads), 0.3 * tallest + 1.5), squeeze=False
    )
    for axis, workload in zip(axes[0], workloads):
        mine = [row for row in rows if row.workload == workload][::-1]
        values = [row.efficiency for row in mine]
        axis.barh([row.name for row in mine], values, color=[colours[row.group] for row in mine])
        for position, value in enumerate(values):
            axis.text(value, position, f" {value:.2f}", va="center", fontsize=8)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.axvline(TTA_MIN_EFFICIENCY, color="red", linestyle="--", linewidth=0.8)
        axis.set_xlim(0, max(1.2, max(values) * 1.15))
        axis.set_xlabel("efficiency: images/s x forwards per image / standard images/s")
        axis.set_title(workload)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------
# Command line

# Defaults of a full run and of --quick; an option given explicitly wins over both.
FULL_RUN = dict(
    digits_images=1024,
    resnet_images=128,
    resnet_batch_size=128,
    repeats=3,
    stacked=True,
    tta_ensemble=True,
    loader_workers=[0, 2],
)
QUICK_RUN = dict(
    digits_images=512,
    resnet_images=32,
    resnet_batch_size=32,
    repeats=3,
    stacked=False,
    tta_ensemble=False,
    loader_workers=[0],
)


def integers(text: str) -> list[int]:
    """'0,2' -> [0, 2]"""
    return [int(part) for part in text.split(",")]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench.py",
        description=(
            "Images/s and efficiency (images/s x forward passes per image / standard images/s) "
            "of every inference strategy, our engine beside the seed's approach and ttach, for "
            "the digits CNN and resnet18 at 3x64x64, in one process. Prints a table and the "
            "issue's targets; writes bench.csv and bench.png."
        ),
        epilog=(
            f"Defaults of a full run: {FULL_RUN}; of --quick: {QUICK_RUN}. A full run takes "
            "about 4 minutes on 2 CPU cores, --quick under one."
        ),
    )
    option = parser.add_argument
    option("--device", default="cpu", help="cpu (default) | cuda | cuda:N | auto")
    option("--quick", action="store_true", help="fewer images and rows: under a minute")
    option("--models", default="digits,resnet18", help="digits and/or resnet18 (default: both)")
    option("--digits-images", type=int, help="digits images per row")
    option("--digits-batch-size", type=int, default=256, help="data batch size (default: 256)")
    option("--resnet-images", type=int, help="resnet18 images per row")
    option("--resnet-batch-size", type=int, help="resnet18 data batch size")
    option("--repeats", type=int, help="timed rounds; each row reports its median round")
    option("--threads", type=int, help="torch threads (default: torch's)")
    option("--forward-batch-size", help="engine.forward_batch_size (default: conf/config.yaml)")
    option(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="engine.channels_last (default: conf/config.yaml)",
    )
    option(
        "--fold-batch-norms",
        action=argparse.BooleanOptionalAction,
        help="engine.fold_batch_norm (default: conf/config.yaml)",
    )
    option("--stacked", action=argparse.BooleanOptionalAction, help="torch.func-stacked rows")
    option(
        "--tta-ensemble",
        action=argparse.BooleanOptionalAction,
        help="the tta_ensemble row (seed_all x 5 models: 50 forwards per image)",
    )
    option("--loader-workers", type=integers, help="num_workers of the evaluation-loop rows")
    option(
        "--sweep",
        action=argparse.BooleanOptionalAction,
        help="images/s of the bare forward per batch size (default: on for CUDA, up to OOM)",
    )
    option("--sweep-only", action="store_true", help="the batch-size sweep and nothing else")
    option(
        "--sweep-sizes",
        type=integers,
        default=[16, 32, 64, 128, 256, 512],
        help="batch sizes of the CPU sweep (default: 16,32,64,128,256,512)",
    )
    option("--runs-dir", type=Path, default=REPO / "runs" / "digits", help="trained digit folds")
    option("--output-dir", type=Path, default=REPO / "outputs" / "bench", help="CSV and PNG")
    option("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    for name, value in (QUICK_RUN if args.quick else FULL_RUN).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if 0 not in args.loader_workers:
        args.loader_workers.insert(0, 0)  # the loop target compares the default loader
    if args.repeats < 1:
        parser.error("--repeats must be at least 1 (3 or more for a trustworthy median)")
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    if not models or set(models) - {"digits", "resnet18"}:
        parser.error(f"--models takes digits and/or resnet18, got {args.models!r}")
    args.models = models
    return args


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """conf/config.yaml's engine block, with the command line's overrides."""
    from omegaconf import OmegaConf

    configured = EngineSettings.from_config(OmegaConf.load(conf_dir() / "config.yaml").engine)
    forward_batch_size = args.forward_batch_size or configured.forward_batch_size
    if str(forward_batch_size).isdigit():
        forward_batch_size = int(forward_batch_size)
    return dataclasses.replace(
        configured,
        forward_batch_size=forward_batch_size,
        channels_last=configured.channels_last
        if args.channels_last is None
        else args.channels_last,
        fold_batch_norm=configured.fold_batch_norm
        if args.fold_batch_norms is None
        else args.fold_batch_norms,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = engine_settings(args)
    sweep = args.sweep_only or (args.sweep if args.sweep is not None else device.type == "cuda")
    started, other_load = time.perf_counter(), OtherLoad()

    workloads = []
    if "digits" in args.models:
        workloads.append(
            digits_workload(args.runs_dir, args.digits_images, args.digits_batch_size, device)
        )
    if "resnet18" in args.models:
        workloads.append(resnet_workload(args.resnet_images, args.resnet_batch_size, device))
    rows: list[Row] = []
    differences: dict[str, float] = {}
    if not args.sweep_only:
        for workload in workloads:
            workload_rows = build_rows(workload, device, settings, args)
            standard = next(row for row in workload_rows if row.name == "standard")
            # Loader workers start and stop processes that would disturb their neighbours' times:
            # they are measured after the other rows, beside standard alone.
            others = [row for row in workload_rows if row is not standard]
            shared = [row for row in others if row.group != "loader workers"]
            apart = [row for row in others if row.group == "loader workers"]
            batch_sizes = [len(batch) for batch in workload.batches]
            measure(shared, standard, batch_sizes, args.repeats, device)
            if apart:
                measure(apart, standard, batch_sizes, args.repeats, device, record_standard=False)
            rows += workload_rows
            differences[workload.name] = ttach_difference(workload, device, settings)
    sweeps = {
        workload.name: sweep_forward_batch_sizes(
            workload, args.sweep_sizes, args.repeats, device, settings
        )
        for workload in (workloads if sweep else [])
    }

    given = argv if argv is not None else sys.argv[1:]
    print(f"\n$ python scripts/bench.py {' '.join(given)}".rstrip())
    print("\n".join(machine_summary(device)))
    for workload in workloads:
        print(f"{workload.name}: {workload.note}")
    print(
        f"engine: {settings}; median of {args.repeats} interleaved rounds; "
        f"{time.perf_counter() - started:.0f} s in all; other processes took "
        f"{other_load.fraction():.0%} of the CPU time meanwhile"
    )
    written = []
    if rows:
        print(f"\n{format_table(rows)}\n\n{format_targets(check_targets(rows, differences))}")
        write_csv(rows, args.output_dir / "bench.csv")
        written.append(args.output_dir / "bench.csv")
        if not args.no_plot:
            plot(rows, args.output_dir / "bench.png")
            written.append(args.output_dir / "bench.png")
    if sweeps:
        print(f"\n{format_sweep(sweeps)}")
    if written:
        print(f"\nwrote {', '.join(str(path) for path in written)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as error:
        exit_with(error)

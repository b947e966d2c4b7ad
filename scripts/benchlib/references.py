"""The other ways of running what our engine runs, beside which the bench measures it.

- the seed's TTA, as a reference loop written here: the model as loaded, one forward per view of
  the whole batch, brightness and contrast built image by image, logits averaged;
- ttach's ClassificationTTAWrapper with its d4 set (optional: its rows are skipped without it);
- M models as one call over their stacked weights with torch.func (vmap + functional_call).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ml_infer.augment import Brightness, Contrast, Views
from ml_infer.inputs import InputSpec
from ml_infer.predictor import Predictor

log = logging.getLogger("bench")  # one logger for the whole bench, as in its single-file days


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


def ttach_installed() -> bool:
    try:
        import ttach  # noqa: F401
    except ImportError:
        log.warning("ttach is not installed (pip install ttach==0.0.3): its rows are skipped")
        return False
    return True


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

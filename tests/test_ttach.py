"""Our d4 TTA against ttach's (0.0.3, a dev dependency): the same mean of softmax over the eight
symmetries of the square, through the tuned engine (chunked forwards, channels_last, BatchNorm
folded) on the one side and ttach's loop over views on the model as loaded on the other."""

from __future__ import annotations

import pytest
import torch
import ttach
from torch import nn

from ml_infer.aggregate import SoftVoting
from ml_infer.augment import Views
from ml_infer.bank import load_classifier
from ml_infer.data import DigitsDataset, make_loader
from ml_infer.evaluate import build_views
from ml_infer.inputs import InputSpec
from ml_infer.models import torchvision_classifier
from ml_infer.predictor import EngineSettings, Predictor

from .conftest import compose_config

TOLERANCE = 1e-5


def d4_views() -> Views:
    return build_views(compose_config(["tta=d4"]).tta.augmentations)


def ttach_d4_mean_of_softmax(model: nn.Module, normalised: torch.Tensor) -> torch.Tensor:
    wrapper = ttach.ClassificationTTAWrapper(
        nn.Sequential(model, nn.Softmax(dim=-1)), ttach.aliases.d4_transform(), merge_mode="mean"
    )
    with torch.inference_mode():
        return wrapper(normalised)


def our_d4_mean(model: nn.Module, images: torch.Tensor, spec: InputSpec, **engine) -> torch.Tensor:
    predictor = Predictor(
        [model],
        d4_views(),
        SoftVoting(),
        SoftVoting(),
        spec,
        device=torch.device("cpu"),
        engine=EngineSettings(**engine),
    )
    return predictor(images).probs


def digits_test_images(n: int) -> torch.Tensor:
    images, _, _ = next(iter(make_loader(DigitsDataset(split="test"), batch_size=n)))
    return images


def test_the_two_d4_sets_are_the_same_eight_views():
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    ours = {tuple(view.flatten().tolist()) for view in d4_views()(grid)}
    theirs = {
        tuple(transformer.augment_image(grid).flatten().tolist())
        for transformer in ttach.aliases.d4_transform()
    }
    assert len(ours) == 8 and ours == theirs


@pytest.mark.parametrize(
    "engine",
    [
        {"channels_last": True},  # conf/config.yaml's engine: chunks `auto`, BatchNorm folded
        {"forward_batch_size": 7},
        {"forward_batch_size": 512, "fold_batch_norm": False},
    ],
    ids=["configured", "small-chunks-contiguous", "one-chunk-unfolded"],
)
def test_our_d4_mean_equals_ttach_d4_mean_of_softmax_on_a_trained_cnn(fold_paths, engine):
    classifier = load_classifier(fold_paths[0])
    images = digits_test_images(64)
    theirs = ttach_d4_mean_of_softmax(classifier.model, classifier.input_spec.normalise(images))
    ours = our_d4_mean(classifier.model, images, classifier.input_spec, **engine)
    assert ours.shape == theirs.shape == (64, 10)
    assert torch.allclose(ours, theirs, atol=TOLERANCE, rtol=0)
    with torch.inference_mode():
        identity_only = classifier.model(classifier.input_spec.normalise(images)).softmax(-1)
    assert (theirs - identity_only).abs().max() > 0.1  # the views matter: nothing trivial agrees


def test_our_d4_mean_equals_ttach_d4_mean_of_softmax_on_resnet18():
    torch.manual_seed(0)
    model = torchvision_classifier("resnet18", in_channels=3, num_classes=10).eval()
    spec = InputSpec(
        size=(64, 64), channels=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    images = torch.rand(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    theirs = ttach_d4_mean_of_softmax(model, spec.normalise(images))
    ours = our_d4_mean(model, images, spec, channels_last=True)
    assert torch.allclose(ours, theirs, atol=TOLERANCE, rtol=0)

"""Lightning `.ckpt` files, written by Lightning's own Trainer: the network's weights found under
the LightningModule's attribute, `hyper_parameters` read as data, Lightning's own predictions
reproduced."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from torch import nn

from ml_infer.checkpoints import open_checkpoint
from ml_infer.data import DigitsDataset
from ml_infer.errors import UserError
from ml_infer.models import SmallCNN
from ml_infer.task import run_evaluation

from .conftest import compose_config

# Lightning's own notes while it trains (worker counts, torch's pytree deprecations) are not ours;
# every test trains with it (lightning takes seconds to import): the full suite only.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*:UserWarning:lightning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

MEAN, STD = 0.3, 0.4


def digits_module(lightning, num_classes: int = 10, lr: float = 0.05):
    """A LightningModule as users write them: the network under `self.model`, a loss with a
    buffer of its own under `self.criterion`, hyperparameters saved."""

    class DigitsModule(lightning.LightningModule):
        def __init__(self, num_classes: int, lr: float):
            super().__init__()
            self.save_hyperparameters()
            self.model = SmallCNN(in_channels=1, num_classes=num_classes)
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(num_classes))

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.model((images - MEAN) / STD)

        def training_step(self, batch, index):
            images, labels = batch
            return self.criterion(self(images), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    return DigitsModule(num_classes, lr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    lightning = pytest.importorskip("lightning")
    torch.manual_seed(0)
    data = DigitsDataset("train", image_size=(8, 8), channels=1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.pixels(), data.labels), batch_size=64, shuffle=True
    )
    module = digits_module(lightning)
    root = tmp_path_factory.mktemp("lightning")
    trainer = lightning.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
    )
    trainer.fit(module, loader)
    path = root / "digits.ckpt"
    trainer.save_checkpoint(path)
    return path, module.eval()


LIGHTNING_INPUT = [
    "checkpoint.input.size=[8,8]",
    f"checkpoint.input.mean=[{MEAN}]",
    f"checkpoint.input.std=[{STD}]",
]


@pytest.mark.slow
def test_a_lightning_checkpoint_reproduces_lightnings_predictions(trained, tmp_path):
    path, module = trained
    cfg = compose_config(["model=small_cnn", f"ensemble.checkpoints=[{path}]", *LIGHTNING_INPUT])
    metrics = run_evaluation(cfg, output_dir=tmp_path)
    assert metrics["checkpoint_format"] == "lightning" and metrics["accuracy"] > 0.5
    with (tmp_path / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = DigitsDataset("test", image_size=(8, 8), channels=1)
    with torch.inference_mode():
        expected = module(test.pixels()).softmax(dim=1)
    ours = torch.tensor([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.slow
def test_the_networks_weights_are_found_under_its_attribute(trained):
    path, module = trained
    found = open_checkpoint(path)
    assert found.format == "lightning" and found.num_classes == 10
    assert set(found.state_dict) == set(module.model.state_dict())  # the loss's buffer left out
    assert set(open_checkpoint(path, "criterion").state_dict) == {"weight"}
    with pytest.raises(
        UserError, match="has no weights under 'net'; its modules: criterion, model"
    ):
        open_checkpoint(path, "net")


@pytest.mark.slow
def test_two_networks_in_one_module_need_the_prefix_named(trained, tmp_path):
    path, _ = trained
    contents = torch.load(path, weights_only=True)
    contents["state_dict"] |= {f"teacher.{k}": v for k, v in contents["state_dict"].items()}
    torch.save(contents, tmp_path / "two.ckpt")
    with pytest.raises(UserError, match=r"weights of 2 modules \(model, teacher\); say which"):
        open_checkpoint(tmp_path / "two.ckpt")
    assert open_checkpoint(tmp_path / "two.ckpt", "teacher").format == "lightning"

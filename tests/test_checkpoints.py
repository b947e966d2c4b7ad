"""Checkpoints: the DESIGN.md format, safe loading, EMA selection, ensemble agreement."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from ml_infer.bank import expand_checkpoint_paths, load_classifier, load_ensemble
from ml_infer.checkpoints import read_checkpoint, save_checkpoint
from ml_infer.errors import UserError
from ml_infer.inputs import InputSpec
from ml_infer.models import SmallCNN

DESIGN_KEYS = {"model", "model_state_dict", "ema_state_dict", "classes", "input", "fold", "metrics"}


def test_trainer_writes_the_design_format_loadable_with_weights_only(fold_paths):
    contents = torch.load(fold_paths[0], weights_only=True)
    assert contents.keys() >= DESIGN_KEYS
    assert contents["model"]["_target_"] == "ml_infer.models.SmallCNN"
    assert contents["classes"] == [str(d) for d in range(10)]
    assert contents["input"]["size"] == [8, 8] and contents["input"]["channels"] == 1
    assert contents["fold"] == 0
    assert {"epoch", "val_accuracy", "val_accuracy_ema"} <= contents["metrics"].keys()


def test_use_ema_selects_the_ema_weights(fold_paths):
    contents, _ = read_checkpoint(fold_paths[0])
    raw = load_classifier(fold_paths[0], use_ema=False)
    ema = load_classifier(fold_paths[0], use_ema=True)
    assert (raw.weights, ema.weights) == ("raw", "ema")
    name = "0.0.weight"
    assert torch.equal(raw.model.state_dict()[name], contents["model_state_dict"][name])
    assert torch.equal(ema.model.state_dict()[name], contents["ema_state_dict"][name])
    assert not torch.equal(raw.model.state_dict()[name], ema.model.state_dict()[name])


def test_use_ema_without_ema_weights_warns_and_uses_raw(fold_paths, tmp_path, caplog):
    contents, _ = read_checkpoint(fold_paths[0])
    del contents["ema_state_dict"]
    path = tmp_path / "no_ema.pt"
    torch.save(contents, path)
    with caplog.at_level(logging.WARNING):
        classifier = load_classifier(path, use_ema=True)
    assert classifier.weights == "raw"
    assert f"checkpoint {path} has no EMA weights" in caplog.text


class _Exploit:
    """Unpickling this runs a shell command: what weights_only loading must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loading_never_unpickles_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "payload": _Exploit(marker)}, path, pickle_protocol=2)
    with pytest.raises(
        UserError, match="holds a posix.system object, which is not safe to unpickle"
    ):
        load_classifier(path)
    assert not marker.exists()


def save_with_model_config(fold_path, tmp_path, model_config) -> object:
    contents, _ = read_checkpoint(fold_path)
    contents["model"] = model_config
    path = tmp_path / "crafted.pt"
    torch.save(contents, path)
    return path


def test_untrusted_architecture_target_is_refused(fold_paths, tmp_path):
    path = save_with_model_config(
        fold_paths[0], tmp_path, {"_target_": "os.system", "command": "x"}
    )
    with pytest.raises(UserError, match="names architecture 'os.system', which is not one"):
        load_classifier(path)


def test_a_trusted_prefix_does_not_make_an_attribute_path_trusted(fold_paths, tmp_path):
    # torchvision.models.resnet.torch.load *is* torch.load: a prefix check would run it.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"payload": _Exploit(marker)}, evil)
    path = save_with_model_config(
        fold_paths[0],
        tmp_path,
        {"_target_": "torchvision.models.resnet.torch.load", "f": str(evil), "weights_only": False},
    )
    with pytest.raises(UserError, match="torchvision.models.resnet.torch.load"):
        load_classifier(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"width": {"_target_": "subprocess.call", "args": ["ls"]}},
            "'width' must be a plain value",
        ),
        ({"_recursive_": True}, "key '_recursive_' is not allowed"),
        ({"weights": "DEFAULT"}, "asks for weights='DEFAULT'; nothing is downloaded"),
    ],
)
def test_checkpoint_model_configs_hold_plain_arguments_only(fold_paths, tmp_path, extra, message):
    contents, _ = read_checkpoint(fold_paths[0])
    path = save_with_model_config(fold_paths[0], tmp_path, {**contents["model"], **extra})
    with pytest.raises(UserError, match=message):
        load_classifier(path)


def test_weights_that_do_not_fit_the_architecture(fold_paths):
    with pytest.raises(
        UserError, match="does not fit architecture ml_infer.models.torchvision_classifier"
    ):
        load_classifier(
            fold_paths[0],
            model_config={"_target_": "ml_infer.models.torchvision_classifier", "name": "resnet18"},
        )


def test_ensemble_members_must_share_an_architecture_unless_allowed(fold_paths, tmp_path):
    spec = load_classifier(fold_paths[0]).input_spec
    narrow = SmallCNN(in_channels=1, num_classes=10, width=8)
    other = save_checkpoint(
        tmp_path / "narrow.pt",
        model_config={
            "_target_": "ml_infer.models.SmallCNN",
            "width": 8,
            "in_channels": 1,
            "num_classes": 10,
        },
        model_state_dict=narrow.state_dict(),
        classes=[str(d) for d in range(10)],
        input_spec=spec,
    )
    with pytest.raises(UserError, match="differ in architecture"):
        load_ensemble([fold_paths[0], other])
    assert len(load_ensemble([fold_paths[0], other], allow_mixed_architectures=True)) == 2


def test_ensemble_members_must_share_the_input_spec(fold_paths, tmp_path):
    contents, _ = read_checkpoint(fold_paths[1])
    contents["input"]["mean"] = [0.5]
    path = tmp_path / "other_mean.pt"
    torch.save(contents, path)
    with pytest.raises(UserError, match="disagree on input"):
        load_ensemble([fold_paths[0], path])


def test_save_is_atomic_and_round_trips(tmp_path):
    model = SmallCNN(in_channels=3, num_classes=4, width=4)
    spec = InputSpec(size=(16, 16), channels=3, mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    path = save_checkpoint(
        tmp_path / "a" / "best.pt",
        model_config={
            "_target_": "ml_infer.models.SmallCNN",
            "in_channels": 3,
            "num_classes": 4,
            "width": 4,
        },
        model_state_dict=model.state_dict(),
        classes=["a", "b", "c", "d"],
        input_spec=spec,
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["best.pt"]
    loaded = load_classifier(path)
    assert loaded.input_spec == spec and loaded.classes == ["a", "b", "c", "d"]
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model.eval()(x))


def test_empty_and_non_dict_files(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="checkpoint is empty"):
        read_checkpoint(empty)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(UserError, match="holds a Tensor, not a dict"):
        read_checkpoint(tensor_only)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(UserError, match="corrupt or truncated"):
        read_checkpoint(text)


def test_glob_patterns_expand_sorted(fold_paths, runs_dir):
    assert expand_checkpoint_paths([f"{runs_dir}/fold_*/weights/best.pt"]) == fold_paths
    assert expand_checkpoint_paths([str(fold_paths[2]), str(fold_paths[0])]) == [
        fold_paths[2],
        fold_paths[0],
    ]

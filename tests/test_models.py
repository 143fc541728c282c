"""Model factory: offline ImageNet weights, local checkpoints, GroupNorm, BatchNorm selection."""

import pytest
import torch
from torch import nn

from common.models import batchnorm_keys, create_model, load_backbone_weights


def test_imagenet_efficientnet_lite0_loads_offline():
    from common.models import IMAGENET_WEIGHTS

    reference = IMAGENET_WEIGHTS["tf_efficientnet_lite0"]()
    model = create_model("tf_efficientnet_lite0", num_classes=5, pretrained="imagenet")
    assert model.get_classifier().out_features == 5
    loaded = model.state_dict()["conv_stem.weight"]
    assert torch.equal(loaded, reference["_conv_stem.weight"])  # loaded in order, other names


def test_local_checkpoint_path(tmp_path):
    source = create_model("test_resnet", num_classes=3)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "ckpt.pth")
    model = create_model("test_resnet", num_classes=5, pretrained=str(tmp_path / "ckpt.pth"))
    key = next(k for k in source.state_dict() if k.endswith("conv1.weight"))
    assert torch.equal(model.state_dict()[key], source.state_dict()[key])
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        create_model("test_resnet", 5, pretrained=str(tmp_path / "missing.pth"))


def test_a_pretrained_backbone_gets_a_zero_head_that_still_learns(tmp_path):
    torch.save(create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "ckpt.pth")
    model = create_model("test_resnet", num_classes=5, pretrained=str(tmp_path / "ckpt.pth"))
    inputs = torch.randn(4, 3, 32, 32)
    logits = model(inputs)
    assert torch.equal(logits, torch.zeros(4, 5))  # uniform first predictions
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    assert model.get_classifier().weight.grad.abs().sum() > 0
    scratch = create_model("test_resnet", num_classes=5)  # no backbone weights: timm's init
    assert scratch.get_classifier().weight.abs().sum() > 0


def test_checkpoint_shape_mismatch_is_an_error():
    model = create_model("test_resnet", num_classes=3)
    state = {k: torch.zeros(1) for k in model.state_dict()}
    with pytest.raises(ValueError, match="shape"):
        load_backbone_weights(model, state)


def test_groupnorm_replaces_every_batchnorm():
    model = create_model("test_resnet", num_classes=3, norm="group")
    assert not batchnorm_keys(model)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_batchnorm_keys_by_module_type_not_name():
    model = nn.Sequential()
    model.add_module("features", nn.Conv2d(3, 4, 3))
    model.add_module("oddly_named", nn.BatchNorm2d(4))
    keys = batchnorm_keys(model)
    assert keys == {f"oddly_named.{k}" for k in
                    ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet_nope", 5)

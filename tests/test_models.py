"""Model factory: offline ImageNet weights, local checkpoints, the norms, BatchNorm selection,
the logit scale."""

import pytest
import torch
from torch import nn

from common.config import ConfigError, parse_run_config
from common.models import (
    ScaledClassifier,
    batchnorm_keys,
    create_model,
    group_count,
    is_batchnorm,
    load_backbone_weights,
)

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU)


def activations(model: nn.Module) -> int:
    return sum(isinstance(m, ACTIVATIONS) for m in model.modules())


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


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet10t", "resnet18"])
def test_groupnorm_keeps_every_activation_and_no_batchnorm(name):
    batch = create_model(name, num_classes=3)
    group = create_model(name, num_classes=3, norm="group")
    assert activations(group) == activations(batch) > 0  # EfficientNet-Lite0: 33
    assert not batchnorm_keys(group) and not any(map(is_batchnorm, group.modules()))
    norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == sum(map(is_batchnorm, batch.modules()))
    assert len({m.num_groups for m in norms}) == 1  # one group count divides every layer
    assert group(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_group_count_divides_every_channel_count():
    assert group_count([32, 16, 24, 40, 80, 112, 192, 320, 1280]) == 8  # EfficientNet-Lite0
    assert group_count([64, 128, 256, 512]) == 32
    assert group_count([24, 36]) == 12


def test_groupnorm_is_refused_on_batchnorm_trained_weights(tmp_path):
    # The CPU LOCO of 2026-12-01: GroupNorm from ImageNet BatchNorm weights stayed at the class
    # prior (training loss flat, one class predicted) at every held-out centre.
    torch.save(create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "ckpt.pth")
    for pretrained in ("imagenet", str(tmp_path / "ckpt.pth")):
        with pytest.raises(ValueError, match="trains from scratch"):
            create_model("tf_efficientnet_lite0", 5, pretrained=pretrained, norm="group")
    with pytest.raises(ConfigError, match="norm"):
        parse_run_config({"norm": "group", "pretrained": "imagenet"})
    assert parse_run_config({"norm": "group"}).norm == "group"


def test_groupnorm_from_scratch_keeps_what_tells_images_apart():
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", 5, norm="group").eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.rand(8, 3, 96, 96)),
                                      pre_logits=True)
    assert features.std(0).mean() > 0.1 * features.std()  # pretrained BN weights: ~0.0003


def test_frozen_batchnorm_keeps_its_pretrained_statistics_while_training(tmp_path):
    torch.save(create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "ckpt.pth")
    model = create_model("test_resnet", 3, pretrained=str(tmp_path / "ckpt.pth"),
                         norm="frozen_batch")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "bn" in k}
    assert frozen and not batchnorm_keys(model)  # nothing for FedBN to keep or adapt
    assert activations(model) == activations(create_model("test_resnet", 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32) * 5 + 2),
                                torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_a_logit_scale_multiplies_the_logits_with_the_same_tensors():
    torch.manual_seed(0)
    plain = create_model("test_resnet", num_classes=3).eval()
    torch.manual_seed(0)
    scaled = create_model("test_resnet", num_classes=3, logit_scale=30.0).eval()
    assert isinstance(scaled.get_classifier(), ScaledClassifier)
    assert list(scaled.state_dict()) == list(plain.state_dict())
    inputs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(scaled(inputs), 30.0 * plain(inputs))


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

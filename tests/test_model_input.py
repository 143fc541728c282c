"""The model's input on every path: the backbone's own mean/std, stain normalisation once."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from client.site import Site
from common.augment import IMAGENET_MEAN, IMAGENET_STD
from common.calibration import nll_curve
from common.config import ConfigError, RunConfig, parse_run_config
from common.data import CentreData, CentreSpec
from common.model_input import ModelInput, backbone_mean_std
from common.models import is_batchnorm
from common.pipeline import (
    adapted_copy,
    fit,
    model_input,
    new_model,
    place,
    score,
    score_as_applied,
    score_held_out,
    temperature_curve,
)
from common.stain import ReinhardNormaliser
from common.train import adapt_batchnorm, logit_metrics

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
HALF = (0.5, 0.5, 0.5)
# test_resnet's pretrained_cfg, like tf_efficientnet_lite0's, asks for inputs in [-1, 1].
CONFIG = RunConfig(model="test_resnet", image_size=16, stain_normalise="reinhard",
                   device="cpu", test_time_bn=True, batch_size=4)


def centre(count: int = 12, seed: int = 0) -> CentreData:
    """Stained-looking uint8 images (a tinted disc on a pale ground) of two classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:16, :16]
    disc = (yy - 8) ** 2 + (xx - 8) ** 2 < 20
    images = np.empty((count, 16, 16, 3), np.uint8)
    for image in images:
        image[:] = rng.integers(170, 240, 3)
        image[disc] = rng.integers(40, 140, 3)
    labels = np.arange(count) % 2
    return CentreData("lab", ("a", "b"), images, labels, np.arange(count))


def by_hand(images: np.ndarray) -> torch.Tensor:
    """What the model must see: Reinhard-normalised uint8 images, then (x - 0.5) / 0.5."""
    normalised = ReinhardNormaliser()(torch.from_numpy(images)).permute(0, 3, 1, 2).float()
    return (normalised / 255 - 0.5) / 0.5


def logits_by_hand(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(by_hand(images)).numpy()


def test_the_backbone_says_its_mean_and_std():
    assert backbone_mean_std("tf_efficientnet_lite0") == (HALF, HALF)
    assert backbone_mean_std("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    assert model_input(CONFIG) == ModelInput(HALF, HALF, "reinhard")


def test_scoring_normalises_with_the_backbones_mean_and_std():
    """The defect: every backbone was fed ImageNet's mean/std, also those whose weights
    expect [-1, 1] (test_resnet here, tf_efficientnet_lite0 in the recipes)."""
    data = centre()
    config = RunConfig(model="test_resnet", device="cpu")
    model = new_model(config, 2)
    model.eval()
    unit = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = model((unit - 0.5) / 0.5).numpy()
    metrics = logit_metrics(expected, data.labels, data.classes)
    assert score(model, data, config)["loss"] == pytest.approx(metrics["loss"], rel=1e-5)


def test_the_run_config_refuses_an_unknown_stain_normalisation():
    assert parse_run_config({"stain-normalise": "reinhard"}).stain_normalise == "reinhard"
    with pytest.raises(ConfigError, match=r"'stain-normalise': expected one of \('none', "
                                          r"'reinhard'\), got 'macenko'"):
        parse_run_config({"stain-normalise": "macenko"})


def test_place_normalises_once_and_leaves_the_callers_images_alone():
    data = centre()
    original = data.images.copy()
    placed = ModelInput(HALF, HALF, "reinhard").place(data.images, CPU)
    assert torch.equal(placed, ReinhardNormaliser()(torch.from_numpy(original)))
    np.testing.assert_array_equal(data.images, original)
    with pytest.raises(TypeError, match="placed, and stain-normalised, already"):
        ModelInput(HALF, HALF, "reinhard").place(placed, CPU)
    unchanged = ModelInput(HALF, HALF).place(data.images, CPU)
    assert torch.equal(unchanged, torch.from_numpy(original))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_placing_on_cuda_normalises_as_on_the_cpu():
    data = centre()
    inputs = ModelInput(HALF, HALF, "reinhard")
    on_cuda = inputs.place(data.images, torch.device("cuda"))
    assert on_cuda.device.type == "cuda" and on_cuda.dtype == torch.uint8
    difference = on_cuda.cpu().int() - inputs.place(data.images, CPU).int()
    assert difference.abs().max() <= 1  # rounding of float32 on two devices


def test_every_scoring_path_feeds_the_model_what_it_expects():
    """Validation, test and held-out scoring and the temperature curve: the model sees the
    stain-normalised images in its backbone's [-1, 1], whether the caller placed them or not
    (ImageNet's mean/std and no normalisation, as before, give other logits)."""
    data = centre()
    model = new_model(RunConfig(model="test_resnet"), 2)
    expected = logits_by_hand(model, data.images)
    plain = dataclasses.replace(CONFIG, test_time_bn=False)
    by_hand_metrics = logit_metrics(expected, data.labels, data.classes)
    for images in (None, place(data, CONFIG)):
        assert score(model, data, CONFIG, images)["loss"] == pytest.approx(
            by_hand_metrics["loss"], rel=1e-5)
        assert score_held_out(model, data, plain, images)["held_out"]["loss"] == pytest.approx(
            by_hand_metrics["loss"], rel=1e-5)
        np.testing.assert_allclose(temperature_curve(model, data, plain, images).nll_sums,
                                   nll_curve(expected, data.labels).nll_sums, rtol=1e-5)
    imagenet = (torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
                - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
                    IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert not np.allclose(model(imagenet).numpy(), expected, atol=1e-3)


def test_batchnorm_adaptation_sees_the_same_input():
    data = centre()
    model = new_model(RunConfig(model="test_resnet"), 2)
    placed = place(data, CONFIG)
    adapted = adapted_copy(model, placed, CONFIG)
    expected = adapt_batchnorm(copy.deepcopy(model), placed, CPU, ModelInput(HALF, HALF))
    imagenet = adapt_batchnorm(copy.deepcopy(model), placed, CPU,
                               ModelInput(IMAGENET_MEAN, IMAGENET_STD))
    first = next(name for name, m in model.named_modules() if is_batchnorm(m))
    key = f"{first}.running_mean"
    torch.testing.assert_close(adapted.state_dict()[key], expected.state_dict()[key])
    assert not torch.allclose(adapted.state_dict()[key], imagenet.state_dict()[key])
    # As applied (test-time-bn): the adapted model scores the split.
    assert score_as_applied(model, data, CONFIG, placed)["loss"] == pytest.approx(
        score(adapted, data, CONFIG, placed)["loss"], rel=1e-5)


def test_training_gets_placed_images_and_the_backbones_mean_and_std(monkeypatch):
    seen = {}

    def spy(model, images, labels, loss_fn, settings, augmenter, device):
        seen.update(images=images, augmenter=augmenter)
        return {}

    monkeypatch.setattr("common.pipeline.train_local", spy)
    data = centre()
    fit(new_model(CONFIG, 2), data, CONFIG, data.class_counts(), progress=0.5, seed=0)
    assert torch.equal(seen["images"], ReinhardNormaliser()(torch.from_numpy(data.images)))
    assert seen["augmenter"].mean.flatten().tolist() == list(HALF)
    assert seen["augmenter"].std.flatten().tolist() == list(HALF)


def test_a_site_places_its_splits_stain_normalised():
    data = centre()
    site = Site(CONFIG, CentreSpec("lab"), data, data.subset(np.arange(4)), data)
    for split in ("train", "val"):
        assert torch.equal(site.device_images[split], ReinhardNormaliser()(
            torch.from_numpy(getattr(site, split).images)))


def test_images_reach_a_model_only_through_model_input_place():
    """No module but ``common.model_input`` uploads images itself: a path that did would
    skip the stain normalisation."""
    pattern = re.compile(r"\bimages_on_device\(")
    offenders = [path.relative_to(ROOT).as_posix()
                 for folder in ("common", "client", "server", "simulations")
                 for path in (ROOT / folder).rglob("*.py")
                 if pattern.search(path.read_text())
                 and path.relative_to(ROOT).as_posix() not in ("common/train.py",
                                                                "common/model_input.py")]
    assert offenders == []

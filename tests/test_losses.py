"""Tests for the imbalanced-classification loss registry in common.losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.config import parse_run_config
from common.data import CentreData
from common.losses import LOSSES, LossHParams, available_losses, create_loss, logit_scale
from common.pipeline import fit, new_model, score

COUNTS_WITH_ZEROS = [0, 5, 700, 0, 1]


def random_batch(scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, len(COUNTS_WITH_ZEROS), generator=generator) * scale
    targets = torch.arange(16) % len(COUNTS_WITH_ZEROS)  # includes the zero-count classes
    return logits, targets


def test_registry_names() -> None:
    assert available_losses() == [
        "ce", "weighted_ce", "focal", "class_balanced", "ldam_drw", "balanced_softmax",
        "logit_adjusted", "label_smoothing",
    ]
    assert set(available_losses()) == set(LOSSES)


@pytest.mark.parametrize("progress", [0.0, 1.0])
@pytest.mark.parametrize("name", available_losses())
def test_finite_loss_and_gradients_on_extreme_logits(name: str, progress: float) -> None:
    logits, targets = random_batch(scale=50.0)
    logits.requires_grad_(True)
    loss = create_loss(name, np.array(COUNTS_WITH_ZEROS), progress)(logits, targets)
    loss.backward()
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", available_losses())
def test_loss_decreases_when_true_logit_increases(name: str) -> None:
    logits, targets = random_batch(scale=0.1)
    loss_fn = create_loss(name, COUNTS_WITH_ZEROS, progress=1.0)
    boosted = logits + 0.5 * F.one_hot(targets, logits.shape[1])
    assert loss_fn(boosted, targets) < loss_fn(logits, targets)


def test_focal_with_fractional_gamma_has_finite_gradient_when_saturated() -> None:
    logits = torch.tensor([[1000.0, 0.0], [0.0, 0.0]], requires_grad=True)
    loss = create_loss("focal", [3, 3], hparams=LossHParams(focal_gamma=0.5))(
        logits, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# --- known values -------------------------------------------------------------------------------


def test_ce_known_value() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + 1))
    loss = create_loss("ce", [1, 1, 1])(logits, torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_ce_weights_average_one_over_present_classes() -> None:
    counts = [10, 40, 0, 50]
    inverse = [1 / 10, 1 / 40, 1 / 1, 1 / 50]  # the absent class is clamped to a count of 1
    present_mean = (1 / 10 + 1 / 40 + 1 / 50) / 3
    expected = torch.tensor([w / present_mean for w in inverse])
    loss_fn = create_loss("weighted_ce", counts)
    torch.testing.assert_close(loss_fn.class_weights, expected)

    logits, targets = torch.zeros(2, 4), torch.tensor([0, 3])
    expected_loss = (expected[0] + expected[3]) / 2 * math.log(4)
    assert loss_fn(logits, targets).item() == pytest.approx(expected_loss.item(), rel=1e-6)


def test_focal_known_value_gamma_2() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # p_true = 0.5 and 0.75
    expected = (0.5**2 * math.log(2) + 0.25**2 * math.log(4 / 3)) / 2
    loss = create_loss("focal", [1, 1], hparams=LossHParams(focal_gamma=2.0))(
        logits, torch.tensor([0, 0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_class_balanced_weights_known_values() -> None:
    effective_numbers = [1.0, (1 - 0.9**10) / (1 - 0.9)]
    inverse = [1 / e for e in effective_numbers]
    expected = torch.tensor([2 * w / sum(inverse) for w in inverse])
    loss_fn = create_loss("class_balanced", [1, 10], hparams=LossHParams(cb_beta=0.9))
    torch.testing.assert_close(loss_fn.class_weights, expected)
    assert loss_fn.class_weights.sum().item() == pytest.approx(2.0)


def test_ldam_margins_and_value() -> None:
    hparams = LossHParams(ldam_max_margin=0.5, ldam_scale=2.0)
    loss_fn = create_loss("ldam_drw", [1, 16, 81], progress=0.0, hparams=hparams)
    torch.testing.assert_close(loss_fn.scaled_margins, 2.0 * torch.tensor([0.5, 0.25, 0.5 / 3]))
    assert logit_scale("ldam_drw", hparams) == 2.0 and logit_scale("ce", hparams) == 1.0

    # zero logits, target 1: margined logits are [0, -2 * 0.25, 0]
    expected = -math.log(math.exp(-0.5) / (math.exp(-0.5) + 2))
    loss = loss_fn(torch.zeros(1, 3), torch.tensor([1]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_balanced_softmax_is_ce_on_logits_plus_log_prior() -> None:
    counts = [2, 6, 12]
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    log_prior = torch.tensor([math.log(2 / 20), math.log(6 / 20), math.log(12 / 20)])
    expected = F.cross_entropy(logits + log_prior, targets)
    torch.testing.assert_close(create_loss("balanced_softmax", counts)(logits, targets), expected)


# --- limits -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "hparams", "counts"), [
    ("focal", LossHParams(focal_gamma=0.0), [3, 50, 700]),
    ("class_balanced", LossHParams(cb_beta=0.0), [3, 50, 700]),
    ("weighted_ce", LossHParams(), [40, 40, 40]),
    ("logit_adjusted", LossHParams(logit_adjust_tau=0.0), [3, 50, 700]),
    ("label_smoothing", LossHParams(label_smoothing=0.0), [3, 50, 700]),
])
def test_limits_reduce_to_ce(name: str, hparams: LossHParams, counts: list[int]) -> None:
    logits, targets = torch.randn(9, 3) * 3, torch.arange(9) % 3
    loss = create_loss(name, counts, hparams=hparams)(logits, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets))


def test_ldam_drw_weights_only_after_drw_start() -> None:
    counts = [2, 30, 400]
    hparams = LossHParams(ldam_max_margin=0.5, ldam_scale=4.0, drw_start=0.5, drw_beta=0.99)
    logits, targets = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])

    margins = 0.5 * torch.tensor([c**-0.25 for c in counts]) / 2**-0.25
    margined = logits - F.one_hot(targets, 3) * margins[targets, None]
    per_example = F.cross_entropy(4.0 * margined, targets, reduction="none")
    inverse_effective = torch.tensor([(1 - 0.99) / (1 - 0.99**c) for c in counts])
    cb_weights = 3 * inverse_effective / inverse_effective.sum()

    # The model's logits are already scaled by s = 4 (see ``logit_scale``).
    before = create_loss("ldam_drw", counts, progress=0.49, hparams=hparams)(4.0 * logits, targets)
    after = create_loss("ldam_drw", counts, progress=0.5, hparams=hparams)(4.0 * logits, targets)
    torch.testing.assert_close(before, per_example.mean())
    torch.testing.assert_close(after, (cb_weights[targets] * per_example).mean())


# --- errors -------------------------------------------------------------------------------------


def test_unknown_name_lists_known_losses() -> None:
    with pytest.raises(ValueError, match="no_such_loss") as error:
        create_loss("no_such_loss", [1, 2])
    for name in available_losses():
        assert name in str(error.value)


@pytest.mark.parametrize("counts", [[3, -1, 2], [], [[1, 2]]])
def test_invalid_counts_rejected(counts: list) -> None:
    with pytest.raises(ValueError, match="class_counts"):
        create_loss("ce", counts)


@pytest.mark.parametrize("progress", [-0.1, 1.1, float("nan")])
def test_progress_out_of_range_rejected(progress: float) -> None:
    with pytest.raises(ValueError, match="progress"):
        create_loss("ce", [1, 2], progress=progress)


# --- at inference -------------------------------------------------------------------------------


def toy_centre(count: int, seed: int) -> CentreData:
    """Three classes told apart by which colour channel is brighter, with noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 3
    images = rng.integers(60, 120, (count, 16, 16, 3))
    images[np.arange(count), :, :, labels] += 80 + rng.integers(-40, 40, (count, 1, 1))
    return CentreData("toy", ("a", "b", "c"), images.clip(0, 255).astype(np.uint8), labels,
                      np.arange(count))


def test_ldam_probabilities_at_inference_are_calibrated_like_cross_entropy() -> None:
    """LDAM trains on s-scaled logits; without the scale at inference its probabilities are
    near uniform (NLL ~ ln 3, confidence ~1/3 at perfect accuracy)."""
    train, test = toy_centre(72, 0), toy_centre(48, 1)
    scored = {}
    for loss in ("ce", "ldam_drw"):
        config = parse_run_config({"model": "test_resnet", "image-size": 16, "loss": loss,
                                   "augment": "none", "device": "cpu", "local-epochs": 6,
                                   "batch-size": 16})
        model = new_model(config, 3)
        fit(model, train, config, train.class_counts(), progress=0.0, seed=0)
        scored[loss] = score(model, test, config)
    ce, ldam = scored["ce"], scored["ldam_drw"]
    assert ce["accuracy"] > 0.9 and ldam["accuracy"] > 0.9
    assert ldam["loss"] < math.log(3) / 2
    assert ldam["ece"] < max(2 * ce["ece"], 0.15)

"""Class-balanced batch sampling for a fixed number of local steps."""

from __future__ import annotations

import pytest
import torch

from common.sampling import balanced_batches, sampling_weights

# Four classes present (1000, 100, 10, 1 images), class 2 absent.
LABELS = torch.cat([torch.full((1000,), 0), torch.full((100,), 1), torch.full((10,), 3),
                    torch.full((1,), 4)])
PRESENT = torch.tensor([0, 1, 3, 4])


def class_shares(indices: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(LABELS[indices.flatten()], minlength=5).double()
    return counts[PRESENT] / counts.sum()


def draw(balance: float, seed: int = 0) -> torch.Tensor:
    return balanced_batches(LABELS, steps=200, batch_size=50,
                            generator=torch.Generator().manual_seed(seed), balance=balance)


@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_class_frequencies_follow_the_mix(balance: float) -> None:
    instance = torch.tensor([1000, 100, 10, 1], dtype=torch.float64) / len(LABELS)
    expected = (1 - balance) * instance + balance * torch.full((4,), 0.25, dtype=torch.float64)
    shares = class_shares(draw(balance))
    # 10,000 draws: a share's standard deviation is at most 0.005.
    assert torch.allclose(shares, expected, atol=0.02), (shares, expected)


def test_batches_have_the_shape_and_are_reproducible() -> None:
    indices = draw(1.0, seed=3)
    assert indices.shape == (200, 50) and indices.dtype == torch.int64
    assert int(indices.min()) >= 0 and int(indices.max()) < len(LABELS)
    assert torch.equal(indices, draw(1.0, seed=3))
    assert not torch.equal(indices, draw(1.0, seed=4))


def test_weights_are_a_distribution_over_present_classes() -> None:
    weights = sampling_weights(LABELS, balance=1.0)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    per_class = torch.zeros(5, dtype=torch.float64).index_add_(0, LABELS, weights)
    assert torch.allclose(per_class[PRESENT], torch.full((4,), 0.25, dtype=torch.float64))
    assert per_class[2] == 0


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="balance"):
        sampling_weights(LABELS, balance=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        sampling_weights(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="positive"):
        balanced_batches(LABELS, steps=0, batch_size=4)

"""The local fit's batches: epochs, a fixed number of steps whatever a site's size, and
class-balanced sampling (run config ``local-steps`` and ``sampling-balance``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.augment import build_augmenter
from common.config import parse_run_config
from common.data import CentreData
from common.pipeline import fit, new_model
from common.train import TrainSettings, batch_schedule, train_local

# An imbalanced site: 90 images of class 0, 9 of class 1, 1 of class 2.
LABELS = torch.cat([torch.zeros(90), torch.ones(9), torch.full((1,), 2)]).long()


def passes(settings: TrainSettings, labels: torch.Tensor = LABELS) -> list[torch.Tensor]:
    return list(batch_schedule(labels, settings, torch.Generator().manual_seed(0)))


def test_epochs_visit_every_image_once_per_pass_dropping_the_ragged_batch():
    schedule = passes(TrainSettings(epochs=2, batch_size=32))
    assert [tuple(p.shape) for p in schedule] == [(3, 32), (3, 32)]
    for indices in schedule:
        assert len(set(indices.flatten().tolist())) == 96  # no image twice in an epoch


@pytest.mark.parametrize("size", [40, 400])
def test_fixed_steps_do_not_depend_on_the_site_size(size):
    labels = torch.arange(size) % 3
    [indices] = passes(TrainSettings(epochs=5, steps=7, batch_size=16), labels)
    assert indices.shape == (7, 16)


def test_class_balanced_sampling_revisits_the_rare_classes():
    plain = torch.cat(passes(TrainSettings(epochs=20, batch_size=10)))
    balanced = torch.cat(passes(TrainSettings(epochs=20, batch_size=10, sampling_balance=1.0)))
    assert plain.shape == balanced.shape  # epoch-sized passes, drawn with replacement
    share = torch.bincount(LABELS[balanced.flatten()], minlength=3).double() / balanced.numel()
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.05)
    assert (LABELS[plain.flatten()] == 2).double().mean() == pytest.approx(0.01)


class CountingLoss(torch.nn.CrossEntropyLoss):
    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(targets))
        return super().forward(logits, targets)


def tiny_site(n: int, seed: int = 0) -> CentreData:
    rng = np.random.default_rng(seed)
    return CentreData("site", ("a", "b", "c"), rng.integers(0, 255, (n, 16, 16, 3), np.uint8),
                      np.arange(n) % 3, np.arange(n))


@pytest.mark.parametrize("size", [24, 120])
def test_train_local_takes_exactly_the_fixed_steps(size):
    config = parse_run_config({"model": "test_resnet", "device": "cpu"})
    model, loss = new_model(config, 3), CountingLoss()
    data = tiny_site(size)
    metrics = train_local(model, torch.from_numpy(data.images), data.labels, loss,
                          TrainSettings(steps=3, batch_size=8), build_augmenter("none"),
                          torch.device("cpu"))
    assert loss.batches == [8, 8, 8] and metrics["local_steps"] == 3


def test_a_pooled_fit_takes_the_steps_of_every_centre_it_pools():
    config = parse_run_config({"model": "test_resnet", "device": "cpu", "local-steps": 2,
                               "batch-size": 4, "augment": "none"})
    data = tiny_site(30)
    single = fit(new_model(config, 3), data, config, data.class_counts(), 0.5, seed=0)
    pooled = fit(new_model(config, 3), data, config, data.class_counts(), 0.5, seed=0,
                 centres=3)
    assert (single["local_steps"], pooled["local_steps"]) == (2, 6)

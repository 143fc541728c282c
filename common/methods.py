"""Training methods, one small class each in one registry (in the spirit of DomainBed).

A method is a :class:`Method` subclass registered in :data:`METHODS` under the name the run
config's ``strategy`` key takes. Its hooks, all framework-free:

site side (``client.site`` at a site, ``simulations.baselines`` for centralised methods)
    :meth:`~Method.local_settings`  what to train: the settings of a local fit (FedProx adds
                                    its proximal term)
    :meth:`~Method.kept_keys`       what a site keeps: tensors it loads over the global ones
                                    before training, from its own previous round (FedBN:
                                    BatchNorm)
    :meth:`~Method.sent_keys`       what a site sends: the tensors of its update
server side (``server.strategies.MethodStrategy``, the one Flower strategy)
    :meth:`~Method.aggregate`       the next global weights from the accepted updates: numpy
                                    over named arrays (weighted mean, coordinate median,
                                    trimmed mean, server-side Adam)
    :meth:`~Method.global_model`    the model that is validated, scored on the held-out centre,
                                    tested and exported
run level
    ``federated``                   False for references trained in one place without Flower
                                    (``pooled``, ``local``: ``simulations.baselines``)
    :meth:`~Method.partitions`      which training centres train each model
    ``allows_central_dp``           the aggregate is a weighted mean that central differential
                                    privacy can noise (``server.privacy``)
    ``adapts_batchnorm_at_test``    held-out results always include test-time BatchNorm
                                    adaptation

The base class is plain FedAvg; a method overrides only what it changes. Adding a method is
one class and one line in :data:`METHODS`. A method object lives for one run (FedAdam keeps its
moments in it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
from torch import nn

from common.config import RunConfig
from common.models import batchnorm_keys
from common.train import TrainSettings
from common.weights import COUNTER_SUFFIX

State = dict[str, np.ndarray]
# An update as a method reads it: tensor by tensor (the server decodes each when it is read,
# so a method that reads one tensor of every update, then the next, holds one at a time).
Update = Mapping[str, np.ndarray]


def weighted_mean(updates: Sequence[Update], weights: Sequence[float]) -> State:
    """Per tensor, the mean of the updates weighted by ``weights`` (a running sum in float64:
    one update's tensor at a time)."""
    total = float(np.sum(weights))
    return {key: sum((weight / total) * np.asarray(update[key], np.float64)
                     for update, weight in zip(updates, weights, strict=True))
            for key in updates[0]}


def coordinate_median(updates: Sequence[Update]) -> State:
    """Per coordinate, the median of the updates (Yin et al. 2018)."""
    return {key: np.median(np.stack([u[key] for u in updates]), axis=0) for key in updates[0]}


def trimmed_mean(updates: Sequence[Update], fraction: float) -> State:
    """Per coordinate, the mean after cutting ``fraction`` of the updates from each tail."""
    from scipy.stats import trim_mean

    return {key: trim_mean(np.stack([u[key] for u in updates]), fraction, axis=0)
            for key in updates[0]}


@dataclasses.dataclass
class AdamMoments:
    """Server-side Adam's first and second moments of the pseudo-gradient, per tensor."""

    first: State
    second: State


def adam_step(current: State, target: State, moments: AdamMoments | None, server_round: int,
              learning_rate: float, betas: tuple[float, float] = (0.9, 0.99),
              tau: float = 1e-3) -> tuple[State, AdamMoments]:
    """One server-side Adam step (Reddi et al. 2021) from ``current`` towards ``target``.

    The pseudo-gradient is ``target - current``; the bias-corrected step size is Flower's
    FedAdam's (``eta * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` at round t).
    """
    beta_1, beta_2 = betas
    delta = {key: target[key] - current[key] for key in current}
    if moments is None:
        moments = AdamMoments({k: np.zeros_like(v) for k, v in delta.items()},
                              {k: np.zeros_like(v) for k, v in delta.items()})
    first = {k: beta_1 * moments.first[k] + (1 - beta_1) * d for k, d in delta.items()}
    second = {k: beta_2 * moments.second[k] + (1 - beta_2) * d**2 for k, d in delta.items()}
    step = (learning_rate * np.sqrt(1 - beta_2 ** (server_round + 1.0))
            / (1 - beta_1 ** (server_round + 1.0)))
    stepped = {k: current[k] + step * first[k] / (np.sqrt(second[k]) + tau) for k in current}
    return stepped, AdamMoments(first, second)


class Method:
    """FedAvg (McMahan et al. 2017) and the defaults of every method: sites train the global
    model as configured, keep nothing and send every tensor; the server averages the updates
    weighted by the sites' training images, and that average is the global model."""

    federated: ClassVar[bool] = True
    allows_central_dp: ClassVar[bool] = False
    adapts_batchnorm_at_test: ClassVar[bool] = False

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    def local_settings(self, settings: TrainSettings) -> TrainSettings:
        """The settings of a site's local fit, from the run config's."""
        return settings

    def kept_keys(self, model: nn.Module) -> set[str]:
        """Tensors a site keeps: loaded over the global ones before it trains."""
        return set()

    def sent_keys(self, model: nn.Module) -> set[str]:
        """Tensors a site sends (step counters never leave it)."""
        return {k for k in model.state_dict() if not k.endswith(COUNTER_SUFFIX)}

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float], current: State,
                  server_round: int) -> State:
        """The new values of the sent tensors from the accepted ``updates`` (``weights``: the
        sites' training images; ``current``: the global values the sites started from)."""
        return weighted_mean(updates, weights)

    def global_model(self, state: State) -> State:
        """The model validated, scored, tested and exported, from the aggregated weights."""
        return state

    def partitions(self, centres: Sequence[str]) -> list[list[str]]:
        """The training centres of each model the method trains."""
        return [list(centres)]


class FedAvg(Method):
    """FedAvg: the base behaviour; its weighted mean can be noised for central DP."""

    allows_central_dp = True


class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg whose sites add ``proximal-mu``/2 ||w - w_global||^2."""

    def local_settings(self, settings: TrainSettings) -> TrainSettings:
        return dataclasses.replace(settings, proximal_mu=self.config.proximal_mu)


class FedAdam(Method):
    """FedAdam (Reddi et al. 2021): server-side Adam (step size ``server-learning-rate``) on
    the weighted mean of the updates."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__(config)
        self.moments: AdamMoments | None = None

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float], current: State,
                  server_round: int) -> State:
        target = weighted_mean(updates, weights)
        stepped, self.moments = adam_step({k: current[k] for k in target}, target, self.moments,
                                          server_round, self.config.server_learning_rate)
        return stepped


class FedBN(Method):
    """FedBN (Li et al. 2021): each site trains with its own BatchNorm (kept between rounds);
    the sites' BatchNorm is averaged like every other tensor into the global model, which is
    scored on new centres after test-time BatchNorm adaptation as well."""

    adapts_batchnorm_at_test = True

    def kept_keys(self, model: nn.Module) -> set[str]:
        return batchnorm_keys(model) & self.sent_keys(model)


class FedMedian(Method):
    """Coordinate-wise median of the updates (Yin et al. 2018), robust to a minority of bad
    sites."""

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float], current: State,
                  server_round: int) -> State:
        return coordinate_median(updates)


class FedTrimmedAvg(Method):
    """Coordinate-wise trimmed mean (Yin et al. 2018): ``trim-fraction`` of the updates cut
    from each tail."""

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float], current: State,
                  server_round: int) -> State:
        return trimmed_mean(updates, self.config.trim_fraction)


class Pooled(Method):
    """ERM on every training centre's images in one place (what privacy forbids): the
    reference the federated methods are compared to."""

    federated = False


class Local(Method):
    """One model per training centre, trained on that centre's images only."""

    federated = False

    def partitions(self, centres: Sequence[str]) -> list[list[str]]:
        return [[centre] for centre in centres]


# Run-config ``strategy`` name -> method.
METHODS: dict[str, type[Method]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedbn": FedBN,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "pooled": Pooled,
    "local": Local,
}


def create_method(config: RunConfig) -> Method:
    """The method named by ``config.strategy``."""
    if config.strategy not in METHODS:
        raise ValueError(f"unknown method {config.strategy!r}; known: {', '.join(METHODS)}")
    return METHODS[config.strategy](config)

"""Federated strategies: Flower's message-API strategies behind update validation.

Every strategy is one small class (a Flower strategy plus :class:`ValidatedUpdates`) and one
line in :data:`STRATEGIES`. Before aggregation each training reply is decoded from its wire
precision and checked: non-finite values, unknown or missing keys, wrong shapes, and an update
norm far above the round's median are rejected and recorded in ``rejected``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from common.config import RunConfig
from common.weights import from_wire

# An update whose distance to the global model exceeds this multiple of the round's median
# distance is rejected (only with three or more updates, so a median exists).
NORM_OUTLIER_FACTOR = 10.0


def record_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord."""
    return {key: array.numpy() for key, array in record.items()}


def state_to_record(state: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of named numpy arrays (order kept)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


def update_problem(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> str | None:
    """Why ``update`` cannot be aggregated against the global ``reference``, or None."""
    if set(update) != set(reference):
        unknown = sorted(set(update) - set(reference))[:3]
        missing = sorted(set(reference) - set(update))[:3]
        return f"keys differ from the global model (unknown {unknown}, missing {missing})"
    for key, value in update.items():
        if value.shape != reference[key].shape:
            return f"{key} has shape {value.shape}, expected {reference[key].shape}"
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            return f"{key} contains NaN or Inf"
    return None


def update_distance(update: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """L2 distance between an update and the global weights over floating-point tensors
    (float32 differences, each tensor's squared norm summed in float64)."""
    total = 0.0
    for key, value in update.items():
        if np.issubdtype(value.dtype, np.floating):
            difference = np.subtract(value, reference[key], dtype=np.float32).ravel()
            total += float(np.dot(difference, difference))
    return float(np.sqrt(total))


class ValidatedUpdates:
    """Mixin for a Flower strategy: decode and validate training replies before aggregating."""

    wire_precision: str = "fp32"
    local_keys: frozenset[str] = frozenset()  # tensors that never leave a site (FedBN)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = {k: v for k, v in record_to_state(arrays).items()
                             if k not in self.local_keys}
        self.rejected: list[dict] = []
        self.sampled = []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        decoded = [(m, self._decoded(m)) for m in replies if not m.has_error()]
        candidates = []
        for message, state in decoded:
            problem = update_problem(state, self.global_state)
            if problem:
                self._reject(message, problem)
            else:
                candidates.append((message, state))
        distances = [update_distance(state, self.global_state) for _, state in candidates]
        if len(candidates) >= 3:
            limit = NORM_OUTLIER_FACTOR * max(float(np.median(distances)), 1e-12)
            keep = [d <= limit for d in distances]
            for (message, _), distance, ok in zip(candidates, distances, keep, strict=True):
                if not ok:
                    self._reject(message, f"update norm {distance:.3g} is more than "
                                          f"{NORM_OUTLIER_FACTOR:g}x the round median")
            candidates = [c for c, ok in zip(candidates, keep, strict=True) if ok]
        accepted = []
        for message, state in candidates:
            # Flower's aggregation reads one ArrayRecord and one MetricRecord; fp32 updates
            # are passed on as received, half-precision ones re-encoded in fp32.
            arrays = (message.content["arrays"] if self.wire_precision == "fp32"
                      else state_to_record(state))
            message.content = RecordDict({"arrays": arrays,
                                          "metrics": message.content["metrics"]})
            accepted.append(message)
        errors = [m for m in replies if m.has_error()]
        return super().aggregate_train(server_round, accepted + errors)

    def _decoded(self, message: Message) -> dict[str, np.ndarray]:
        return from_wire(record_to_state(message.content["arrays"]), self.wire_precision)

    def _reject(self, message: Message, reason: str) -> None:
        self.rejected.append({"node_id": message.metadata.src_node_id, "reason": reason})


class ValidatedFedAvg(ValidatedUpdates, FedAvg):
    """FedAvg (McMahan et al. 2017)."""


class ValidatedFedProx(ValidatedUpdates, FedProx):
    """FedProx (Li et al. 2020): FedAvg plus the client-side proximal term."""


class ValidatedFedAdam(ValidatedUpdates, FedAdam):
    """FedAdam (Reddi et al. 2021): server-side Adam on the averaged update."""


class ValidatedFedMedian(ValidatedUpdates, FedMedian):
    """Coordinate-wise median (Yin et al. 2018), robust to a minority of bad updates."""


class ValidatedFedTrimmedAvg(ValidatedUpdates, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018)."""


def _common(config: RunConfig) -> dict:
    n = config.min_train_nodes
    return {"min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}


# Strategy name -> factory from the run config. FedBN is FedAvg whose clients keep BatchNorm.
STRATEGIES: dict[str, Callable[[RunConfig], ValidatedUpdates]] = {
    "fedavg": lambda c: ValidatedFedAvg(**_common(c)),
    "fedbn": lambda c: ValidatedFedAvg(**_common(c)),
    "fedprox": lambda c: ValidatedFedProx(proximal_mu=c.proximal_mu, **_common(c)),
    "fedadam": lambda c: ValidatedFedAdam(eta=c.server_learning_rate, **_common(c)),
    "fedmedian": lambda c: ValidatedFedMedian(**_common(c)),
    "fedtrimmedavg": lambda c: ValidatedFedTrimmedAvg(beta=c.trim_fraction, **_common(c)),
}


def create_strategy(config: RunConfig, batchnorm: set[str]) -> ValidatedUpdates:
    """The configured strategy, decoding updates sent in ``config.wire_precision``.

    ``batchnorm`` names the model's BatchNorm tensors, which stay local under FedBN.
    """
    strategy = STRATEGIES[config.strategy](config)
    strategy.wire_precision = config.wire_precision
    if config.strategy == "fedbn":
        strategy.local_keys = frozenset(batchnorm)
    return strategy

"""The one Flower strategy: Flower's FedAvg messaging, replies validated, aggregation by the method.

Every method of ``common.methods`` runs through :class:`MethodStrategy`: Flower's ``FedAvg``
samples the sites and builds the train and evaluate messages; before aggregation each training
reply is decoded from its wire precision and checked (non-finite values, unknown or missing
keys, wrong shapes, a missing or non-positive ``num-examples``, and an update norm far above
the round's median are rejected and recorded in ``rejected``); the accepted updates are then
aggregated by the method (numpy over named arrays). Validation replies are pooled by
``common.selection.combine_site_reports`` (confusion counts summed). Flower's
``DifferentialPrivacyClientSideFixedClipping`` wraps it as any Flower strategy
(``server.privacy``).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import ConfigError, RunConfig
from common.methods import Method
from common.selection import WEIGHT_KEY, combine_site_reports, usable_reports
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


class MethodStrategy(FedAvg):
    """Flower's FedAvg sampling and messages for any method: training replies are validated,
    then aggregated by ``method`` over the tensors its sites send (``sent_keys``)."""

    def __init__(self, method: Method, config: RunConfig, sent_keys: Iterable[str]) -> None:
        nodes = config.min_train_nodes
        super().__init__(min_train_nodes=nodes, min_evaluate_nodes=nodes,
                         min_available_nodes=nodes, weighted_by_key=WEIGHT_KEY)
        self.method = method
        self.wire_precision = config.wire_precision
        self.sent_keys = frozenset(sent_keys)
        self.rejected: list[dict] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = {k: v for k, v in record_to_state(arrays).items()
                             if k in self.sent_keys}
        self.rejected = []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's aggregate of the accepted updates (None when none is accepted) and
        the training metrics averaged over them by images."""
        accepted = self._accepted([m for m in replies if not m.has_error()])
        if not accepted:
            return None, None
        weights = [float(message.content["metrics"][WEIGHT_KEY]) for message, _ in accepted]
        aggregated = self.method.aggregate([state for _, state in accepted], weights,
                                           self.global_state, server_round)
        arrays = state_to_record({key: np.asarray(value, dtype=self.global_state[key].dtype)
                                  for key, value in aggregated.items()})
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in accepted], WEIGHT_KEY)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The sites' usable reports pooled (see ``common.selection``)."""
        reports = usable_reports([dict(m.content["metrics"]) for m in replies
                                  if not m.has_error() and "metrics" in m.content.metric_records])
        return MetricRecord(combine_site_reports(reports)) if reports else None

    def _accepted(self, replies: list[Message]) -> list[tuple[Message, dict[str, np.ndarray]]]:
        """Replies whose update passes every check, with their decoded tensors."""
        candidates = []
        for message in replies:
            problem = reply_problem(message.content)
            if problem is None:
                state = from_wire(record_to_state(message.content["arrays"]),
                                  self.wire_precision)
                problem = update_problem(state, self.global_state)
            if problem:
                self._reject(message, problem)
            else:
                candidates.append((message, state))
        distances = [update_distance(state, self.global_state) for _, state in candidates]
        if len(candidates) < 3:
            return candidates
        limit = NORM_OUTLIER_FACTOR * max(float(np.median(distances)), 1e-12)
        for (message, _), distance in zip(candidates, distances, strict=True):
            if distance > limit:
                self._reject(message, f"update norm {distance:.3g} is more than "
                                      f"{NORM_OUTLIER_FACTOR:g}x the round median")
        return [c for c, d in zip(candidates, distances, strict=True) if d <= limit]

    def _reject(self, message: Message, reason: str) -> None:
        self.rejected.append({"node_id": message.metadata.src_node_id, "reason": reason})


def reply_problem(content: RecordDict) -> str | None:
    """Why a training reply carries no usable update and weight, or None."""
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        return "the reply lacks its 'arrays' or 'metrics' record"
    weight = content["metrics"].get(WEIGHT_KEY)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
        return f"{WEIGHT_KEY} must be a positive number, got {weight!r}"
    return None


def create_strategy(config: RunConfig, method: Method, sent_keys: Iterable[str],
                    ) -> MethodStrategy:
    """The strategy of a federated ``method``; refuses a method that is not federated."""
    if not method.federated:
        raise ConfigError("strategy", "a federated method (pooled and local train in one "
                          "place: run them with `cytofed loco --strategies`)", config.strategy)
    return MethodStrategy(method, config, sent_keys)

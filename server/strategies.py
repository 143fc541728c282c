"""The one Flower strategy: Flower's FedAvg messaging, replies checked, aggregation by the method.

Every method of ``common.methods`` runs through :class:`MethodStrategy`: Flower's ``FedAvg``
samples the sites and builds the train and evaluate messages. Every reply is checked against
its schema (``server.replies``) before anything is aggregated or stored, one reply at a time:
the records and keys, their types and ranges, and for a training reply its update, tensor by
tensor, keeping only its distance to the global model. An update is rejected when it fails its
schema, when its distance exceeds ``max-update-norm``, or, with three or more updates, when it
is more than ``NORM_OUTLIER_FACTOR`` times the round's median distance. Rejected replies are
listed in ``rejected`` with their reason; the round goes on with the others. The accepted
updates are aggregated by the method, which reads them one tensor at a time, and the aggregate
replaces the global model only when it is finite. Validation reports are pooled by
``common.selection.combine_site_reports``. ``server.privacy`` wraps the strategy for
differential privacy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import ConfigError, RunConfig
from common.methods import Method
from common.selection import WEIGHT_KEY, combine_site_reports
from server.replies import BadReply, Expected, WireState, check_reply, check_update

# An update whose distance to the global model exceeds this multiple of the round's median
# distance is rejected (only with three or more updates, so a median exists).
NORM_OUTLIER_FACTOR = 10.0
AGGREGATE = "aggregate"  # the ``reply`` of a rejection of the round's aggregate itself


def record_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Named numpy arrays of an ArrayRecord."""
    return {key: array.numpy() for key, array in record.items()}


def state_to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of named numpy arrays (order kept)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in state.items()})


def non_finite(state: Mapping[str, np.ndarray]) -> str | None:
    """The first tensor of ``state`` holding NaN or Inf, or None."""
    return next((key for key, value in state.items() if not np.all(np.isfinite(value))), None)


class MethodStrategy(FedAvg):
    """Flower's FedAvg sampling and messages for any method: every reply is checked against
    ``expected`` (``server.replies``), then training updates are aggregated by ``method``
    over the tensors its sites send (``sent_keys``).

    Per round: ``rejected`` (node, reply kind and reason of every refused reply), ``clients``
    (each answering training site's checked centre, class counts and metrics; only its node
    when its reply was refused) and ``eval_seconds`` (each checked validation report's time).
    """

    def __init__(self, method: Method, config: RunConfig, sent_keys: Iterable[str],
                 expected: Expected) -> None:
        nodes = config.min_train_nodes
        super().__init__(min_train_nodes=nodes, min_evaluate_nodes=nodes,
                         min_available_nodes=nodes, weighted_by_key=WEIGHT_KEY)
        self.method = method
        self.expected = expected
        self.wire_precision = config.wire_precision
        self.max_update_norm = config.max_update_norm
        self.sent_keys = frozenset(sent_keys)
        self.global_state: dict[str, np.ndarray] = {}
        self.rejected: list[dict] = []
        self.clients: list[dict] = []
        self.eval_seconds: list[float] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.global_state = {k: v for k, v in record_to_state(arrays).items()
                             if k in self.sent_keys}
        self.rejected, self.clients, self.eval_seconds = [], [], []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's aggregate of the accepted updates and the training metrics averaged
        over them by images; no arrays when none is accepted or the aggregate is not finite
        (the round keeps the previous global model)."""
        accepted = self.accept_train(replies)
        if not accepted:
            return None, None
        aggregated = self.method.aggregate(
            [self.update(m) for m in accepted],
            [m.content["metrics"][WEIGHT_KEY] for m in accepted], self.global_state,
            server_round)
        with np.errstate(over="ignore"):  # an overflow is caught as non-finite below
            aggregated = {key: np.asarray(value, dtype=self.global_state[key].dtype)
                          for key, value in aggregated.items()}
        metrics = self.train_metrics(accepted)
        if (key := non_finite(aggregated)) is not None:
            self.reject_aggregate(f"{key} of the aggregate is not finite: the round keeps the "
                                  "previous global model")
            return None, metrics
        return state_to_record(aggregated), metrics

    def accept_train(self, replies: Iterable[Message]) -> list[Message]:
        """The training replies that pass every check (records, update, norm bounds), each
        checked alone; the others are rejected. Fills ``clients``."""
        candidates: list[tuple[Message, float]] = []
        for message in replies:
            if message.has_error():
                continue
            node = message.metadata.src_node_id
            try:
                records = check_reply(message, "train", self.expected)
            except BadReply as problem:
                self.clients.append({"node_id": node})
                self.reject(message, "train", str(problem))
                continue
            self.clients.append({"node_id": node, **records["site"], **records["metrics"]})
            try:
                distance = check_update(message.content["arrays"], self.global_state,
                                        self.wire_precision)
            except BadReply as problem:
                self.reject(message, "train", str(problem))
                continue
            if distance > self.max_update_norm:
                self.reject(message, "train", f"update norm {distance:.3g} exceeds "
                                              f"max-update-norm {self.max_update_norm:g}")
                continue
            candidates.append((message, distance))
        if len(candidates) < 3:
            return [message for message, _ in candidates]
        limit = NORM_OUTLIER_FACTOR * max(float(np.median([d for _, d in candidates])), 1e-12)
        for message, distance in candidates:
            if distance > limit:
                self.reject(message, "train", f"update norm {distance:.3g} is more than "
                                              f"{NORM_OUTLIER_FACTOR:g}x the round median")
        return [message for message, distance in candidates if distance <= limit]

    def update(self, message: Message) -> WireState:
        """An accepted reply's update, decoded one tensor at a time as it is read."""
        return WireState(message.content["arrays"], self.global_state, self.wire_precision)

    def train_metrics(self, accepted: list[Message]) -> MetricRecord | None:
        """The accepted replies' training metrics averaged by images."""
        return self.train_metrics_aggr_fn([m.content for m in accepted], WEIGHT_KEY)

    def aggregate_evaluate(self, server_round: int,
                           replies: Iterable[Message]) -> MetricRecord | None:
        """The sites' checked validation reports pooled (see ``common.selection``)."""
        reports = self.site_reports(replies, "val")
        self.eval_seconds = [report.pop("eval_seconds") for report in reports]
        pooled = combine_site_reports([{k: v for k, v in r.items() if k != "centre"}
                                       for r in reports])
        return MetricRecord(pooled) if pooled else None

    def site_reports(self, replies: Iterable[Message], split: str) -> list[dict]:
        """The checked reports of the sites on ``split`` (``val`` or ``test``), each with its
        centre; a report that fails its schema is rejected."""
        reports = []
        for message in replies:
            if message.has_error():
                continue
            try:
                records = check_reply(message, split, self.expected)
            except BadReply as problem:
                self.reject(message, split, str(problem))
                continue
            reports.append({**records["site"], **records["metrics"]})
        return reports

    def reject(self, message: Message, reply: str, reason: str) -> None:
        self.rejected.append({"node_id": message.metadata.src_node_id, "reply": reply,
                              "reason": reason})

    def reject_aggregate(self, reason: str) -> None:
        """Say that the round's aggregate did not replace the global model, and why."""
        print(f"[cytofed] {reason}", flush=True)
        self.rejected.append({"node_id": None, "reply": AGGREGATE, "reason": reason})


def create_strategy(config: RunConfig, method: Method, sent_keys: Iterable[str],
                    expected: Expected) -> MethodStrategy:
    """The strategy of a federated ``method``; refuses a method that is not federated."""
    if not method.federated:
        raise ConfigError("strategy", "a federated method (pooled and local train in one "
                          "place: run them with `cytofed loco --strategies`)", config.strategy)
    return MethodStrategy(method, config, sent_keys, expected)

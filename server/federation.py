"""The round loop: train, validate on sites, evaluate on the held-out centre, checkpoint.

Flower's ``Strategy.start`` always begins at round 1; this loop drives the same strategy
methods from any round so that a restarted ServerApp resumes after the last completed one,
and it records who was sampled, who answered, who failed and whose update was rejected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.strategies import ValidatedUpdates


@dataclass
class RoundResult:
    """What one round produced; ``held_out`` holds the server-side held-out metrics."""

    round: int
    train: dict[str, float]
    validation: dict[str, float]
    held_out: dict
    seconds: float
    sampled: int
    replied: int
    clients: list[dict] = field(default_factory=list)
    dropped: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _failures(sampled: list[int], replies: list[Message]) -> list[dict]:
    """Sampled nodes that returned an error or nothing at all."""
    answered = {m.metadata.src_node_id for m in replies}
    failed = [{"node_id": m.metadata.src_node_id, "reason": m.error.reason}
              for m in replies if m.has_error()]
    missing = [{"node_id": n, "reason": "no reply before the round timeout"}
               for n in sampled if n not in answered]
    return failed + missing


def client_reports(replies: list[Message]) -> list[dict]:
    """Per-site aggregates of a training round: centre, class counts and training metrics."""
    reports = []
    for message in replies:
        if message.has_error():
            continue
        site = message.content.config_records.get("site", {})
        reports.append({"node_id": message.metadata.src_node_id, **dict(site),
                        **dict(message.content["metrics"])})
    return reports


def merge_arrays(previous: ArrayRecord, update: ArrayRecord | None) -> ArrayRecord:
    """The previous global arrays overwritten by the aggregated ones (FedBN leaves BN as is)."""
    if update is None:
        return previous
    merged = ArrayRecord()
    for key in previous:
        merged[key] = update[key] if key in update else previous[key]
    return merged


def run_rounds(strategy: ValidatedUpdates, grid: Grid, arrays: ArrayRecord, first_round: int,
               num_rounds: int, train_config: ConfigRecord,
               evaluate_held_out: Callable[[int, ArrayRecord], dict],
               on_round_end: Callable[[RoundResult, ArrayRecord], None],
               timeout: float = 3600.0) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; ``on_round_end`` persists each completed round."""
    for server_round in range(first_round, num_rounds + 1):
        started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        clients = client_reports(replies)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        arrays = merge_arrays(arrays, aggregated)
        validation = strategy.aggregate_evaluate(server_round, grid.send_and_receive(
            strategy.configure_evaluate(server_round, arrays, ConfigRecord(), grid),
            timeout=timeout))
        result = RoundResult(
            round=server_round, train=_plain(train_metrics), validation=_plain(validation),
            held_out=evaluate_held_out(server_round, arrays),
            seconds=time.perf_counter() - started, sampled=len(sampled),
            replied=len(clients), clients=clients,
            dropped=_failures(sampled, replies), rejected=list(strategy.rejected))
        on_round_end(result, arrays)
    return arrays


def _plain(record: MetricRecord | None) -> dict[str, float]:
    return dict(record) if record else {}

"""The round loop: train, validate on sites, evaluate on the held-out centre, checkpoint.

Flower's ``Strategy.start`` always begins at round 1; this loop drives the same strategy
methods from any round so that a restarted ServerApp resumes after the last completed one,
and it records who was sampled, who answered, who failed and whose update was rejected. After
the last round ``server.calibration`` scores the selected model at the sites.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.privacy import PrivateUpdates
from server.recorder import RoundResult
from server.replies import error_reason
from server.strategies import MethodStrategy

# Between pulls for replies, wait this share of the time waited so far, within POLL_BOUNDS
# seconds: a reply waits at most ~1% of its phase to be noticed. (Flower's ``send_and_receive``
# sleeps a fixed 0.1 s in simulation and 3 s against a SuperLink between pulls.)
POLL_SHARE = 0.01
POLL_BOUNDS = (0.005, 1.0)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds pass.

    A message the grid did not accept (no id) gets no reply; callers list it as missing.
    """
    pending = {message_id for message_id in grid.push_messages(messages) if message_id}
    replies: list[Message] = []
    started = time.monotonic()
    while pending:
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        waited = time.monotonic() - started
        if not pending or waited >= timeout:
            break
        low, high = POLL_BOUNDS
        time.sleep(min(max(waited * POLL_SHARE, low), high, timeout - waited))
    return replies


def _failures(sent: list[Message], replies: list[Message]) -> list[dict]:
    """Sampled nodes that returned an error or nothing at all.

    A reply is matched to its node through the message it answers: when a node goes offline
    mid-round the SuperLink answers in its place, with its own id as the sender.
    """
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    answers = {node_of.get(m.metadata.reply_to_message_id, m.metadata.src_node_id): m
               for m in replies}
    failed = [{"node_id": node, "reason": error_reason(m)}
              for node, m in answers.items() if m.has_error()]
    missing = [{"node_id": n, "reason": "no reply before the round timeout"}
               for n in node_of.values() if n not in answers]
    return failed + missing


def merge_arrays(previous: ArrayRecord, update: ArrayRecord | None) -> ArrayRecord:
    """The previous global arrays overwritten by the aggregated ones (tensors that no site
    sends keep their values)."""
    if update is None:
        return previous
    merged = ArrayRecord()
    for key in previous:
        merged[key] = update[key] if key in update else previous[key]
    return merged


def run_rounds(strategy: MethodStrategy | PrivateUpdates, grid: Grid, arrays: ArrayRecord,
               first_round: int, num_rounds: int, train_config: ConfigRecord,
               global_model: Callable[[ArrayRecord], ArrayRecord],
               evaluate_held_out: Callable[[int, ArrayRecord], dict[str, dict | None]],
               on_round_end: Callable[[RoundResult, ArrayRecord, ArrayRecord], None],
               timeout: float) -> ArrayRecord:
    """Run rounds ``first_round..num_rounds``; returns the weights the last round trained.

    Each round the sites train from ``arrays``; the aggregate is the next ``arrays``, and
    ``global_model`` of it is what the sites validate and the server scores on the held-out
    centre. ``on_round_end(result, arrays, global)`` persists each completed round.
    """
    for server_round in range(first_round, num_rounds + 1):
        started = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, train_config, grid))
        sampled = [m.metadata.dst_node_id for m in messages]
        replies = exchange(grid, messages, timeout)
        aggregated, train_metrics = strategy.aggregate_train(server_round, replies)
        clients = list(strategy.clients)  # checked: centre, class counts, training metrics
        arrays = merge_arrays(arrays, aggregated)
        exported = global_model(arrays)
        evaluations = exchange(
            grid, strategy.configure_evaluate(server_round, exported, ConfigRecord(), grid),
            timeout)
        validation = strategy.aggregate_evaluate(server_round, evaluations)
        held_out_started = time.perf_counter()
        held_out = evaluate_held_out(server_round, exported)
        finished = time.perf_counter()
        result = RoundResult(
            round=server_round, train=_plain(train_metrics), validation=_plain(validation),
            **held_out, seconds=finished - started, sampled=len(sampled),
            replied=len(clients), clients=clients,
            dropped=_failures(messages, replies), rejected=list(strategy.rejected),
            site_eval_seconds=list(strategy.eval_seconds),
            held_out_seconds=finished - held_out_started)
        on_round_end(result, arrays, exported)
    return arrays


def _plain(record: MetricRecord | None) -> dict[str, float]:
    return dict(record) if record else {}

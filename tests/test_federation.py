"""The server's reply loop: every reply collected, unaccepted messages and timeouts handled."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from common.config import RunConfig
from common.methods import create_method
from server import federation
from server.federation import exchange, score_test_splits
from server.strategies import create_strategy, state_to_record
from tests.replies import EXPECTED, report_content

pytestmark = pytest.mark.usefixtures("server_task")


class DelayedGrid:
    """Replies to message i on the pull after ``delays[i]`` seconds; ``None`` in ``refused``
    positions stands for a message the SuperLink did not accept."""

    def __init__(self, delays: list[float], refused: tuple[int, ...] = ()) -> None:
        self.delays, self.refused = delays, refused
        self.pulls = 0

    def push_messages(self, messages):
        self.sent = list(messages)
        self.pushed_at = time.monotonic()
        ids = []
        for i, message in enumerate(self.sent):
            message.metadata.__dict__["_message_id"] = message.object_id
            ids.append(None if i in self.refused else message.metadata.message_id)
        self.delivered: set[int] = set()
        return ids

    def pull_messages(self, message_ids):
        self.pulls += 1
        waited = time.monotonic() - self.pushed_at
        ready = [i for i, m in enumerate(self.sent) if m.metadata.message_id in set(message_ids)
                 and i not in self.delivered and waited >= self.delays[i]]
        self.delivered.update(ready)
        return [Message(RecordDict({"config": ConfigRecord({"i": i})}), reply_to=self.sent[i])
                for i in ready]


def messages(count: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node + 1,
                    message_type="query.class_counts") for node in range(count)]


def test_all_replies_are_collected_polling_at_a_share_of_the_wait(
        monkeypatch: pytest.MonkeyPatch):
    sleeps: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(federation.time, "sleep", lambda s: (sleeps.append(s), real_sleep(s)))
    grid = DelayedGrid([0.0, 0.05, 0.2])
    started = time.monotonic()
    replies = exchange(grid, messages(3), timeout=10)
    elapsed = time.monotonic() - started
    assert sorted(r.content["config"]["i"] for r in replies) == [0, 1, 2]
    # Each pause is the floor or 1% of the time waited so far (never Flower's 0.1 s or 3 s),
    # so the last reply is noticed within that much of its arrival.
    low, _ = federation.POLL_BOUNDS
    assert grid.pulls == len(sleeps) + 1 > 3
    assert max(sleeps) <= max(low, federation.POLL_SHARE * elapsed)


def test_a_message_the_grid_refused_is_not_waited_for():
    grid = DelayedGrid([0.0, 0.0, 0.0], refused=(1,))
    replies = exchange(grid, messages(3), timeout=30)
    assert sorted(r.content["config"]["i"] for r in replies) == [0, 2]


def test_stops_at_the_timeout_with_the_replies_so_far(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(federation, "POLL_BOUNDS", (0.005, 0.05))
    grid = DelayedGrid([0.0, 60.0])
    started = time.monotonic()
    replies = exchange(grid, messages(2), timeout=0.3)
    assert [r.content["config"]["i"] for r in replies] == [0]
    assert 0.3 <= time.monotonic() - started < 5


class SitesGrid(DelayedGrid):
    """Two sites that answer every message at once with a test-split report."""

    def __init__(self) -> None:
        super().__init__([0.0, 0.0])

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def pull_messages(self, message_ids):
        centre = {1: "lab-a", 2: "lab-b"}
        return [Message(report_content("test", [1, 0, 0, 1], centre[m.metadata.dst_node_id]),
                        reply_to=m)
                for m in self.sent if m.metadata.message_id in set(message_ids)]


def test_every_site_scores_the_selected_model_on_its_test_split():
    """The test split reaches evaluation: one evaluate message per site asking for
    ``split=test``; the sites' aggregate reports come back with their centres."""
    config = RunConfig()
    weights = {"fc.bias": np.zeros(2, np.float32)}
    grid = SitesGrid()
    strategy = create_strategy(config, create_method(config), weights, EXPECTED)
    reports = score_test_splits(strategy, grid, state_to_record(weights), 3, timeout=10)
    assert sorted(r["centre"] for r in reports) == ["lab-a", "lab-b"]
    assert all(r["test_confusion_matrix"] == [1, 0, 0, 1] for r in reports)
    assert [m.metadata.message_type for m in grid.sent] == ["evaluate"] * 2
    assert all(m.content["config"]["split"] == "test" for m in grid.sent)

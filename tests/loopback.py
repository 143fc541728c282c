"""The real ServerApp and ClientApp in one process: a Grid that serialises every message.

:class:`LoopbackGrid` is the part of Flower's ``Grid`` the ServerApp uses. It encodes each
message as Flower's protobuf (the bytes a SuperLink would carry), hands the decoded copy to
the ClientApp with the node's own ``Context``, and encodes and decodes the reply the same
way, keeping the reply's bytes in ``wire`` for tests that look at what left a site.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity


def over_the_wire(message: Message) -> tuple[Message, bytes]:
    """The message as the receiver decodes it, and its encoded bytes."""
    proto = message_to_proto(message)
    return message_from_proto(proto), proto.SerializeToString()


@dataclass
class LoopbackGrid:
    """Nodes 1..n served by ``client_app``; node ``i`` is ``partition-id`` i - 1."""

    client_app: ClientApp
    run_config: dict
    num_nodes: int
    wire: list[tuple[int, str, bytes]] = field(default_factory=list)  # node, type, reply bytes
    _replies: dict[str, Message] = field(default_factory=dict)
    _contexts: dict[int, Context] = field(default_factory=dict)

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def context(self, node_id: int) -> Context:
        """The node's context, kept between messages as a SuperNode keeps it."""
        if node_id not in self._contexts:
            self._contexts[node_id] = Context(
                run_id=1, node_id=node_id, node_config={"partition-id": node_id - 1},
                state=RecordDict(), run_config=self.run_config)
        return self._contexts[node_id]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id
            received, _ = over_the_wire(message)
            node = message.metadata.dst_node_id
            reply = self.client_app(received, self.context(node))
            reply.metadata.__dict__["_message_id"] = reply.object_id
            delivered, data = over_the_wire(reply)
            self.wire.append((node, message.metadata.message_type, data))
            self._replies[message.object_id] = delivered
            ids.append(message.object_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]


@contextmanager
def server_task() -> Iterator[None]:
    """Messages are created as by a ServerApp task of run 1."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            patch.setattr(TaskIdentity, name, value)
        yield

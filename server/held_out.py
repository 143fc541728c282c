"""Where the held-out centre is scored: in the ServerApp or at the centre's own site.

``held-out-evaluation = "server"`` (simulation, where every centre is local) loads the
held-out centre's images into the ServerApp. ``"site"`` (deployment) leaves them at the
held-out centre: its evaluator SuperNode (``cytofed site --role evaluator``,
``client.evaluator``) scores each round's global model and sends back only the metrics, so
the ServerApp opens no image at all, and never samples that node for training or validation.
Both produce the fields of :func:`common.pipeline.score_held_out`. Every way is one small
class in :data:`HELD_OUT_EVALUATORS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from common.config import ConfigError, RunConfig
from common.data import CentreSpec
from common.duplicates import load_held_out
from common.evaluator_protocol import EVALUATOR, HELD_OUT_MESSAGE, ROLE_QUERY, decode_held_out
from common.pipeline import place
from common.taxonomy import TAXONOMIES
from server.evaluation import evaluate_held_out
from server.federation import exchange
from server.production import is_simulation
from server.replies import BadReply, Expected, check_reply, error_reason
from server.strategies import record_to_state

# Seconds between looks for the evaluator site, and between asking it again after a failure.
RETRY_SECONDS = 10.0
ROLE_QUERY_TIMEOUT = 120.0  # a node that has not told its role by then is a training site


class ServerHeldOut:
    """The ServerApp scores the held-out centre on its own copy of the images."""

    def __init__(self, config: RunConfig, spec: CentreSpec, grid: Grid,
                 training: Sequence[CentreSpec] = ()) -> None:
        self.config, self.training_grid = config, grid
        self.data = load_held_out(spec, training, config)  # without images training has too
        self.classes, self.stats = self.data.classes, self.data.stats
        self.images = place(self.data, config)

    def evaluate(self, server_round: int, model: nn.Module, arrays: ArrayRecord,
                 temperature: float = 1.0) -> dict[str, dict | None]:
        return evaluate_held_out(model, record_to_state(arrays), self.data, self.config,
                                 self.images, temperature)


class SiteHeldOut:
    """The held-out centre's evaluator site scores it; the server sees only the metrics."""

    def __init__(self, config: RunConfig, spec: CentreSpec, grid: Grid,
                 training: Sequence[CentreSpec] = ()) -> None:
        if is_simulation(grid):
            raise ConfigError("held-out-evaluation", "'server' in a simulation (no evaluator "
                              "site can join one)", config.held_out_evaluation)
        self.config, self.grid = config, grid
        self.classes = TAXONOMIES[spec.taxonomy]
        self.expected = Expected(len(self.classes), frozenset(c.name for c in training),
                                 config.held_out, config.max_site_images)
        self.stats = {"training_centres_unchecked": len(training)}  # no image reaches us
        self.node_id, evaluators = find_evaluator(grid, config, self.expected)
        self.training_grid = TrainingSitesGrid(grid, evaluators)

    def evaluate(self, server_round: int, model: nn.Module, arrays: ArrayRecord,
                 temperature: float = 1.0) -> dict[str, dict | None]:
        """The evaluator's metrics of ``arrays`` at ``temperature``, asked again until
        ``round-timeout`` passes.

        Raises RuntimeError when no valid answer came: the round is not recorded, and the
        same `flwr run` started again resumes after the last completed round.
        """
        deadline = time.monotonic() + self.config.round_timeout
        while True:
            message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
                {"server-round": server_round, "temperature": temperature})}),
                dst_node_id=self.node_id, message_type=HELD_OUT_MESSAGE)
            replies = exchange(self.grid, [message], max(deadline - time.monotonic(), 1.0))
            try:
                return held_out_metrics(replies, self.classes, self.expected)
            except ValueError as error:
                problem = (f"held-out evaluator site (node {self.node_id}), round "
                           f"{server_round}: {error}")
            if time.monotonic() + RETRY_SECONDS >= deadline:
                raise RuntimeError(f"{problem}; no valid held-out metrics within the round "
                                   "timeout, the run stops")
            print(f"[cytofed] {problem}; asking again in {RETRY_SECONDS:.0f}s", flush=True)
            time.sleep(RETRY_SECONDS)


# held-out-evaluation -> where the held-out centre is scored.
HELD_OUT_EVALUATORS: dict[str, type[ServerHeldOut | SiteHeldOut]] = {
    "server": ServerHeldOut,
    "site": SiteHeldOut,
}


def open_held_out(config: RunConfig, spec: CentreSpec, training: list[CentreSpec],
                  grid: Grid) -> ServerHeldOut | SiteHeldOut:
    """The configured held-out evaluation of ``spec`` (``training``: the training centres):
    ``classes``, ``stats`` (its load counts), ``training_grid`` (the grid the strategy samples
    from) and ``evaluate(server_round, model, arrays)``."""
    return HELD_OUT_EVALUATORS[config.held_out_evaluation](config, spec, grid, training)


def held_out_metrics(replies: list[Message], classes: tuple[str, ...],
                     expected: Expected) -> dict[str, dict | None]:
    """The checked metrics of the evaluator's one reply (``server.replies``, then every field
    of the metrics); ValueError says what is wrong."""
    if not replies:
        raise ValueError("no reply")
    [reply] = replies
    if reply.has_error():
        raise ValueError(f"it answered with an error: {error_reason(reply)}")
    record = check_reply(reply, "held_out", expected)["held-out"]
    return decode_held_out(record["metrics"], classes)


def find_evaluator(grid: Grid, config: RunConfig, expected: Expected) -> tuple[int, set[int]]:
    """The node id of the held-out centre's evaluator site, and those of every node in the
    evaluator role; waits up to ``round-timeout`` seconds for it to come online.

    A node is trusted as the evaluator only if it says so (role query) and the operator
    registered its key under the held-out centre's name (``flwr supernode register ...
    --name <centre>``): a training site cannot make itself the judge.
    """
    deadline = time.monotonic() + config.round_timeout
    waiting = False
    while True:
        names = {node.node_id: node.name for node in grid.get_nodes()}
        roles = node_roles(grid, list(names), min(config.round_timeout, ROLE_QUERY_TIMEOUT),
                           expected)
        evaluators = {node for node, (role, _) in roles.items() if role == EVALUATOR}
        claiming = sorted(n for n in evaluators if roles[n][1] == config.held_out)
        matching = [n for n in claiming if names[n] == config.held_out]
        for node in sorted(set(claiming) - set(matching)):
            print(f"[cytofed] node {node} says it is the evaluator of {config.held_out!r} but "
                  f"was registered as {names[node]!r}: not trusted", flush=True)
        if len(matching) > 1:
            raise RuntimeError(f"{len(matching)} evaluator sites hold centre "
                               f"{config.held_out!r} (nodes {matching}): stop all but one")
        if matching:
            print(f"[cytofed] held-out centre {config.held_out!r} is scored at its evaluator "
                  f"site (node {matching[0]})", flush=True)
            return matching[0], evaluators
        if time.monotonic() + RETRY_SECONDS >= deadline:
            raise RuntimeError(f"no evaluator site of the held-out centre {config.held_out!r} "
                               "came online within the round timeout; start `cytofed site "
                               "--role evaluator` at that centre, its key registered with "
                               f"--name {config.held_out}")
        if not waiting:
            print(f"[cytofed] waiting for the evaluator site of the held-out centre "
                  f"{config.held_out!r}", flush=True)
            waiting = True
        time.sleep(RETRY_SECONDS)


def node_roles(grid: Grid, nodes: list[int], timeout: float,
               expected: Expected) -> dict[int, tuple[str, str]]:
    """(role, centre) of every node that answers the role query as ``server.replies`` asks
    (the others are training sites)."""
    replies = exchange(grid, [Message(RecordDict({"config": ConfigRecord({})}),
                                      dst_node_id=node, message_type=ROLE_QUERY)
                              for node in nodes], timeout)
    roles = {}
    for reply in replies:
        try:
            record = check_reply(reply, "role", expected)["role"]
        except BadReply:
            continue
        roles[reply.metadata.src_node_id] = (record["role"], record["centre"])
    return roles


class TrainingSitesGrid(Grid):
    """A grid that hides the evaluator sites from sampling; everything else is delegated."""

    def __init__(self, grid: Grid, hidden: set[int]) -> None:
        self.grid, self.hidden = grid, frozenset(hidden)

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.grid.get_node_ids() if node not in self.hidden]

    def get_nodes(self) -> Iterable[Any]:
        return [node for node in self.grid.get_nodes() if node.node_id not in self.hidden]

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, *args: Any, **kwargs: Any) -> Iterable[Message]:
        return self.grid.send_and_receive(*args, **kwargs)

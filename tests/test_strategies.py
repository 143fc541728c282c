"""The method strategy on real Flower messages and client mods: update validation before
aggregation, each method's aggregate (the same as Flower's own strategies), FedBN's global
model, pooled validation and dropped sites (differential privacy: ``tests/test_privacy.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg

from client.faults import fault_injection_mod
from common.config import ConfigError, RunConfig
from common.methods import create_method
from common.weights import to_wire
from server.federation import _failures
from server.strategies import (
    NORM_OUTLIER_FACTOR,
    MethodStrategy,
    create_strategy,
    record_to_state,
    state_to_record,
)
from tests.replies import EXPECTED, report_content, train_content

GLOBAL = {"conv.weight": np.zeros((2, 3), np.float32), "fc.bias": np.zeros(4, np.float32)}


class FakeGrid:
    """The part of Flower's Grid a strategy samples nodes from."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


pytestmark = pytest.mark.usefixtures("server_task")


def strategy_for(config: RunConfig, state: dict[str, np.ndarray] = GLOBAL) -> MethodStrategy:
    """The strategy of ``config``'s method for a model with ``state``'s tensors."""
    return create_strategy(config, create_method(config), state, EXPECTED)


def shifted(value: float, state: dict[str, np.ndarray] = GLOBAL) -> dict[str, np.ndarray]:
    return {key: array + np.float32(value) for key, array in state.items()}


def reply(message: Message, state: dict[str, np.ndarray] | None, examples: int = 10) -> Message:
    """A site's training reply as the ClientApp builds it, or an error when ``state`` is None."""
    if state is None:
        return Message(error=Error(code=0, reason="site-error:data"), reply_to=message)
    return Message(content=train_content(state, examples), reply_to=message)


def train_round(strategy: MethodStrategy, updates: dict[int, dict | None],
                ) -> tuple[dict[str, np.ndarray] | None, list[Message]]:
    """One round of ``strategy`` in which node ``n`` answers with ``updates[n]``."""
    messages = list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                             FakeGrid(list(updates))))
    replies = [reply(m, updates[m.metadata.dst_node_id]) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    return (record_to_state(arrays) if arrays is not None else None), replies


def rejected_nodes(strategy: MethodStrategy) -> dict[int, str]:
    return {item["node_id"]: item["reason"] for item in strategy.rejected}


def test_nan_inf_wrong_keys_and_shapes_are_rejected_and_the_rest_averaged():
    strategy = strategy_for(RunConfig(min_train_nodes=2))
    wrong_shape = {**shifted(1.0), "fc.bias": np.zeros(5, np.float32)}
    infinite = shifted(1.0)
    infinite["fc.bias"][0] = np.inf
    aggregated, _ = train_round(strategy, {
        1: shifted(1.0), 2: shifted(3.0), 3: {**shifted(1.0), "extra": np.ones(1, np.float32)},
        4: wrong_shape, 5: infinite, 6: {"conv.weight": GLOBAL["conv.weight"]}})
    reasons = rejected_nodes(strategy)
    assert sorted(reasons) == [3, 4, 5, 6]
    assert "unknown ['extra']" in reasons[3] and "missing ['fc.bias']" in reasons[6]
    assert reasons[4] == "fc.bias is float32 (5,), expected float32 (4,)"
    assert reasons[5] == "fc.bias contains NaN or Inf"
    for key, array in aggregated.items():
        np.testing.assert_allclose(array, GLOBAL[key] + 2.0)


def test_update_far_above_the_round_median_norm_is_rejected():
    strategy = strategy_for(RunConfig(strategy="fedmedian"))
    aggregated, _ = train_round(strategy, {1: shifted(1.0), 2: shifted(1.2), 3: shifted(0.9),
                                           4: shifted(1.0 * NORM_OUTLIER_FACTOR * 1.5)})
    assert list(rejected_nodes(strategy)) == [4]
    assert "more than 10x the round median" in rejected_nodes(strategy)[4]
    np.testing.assert_allclose(aggregated["fc.bias"], 1.0)  # median of 1.0, 1.2, 0.9


def test_bf16_updates_are_decoded_before_validation():
    strategy = strategy_for(RunConfig(wire_precision="bf16"))
    aggregated, _ = train_round(strategy, {1: to_wire(shifted(1.0), "bf16"),
                                           2: to_wire(shifted(2.0), "bf16")})
    assert strategy.rejected == []
    np.testing.assert_allclose(aggregated["conv.weight"], 1.5)


def test_error_replies_are_left_out_and_the_round_still_aggregates():
    strategy = strategy_for(RunConfig())
    aggregated, replies = train_round(strategy, {1: shifted(1.0), 2: shifted(2.0), 3: None})
    assert sum(r.has_error() for r in replies) == 1 and strategy.rejected == []
    np.testing.assert_allclose(aggregated["fc.bias"], 1.5)


def test_a_site_injected_with_nan_weights_is_rejected_and_the_model_stays_finite():
    strategy = strategy_for(RunConfig())
    messages = list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                             FakeGrid([1, 2, 3])))

    def site_reply(message: Message, fault: dict) -> Message:
        context = Context(run_id=1, node_id=message.metadata.dst_node_id, node_config=fault,
                          state=RecordDict(), run_config={})
        return fault_injection_mod(message, context, lambda m, c: reply(m, shifted(1.0)))

    replies = [site_reply(m, {"fault": "nan-weights"} if m.metadata.dst_node_id == 3 else {})
               for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert rejected_nodes(strategy) == {3: "conv.weight contains NaN or Inf"}
    assert all(np.all(np.isfinite(a)) for a in record_to_state(arrays).values())
    with pytest.raises(ValueError, match="the faults are \\('nan-weights', 'malformed'\\)"):
        site_reply(messages[0], {"fault": "slow"})


def test_dropouts_are_attributed_to_the_node_even_when_the_superlink_answers_for_it():
    strategy = strategy_for(RunConfig())
    messages = list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                             FakeGrid([1, 2, 3])))
    for message in messages:  # as Grid.push_messages does
        message.metadata.__dict__["_message_id"] = message.object_id
    offline = create_message_error_unavailable_res_message(messages[1].metadata,
                                                          "node_unavail")
    assert offline.metadata.src_node_id == SUPERLINK_NODE_ID
    replies = [reply(messages[0], shifted(1.0)), offline]
    assert _failures(messages, replies) == [
        {"node_id": messages[1].metadata.dst_node_id, "reason": offline.error.reason},
        {"node_id": messages[2].metadata.dst_node_id,
         "reason": "no reply before the round timeout"}]


def random_updates(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{key: (value + rng.normal(0, 1, value.shape)).astype(np.float32)
             for key, value in GLOBAL.items()} for _ in range(count)]


FLOWER = {"fedavg": lambda c: FedAvg(), "fedprox": lambda c: FedProx(proximal_mu=c.proximal_mu),
          "fedadam": lambda c: FedAdam(eta=c.server_learning_rate),
          "fedmedian": lambda c: FedMedian(), "fedtrimmedavg": lambda c: FedTrimmedAvg(beta=0.25)}


@pytest.mark.parametrize("name", list(FLOWER))
def test_each_method_aggregates_as_flowers_own_strategy(name):
    config = RunConfig(strategy=name, trim_fraction=0.25, server_learning_rate=0.5)
    ours, theirs = strategy_for(config), FLOWER[name](config)
    arrays = state_to_record(GLOBAL)
    for server_round in (1, 2):  # FedAdam's moments carry over
        updates = random_updates(4, server_round)
        results = []
        for strategy in (ours, theirs):
            messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(),
                                                     FakeGrid([1, 2, 3, 4])))
            replies = [reply(m, u, examples=10 * (i + 1))
                       for i, (m, u) in enumerate(zip(messages, updates, strict=True))]
            aggregated, metrics = strategy.aggregate_train(server_round, replies)
            results.append(record_to_state(aggregated))
        assert ours.rejected == [] and metrics["train_loss"] == pytest.approx(1.0)
        for key in GLOBAL:
            np.testing.assert_allclose(results[0][key], results[1][key], rtol=1e-5, atol=1e-6)
            assert results[0][key].dtype == np.float32
        arrays = state_to_record(results[0])


def test_validation_is_pooled_by_summing_the_sites_confusion_counts():
    strategy = strategy_for(RunConfig())
    messages = list(strategy.configure_evaluate(1, state_to_record(GLOBAL), ConfigRecord(),
                                                FakeGrid([1, 2])))
    contents = [report_content("val", [9, 0, 1, 0], loss=1.0),
                report_content("val", [0, 0, 0, 10], loss=2.0, centre="lab-b")]
    replies = [Message(c, reply_to=m) for m, c in zip(messages, contents, strict=True)]
    pooled = strategy.aggregate_evaluate(1, replies)
    assert pooled["val_confusion_matrix"] == [9, 0, 1, 10] and pooled["num-examples"] == 20
    assert pooled["val_loss"] == pytest.approx(1.5)
    assert pooled["val_macro_f1"] == pytest.approx((18 / 19 + 20 / 21) / 2)
    assert strategy.eval_seconds == [0.1, 0.1] and strategy.rejected == []


def test_a_reply_without_a_usable_weight_or_update_is_rejected_and_the_round_goes_on():
    strategy = strategy_for(RunConfig())
    messages = list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                             FakeGrid([1, 2, 3])))
    no_weight = reply(messages[1], shifted(5.0), examples=0)
    no_arrays = Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}),
                        reply_to=messages[2])
    aggregated, _ = strategy.aggregate_train(1, [reply(messages[0], shifted(1.0)), no_weight,
                                                 no_arrays])
    reasons = rejected_nodes(strategy)
    node = [m.metadata.dst_node_id for m in messages]
    assert reasons[node[1]] == "metrics 'num-examples': expected an integer in [1, 10000], got 0"
    assert reasons[node[2]] == ("records differ from a train reply's (unknown [], missing "
                                "['arrays', 'site'])")
    np.testing.assert_allclose(record_to_state(aggregated)["fc.bias"], 1.0)


@pytest.mark.parametrize("name", ["pooled", "local"])
def test_a_federation_refuses_a_centralised_method(name):
    with pytest.raises(ConfigError, match="run config field 'strategy': expected a federated"):
        strategy_for(RunConfig(strategy=name))

"""The reply schema on real Flower messages: each kind of malformed reply refused alone, with
its reason, while the good one is still aggregated; the absolute norm bound; a non-finite
aggregate kept out; error texts replaced by codes; the faulty node that sends them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from client.errors import DATA
from client.faults import MUTATION_STRIDE, MUTATIONS, fault_injection_mod
from common.config import RunConfig
from common.data import CentreData
from common.methods import create_method
from common.pipeline import fit, new_model
from common.weights import model_state
from server.held_out import held_out_metrics
from server.privacy import LEDGER_FILE, PrivacyLedger, private_updates
from server.replies import (
    UNRECOGNISED_ERROR,
    BadReply,
    check_reply,
    check_update,
    describe,
    error_reason,
)
from server.strategies import MethodStrategy, create_strategy, record_to_state, state_to_record
from tests.replies import EXPECTED, answer, report_content, train_content
from tests.test_strategies import FakeGrid

pytestmark = pytest.mark.usefixtures("server_task")

GLOBAL = {"conv.weight": np.zeros((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32),
          "fc.bias": np.zeros(4, np.float32)}


ONE_SITE = RunConfig(min_train_nodes=1)


def strategy_for(config: RunConfig = ONE_SITE) -> MethodStrategy:
    return create_strategy(config, create_method(config), GLOBAL, EXPECTED)


def shifted(value: float) -> dict[str, np.ndarray]:
    return {key: array + np.float32(value) for key, array in GLOBAL.items()}


def train_round(strategy, contents: list[RecordDict]) -> tuple[dict | None, list[Message]]:
    """One round in which node i + 1 answers with ``contents[i]``."""
    messages = sorted(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                               FakeGrid(list(range(1, len(contents) + 1)))),
                      key=lambda m: m.metadata.dst_node_id)
    replies = [answer(m, c) for m, c in zip(messages, contents, strict=True)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return (record_to_state(arrays) if arrays is not None else None), replies


def reasons(strategy) -> dict[int, str]:
    return {item["node_id"]: item["reason"] for item in strategy.rejected}


def test_the_reported_attacks_are_refused_and_the_good_update_is_the_model():
    """From the issue: an int64 update of 1e9 values, weights of 1e6 claiming 1e12 images and
    a reply without metrics, each beside one good reply."""
    integers = {key: np.full(value.shape, 10**9, np.int64) for key, value in GLOBAL.items()}
    claiming = train_content(shifted(1e6))
    claiming["metrics"]["num-examples"] = 10**12
    no_metrics = train_content(shifted(2.0))
    del no_metrics["metrics"]
    for bad in (train_content(integers), claiming, no_metrics):
        strategy = strategy_for()
        aggregated, _ = train_round(strategy, [train_content(shifted(1.0)), bad])
        assert list(reasons(strategy)) == [2]
        for key, value in aggregated.items():
            np.testing.assert_array_equal(value, shifted(1.0)[key])
    assert reasons(strategy)[2] == ("records differ from a train reply's (unknown [], missing "
                                    "['metrics'])")


@pytest.mark.parametrize(("kind", "mutation"),
                         [(kind, name) for kind, named in MUTATIONS.items() for name in named])
def test_each_malformed_reply_is_refused_alone_with_its_reason(kind, mutation):
    strategy = strategy_for()
    good = train_content(shifted(1.0), class_counts=[6, 4])
    if kind == "train":
        bad = train_content(shifted(1.5), class_counts=[6, 4])
        MUTATIONS[kind][mutation](bad)
        aggregated, _ = train_round(strategy, [good, bad])
        np.testing.assert_array_equal(aggregated["fc.bias"], np.ones(4, np.float32))
    else:
        messages = sorted(strategy.configure_evaluate(1, state_to_record(GLOBAL),
                                                      ConfigRecord(), FakeGrid([1, 2])),
                          key=lambda m: m.metadata.dst_node_id)
        bad = report_content("val", [5, 1, 0, 4], centre="lab-b")
        MUTATIONS[kind][mutation](bad)
        pooled = strategy.aggregate_evaluate(1, [
            answer(messages[0], report_content("val", [3, 0, 1, 2])), answer(messages[1], bad)])
        assert pooled["val_confusion_matrix"] == [3, 0, 1, 2]
    [rejection] = strategy.rejected
    assert rejection["node_id"] == 2 and rejection["reply"] in ("train", "val")
    assert rejection["reason"] and "<" not in rejection["reason"]


def test_an_update_beyond_max_update_norm_is_refused_however_few_replies():
    strategy = strategy_for(RunConfig(max_update_norm=5.0, min_train_nodes=1))
    aggregated, _ = train_round(strategy, [train_content(shifted(2.0))])  # 2 x sqrt(13)
    assert aggregated is None
    assert reasons(strategy) == {1: "update norm 7.21 exceeds max-update-norm 5"}
    aggregated, _ = train_round(strategy, [train_content(shifted(1.0)),
                                           train_content(shifted(2.0))])
    assert list(reasons(strategy)) == [2]
    np.testing.assert_array_equal(aggregated["conv.weight"], np.ones((2, 3), np.float32))


def test_a_negative_running_variance_is_refused():
    strategy = strategy_for()
    bad = shifted(0.5)
    bad["bn.running_var"][1] = -0.1
    train_round(strategy, [train_content(shifted(0.1)), train_content(bad)])
    assert reasons(strategy) == {2: "bn.running_var holds a negative variance"}


def test_a_non_finite_aggregate_keeps_the_previous_global_model(capsys):
    strategy = strategy_for()
    strategy.method.aggregate = lambda updates, weights, current, server_round: {
        key: np.full(value.shape, 3e39) for key, value in current.items()}  # inf in float32
    aggregated, _ = train_round(strategy, [train_content(shifted(0.1))])
    assert aggregated is None  # run_rounds merges nothing: the previous model stays
    [note] = strategy.rejected
    assert note == {"node_id": None, "reply": "aggregate", "reason": "conv.weight of the "
                    "aggregate is not finite: the round keeps the previous global model"}
    assert "the round keeps the previous global model" in capsys.readouterr().out


def test_a_private_release_that_is_not_finite_is_neither_sent_nor_ledgered(tmp_path):
    class NaNNoise:
        def normal(self, mean: float, std: float, shape: tuple) -> np.ndarray:
            return np.full(shape, np.nan)

    config = RunConfig(dp_noise_multiplier=1.0, min_train_nodes=1)
    dp = private_updates(strategy_for(config), config, 2, {"bn.running_var"})
    dp.use_ledger(PrivacyLedger(tmp_path / LEDGER_FILE), [])
    dp.rng = NaNNoise()
    aggregated, _ = train_round(dp, [train_content(shifted(0.1))])
    assert aggregated is None and not (tmp_path / LEDGER_FILE).exists()
    assert dp.rejected[0]["reply"] == "aggregate"


def test_only_site_codes_and_the_superlinks_own_reasons_are_stored():
    message = Message(RecordDict(), dst_node_id=4, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id

    def failed(reason: str) -> Message:
        return Message(Error(code=1, reason=reason), reply_to=message)

    assert error_reason(failed(DATA)) == DATA
    assert error_reason(failed("FileNotFoundError: /secret/site/images.csv")) == \
        UNRECOGNISED_ERROR
    offline = create_message_error_unavailable_res_message(message.metadata, "node_unavail")
    assert offline.metadata.src_node_id == SUPERLINK_NODE_ID
    assert error_reason(offline) == offline.error.reason
    assert error_reason(failed(offline.error.reason)) == UNRECOGNISED_ERROR  # from a site


def test_reasons_quote_only_plain_short_text():
    assert describe("clinic-a") == "'clinic-a'"
    assert describe("<script>alert(1)</script>") == "a text of 25 characters"
    assert describe(b"\x00" * 9) == "9 bytes"
    assert describe([1, 2.5]) == "a list of 2 values (float, int)"
    content = train_content(shifted(0.1))
    content["metrics"]["<img src=x onerror=alert(1)>"] = 1.0
    with pytest.raises(BadReply, match=r"unknown \[\(a key that is not plain text\)\]"):
        check_reply(answer(Message(RecordDict(), dst_node_id=1, message_type="train"),
                           content), "train", EXPECTED)


def test_class_counts_sent_with_an_update_must_be_its_images():
    content = train_content(shifted(0.1), examples=10, class_counts=[6, 5])
    strategy = strategy_for()
    train_round(strategy, [content])
    assert reasons(strategy) == {1: "class-counts add up to 11, not num-examples 10"}


def test_the_evaluators_and_role_replies_are_checked_too():
    query = Message(RecordDict(), dst_node_id=9, message_type="evaluate.held_out")
    for record in ({"centre": "held-out", "metrics": ["x"], "seconds": 1.0},
                   {"centre": "lab-a", "metrics": "{}", "seconds": 1.0},
                   {"centre": "held-out", "metrics": "{}"}):
        with pytest.raises(ValueError, match="held-out"):
            held_out_metrics([answer(query, RecordDict({"held-out": ConfigRecord(record)}))],
                             ("a", "b"), EXPECTED)
    role = Message(RecordDict(), dst_node_id=9, message_type="query.role")
    assert check_reply(answer(role, RecordDict({"role": ConfigRecord(
        {"role": "evaluator", "centre": "held-out"})})), "role", EXPECTED)
    with pytest.raises(BadReply, match="'role': expected one of"):
        check_reply(answer(role, RecordDict({"role": ConfigRecord(
            {"role": b"evaluator", "centre": "held-out"})})), "role", EXPECTED)


def test_a_malformed_node_breaks_each_reply_with_the_next_mutation():
    context = Context(run_id=1, node_id=5, node_config={"fault": "malformed"},
                      state=RecordDict(), run_config={})
    strategy = strategy_for()
    messages = list(strategy.configure_train(1, state_to_record(GLOBAL), ConfigRecord(),
                                             FakeGrid([5])))
    names = list(MUTATIONS["train"])
    assert all(math.gcd(len(named), MUTATION_STRIDE) == 1 for named in MUTATIONS.values())
    for sent in range(len(names) + 1):
        reply = fault_injection_mod(messages[0], context,
                                    lambda m, c: answer(m, train_content(shifted(0.1))))
        strategy.rejected = []
        strategy.aggregate_train(1, [reply])
        assert [r["node_id"] for r in strategy.rejected] == [5], sent
    assert context.state["fault-injection"]["train"] == len(names) + 1


def test_the_default_update_norm_bound_accepts_an_honest_pretrained_update():
    """An ImageNet EfficientNet-Lite0 after 25 local steps moves ~2,000 from the global model
    (BatchNorm running variances re-estimated on the site's images): the default bound let
    no such update through."""
    config = RunConfig(model="tf_efficientnet_lite0", pretrained="imagenet", image_size=32,
                       local_steps=25, batch_size=16, device="cpu", augment="none")
    torch.manual_seed(0)
    model = new_model(config, 5)
    start = model_state(model)
    rng = np.random.default_rng(0)
    data = CentreData("lab-a", tuple("abcde"), rng.integers(0, 255, (64, 32, 32, 3), np.uint8),
                      np.arange(64) % 5, np.arange(64))
    fit(model, data, config, data.class_counts(), progress=0.0, seed=0)
    distance = check_update(state_to_record(model_state(model)), start, "fp32")
    assert 1000 < distance < config.max_update_norm

"""A site: what it keeps (FedBN's BatchNorm, found by module type) and sends, FedBN's global
model, the seeds of its batches, its handlers and its process cache."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from torch import nn

from client.app import app, build_client_app
from client.site import Site
from common.config import RunConfig
from common.data import CentreData, CentreSpec
from common.methods import create_method
from common.models import batchnorm_keys
from common.weights import model_state
from server.strategies import create_strategy, record_to_state, state_to_record
from tests.replies import EXPECTED, train_content
from tests.test_strategies import FakeGrid


def odd_model() -> nn.Module:
    """A model whose BatchNorm layers are named like anything but BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleDict({
        "stem": nn.Conv2d(3, 4, 3), "gain": nn.BatchNorm2d(4), "act": nn.ReLU(),
        "block": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
    }))


def site(strategy: str, name: str = "a") -> Site:
    data = CentreData(name, ("x", "y"), np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]),
                      np.array([0, 1]))
    return Site(RunConfig(strategy=strategy), CentreSpec(name), data, data, data)


def context(node: int = 1) -> Context:
    return Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})


def global_arrays(model: nn.Module, value: float):
    """The server's arrays: every tensor (BatchNorm included) set to ``value``."""
    return state_to_record({k: np.full_like(v, value) for k, v in model_state(model).items()})


def local_training(model: nn.Module, batchnorm: float = 7.0, other: float = 3.0) -> None:
    """Stand-in for a local fit: the site's own values in every tensor."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                tensor.fill_(batchnorm if key in batchnorm_keys(model) else other)


def test_fedbn_keeps_batchnorm_for_training_and_sends_every_tensor():
    state = context()
    fedbn = site("fedbn")
    bn = batchnorm_keys(odd_model())
    assert {k.rsplit(".", 1)[0] for k in bn} == {"0.gain", "0.block.1"}

    model = odd_model()
    fedbn.load_for_training(model, global_arrays(model, 1.0), state)
    local_training(model)
    fedbn.keep(model, state)
    outgoing = fedbn.update(model)
    assert set(outgoing) == set(model_state(model))  # BatchNorm leaves too, for the global model
    assert all(np.all(outgoing[k].numpy() == (7.0 if k in bn else 3.0)) for k in outgoing)

    next_round = odd_model()
    fedbn.load_for_training(next_round, global_arrays(next_round, 5.0), state)
    for key, value in model_state(next_round).items():
        assert np.all(value == (7.0 if key in bn else 5.0)), key
    scored = odd_model()  # validation and test score the global model as it is
    fedbn.load_global(scored, global_arrays(scored, 5.0))
    assert all(np.all(v == 5.0) for v in model_state(scored).values())


def test_fedavg_keeps_nothing_and_sends_every_tensor():
    state = context()
    fedavg = site("fedavg")
    model = odd_model()
    fedavg.load_for_training(model, global_arrays(model, 1.0), state)
    local_training(model)
    fedavg.keep(model, state)
    assert set(fedavg.update(model)) == set(model_state(model))
    fedavg.load_for_training(model, global_arrays(model, 5.0), state)
    assert all(np.all(v == 5.0) for v in model_state(model).values())


@pytest.mark.usefixtures("server_task")
def test_fedbn_global_model_carries_the_sites_trained_batchnorm_aggregated():
    """Not the server's initial BatchNorm (timm zero-initialises some of its scales)."""
    config = RunConfig(strategy="fedbn", min_train_nodes=2)
    method = create_method(config)
    initial = model_state(odd_model())
    bn = batchnorm_keys(odd_model())
    strategy = create_strategy(config, method, method.sent_keys(odd_model()), EXPECTED)
    messages = list(strategy.configure_train(1, state_to_record(initial), ConfigRecord(),
                                             FakeGrid([1, 2])))
    replies = []
    for message, value, examples in zip(messages, (2.0, 6.0), (10, 30), strict=True):
        fedbn, model = site("fedbn", f"site-{value}"), odd_model()
        fedbn.load_for_training(model, message.content["arrays"], context())
        local_training(model, batchnorm=value, other=1.0)
        replies.append(Message(train_content(record_to_state(fedbn.update(model)), examples),
                               reply_to=message))
    aggregated, _ = strategy.aggregate_train(1, replies)
    global_state = method.global_model(record_to_state(aggregated))
    assert strategy.rejected == [] and set(global_state) == set(initial)
    for key in bn & set(initial):
        np.testing.assert_allclose(global_state[key], (2.0 * 10 + 6.0 * 30) / 40)
        assert not np.allclose(global_state[key], initial[key])


@pytest.mark.usefixtures("server_task")
def test_two_sites_in_one_round_draw_different_batches_reproducibly(monkeypatch):
    """The real train handler, on identical images at two sites (a test double hands each
    context its site): every site and round has its own batches, the same when repeated."""
    import client.app
    import common.train

    images = np.random.default_rng(0).integers(0, 255, (24, 16, 16, 3), np.uint8)
    config = RunConfig(model="test_resnet", image_size=16, batch_size=4, augment="none",
                       device="cpu")
    sites = {}
    for node, name in ((1, "clinic-a"), (2, "clinic-b")):
        data = CentreData(name, ("x", "y"), images, np.arange(24) % 2, np.arange(24))
        sites[node] = Site(config, CentreSpec(name), data, data, data)
    monkeypatch.setattr(client.app, "open_site", lambda c: sites[c.node_id])
    drawn: list[list[int]] = []
    gather = common.train.gather_batch

    def recording_gather(images: torch.Tensor, index: torch.Tensor, device) -> torch.Tensor:
        drawn[-1].extend(index.tolist())
        return gather(images, index, device)

    monkeypatch.setattr(common.train, "gather_batch", recording_gather)
    arrays = state_to_record(model_state(sites[1].model))

    def batches(node: int, server_round: int) -> list[int]:
        drawn.append([])
        message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
            {"server-round": server_round})}), dst_node_id=node, message_type="train")
        client.app.train(message, Context(run_id=1, node_id=node, node_config={},
                                          state=RecordDict(), run_config={}))
        return drawn[-1]

    first = batches(1, server_round=1)
    assert len(first) == 24
    assert batches(2, server_round=1) != first
    assert batches(1, server_round=1) == first
    assert batches(1, server_round=2) != first


@pytest.mark.parametrize("kind", ["train.default", "evaluate.default", "query.class_counts"])
def test_the_simulation_client_app_has_every_handler(kind):
    built = build_client_app({"seed": 1})
    assert kind in app._registered_funcs and kind in built._registered_funcs
    assert built._mods[1:] == app._mods  # the run-config merge first, then the same mods


def test_a_process_keeps_one_site_per_node_and_run_config(tmp_path):
    from client.site import open_site

    run_config = RunConfig(model="test_resnet", image_size=16, synthetic_images=40,
                           cache_dir=str(tmp_path), device="cpu").to_dict()

    def context(partition: int, config: dict) -> Context:
        return Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition},
                       state=RecordDict(), run_config=config)

    first = open_site(context(0, run_config))
    again = open_site(context(0, run_config))
    assert again is first and again.model is first.model  # built once, reused per message
    assert again.device_images["train"] is first.device_images["train"]
    other_node = open_site(context(1, run_config))
    assert other_node.spec != first.spec and other_node.model is not first.model
    other_run = open_site(context(0, {**run_config, "seed": 7}))
    assert other_run is not first and other_run.model is not first.model


@pytest.mark.usefixtures("server_task")
@pytest.mark.parametrize("levers", [{}, {"local_steps": 3, "sampling_balance": 0.5},
                                    {"class_prior": "federated", "loss": "balanced_softmax"},
                                    {"test_time_bn": True, "stain_normalise": "reinhard"}])
def test_the_real_handlers_replies_pass_the_servers_schema(monkeypatch, levers):
    """What a site sends with each training lever on is what the server accepts: a metric the
    client adds without its schema entry rejects every update of the run."""
    import client.app
    from server.replies import Expected, check_reply

    rng = np.random.default_rng(0)
    config = RunConfig(model="test_resnet", image_size=16, batch_size=4, augment="none",
                       device="cpu", **levers)
    data = CentreData("clinic-a", ("x", "y"), rng.integers(0, 255, (12, 16, 16, 3), np.uint8),
                      np.arange(12) % 2, np.arange(12))
    monkeypatch.setattr(client.app, "open_site",
                        lambda c: Site(config, CentreSpec("clinic-a"), data, data, data))
    arrays = state_to_record(model_state(client.app.open_site(context()).model))
    expected = Expected(2, frozenset({"clinic-a"}), "clinic-d", 1000)
    train_config = {"server-round": 1, **({"federated-counts": [6, 6]}
                                          if config.class_prior == "federated" else {})}
    for kind, handler, split_config in (("train", client.app.train, train_config),
                                        ("val", client.app.evaluate, {"split": "val"}),
                                        ("test", client.app.evaluate, {"split": "test"})):
        message = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(split_config)}),
                          dst_node_id=1, message_type="train" if kind == "train" else "evaluate")
        reply = handler(message, context())
        check_reply(Message(reply.content, reply_to=message), kind, expected)

"""FedBN at a site: BatchNorm tensors, found by module type, stay local across rounds."""

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from torch import nn

from client.app import app, build_client_app
from client.site import Site
from common.config import RunConfig
from common.data import CentreData, CentreSpec
from common.models import batchnorm_keys
from common.weights import model_state
from server.strategies import state_to_record


def odd_model() -> nn.Module:
    """A model whose BatchNorm layers are named like anything but BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.ModuleDict({
        "stem": nn.Conv2d(3, 4, 3), "gain": nn.BatchNorm2d(4), "act": nn.ReLU(),
        "block": nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)),
    }))


def site(strategy: str) -> Site:
    data = CentreData("a", ("x", "y"), np.zeros((2, 8, 8, 3), np.uint8), np.array([0, 1]),
                      np.array([0, 1]))
    return Site(RunConfig(strategy=strategy), CentreSpec("a"), data, data)


def global_arrays(model: nn.Module, value: float):
    """The server's arrays: every tensor (BatchNorm included) set to ``value``."""
    return state_to_record({k: np.full_like(v, value) for k, v in model_state(model).items()})


def local_training(model: nn.Module) -> None:
    """Stand-in for a local fit: the site's own values in every tensor."""
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if not key.endswith("num_batches_tracked"):
                tensor.fill_(7.0 if key in batchnorm_keys(model) else 3.0)


def test_fedbn_keeps_batchnorm_local_and_takes_the_rest_from_the_server():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    fedbn = site("fedbn")
    bn = batchnorm_keys(odd_model())
    assert {k.rsplit(".", 1)[0] for k in bn} == {"0.gain", "0.block.1"}

    model = odd_model()
    fedbn.restore_local_state(model, global_arrays(model, 1.0), context)
    local_training(model)
    fedbn.keep_local_state(model, context)
    outgoing = fedbn.outgoing_arrays(model)
    assert set(outgoing) == set(model_state(model)) - bn
    assert all(np.all(outgoing[k].numpy() == 3.0) for k in outgoing)

    next_round = odd_model()
    fedbn.restore_local_state(next_round, global_arrays(next_round, 5.0), context)
    for key, value in model_state(next_round).items():
        assert np.all(value == (7.0 if key in bn else 5.0)), key


def test_fedavg_sends_and_receives_every_tensor():
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    fedavg = site("fedavg")
    model = odd_model()
    fedavg.restore_local_state(model, global_arrays(model, 1.0), context)
    local_training(model)
    fedavg.keep_local_state(model, context)
    assert set(fedavg.outgoing_arrays(model)) == set(model_state(model))
    fedavg.restore_local_state(model, global_arrays(model, 5.0), context)
    assert all(np.all(v == 5.0) for v in model_state(model).values())


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

"""The end of a federated run: the sites' validation NLL curves pick the temperature, and the
selected model is scored at it on every split (``server.calibration``).

The ClientApp is the real one (mods included), called in-process on synthetic clinics; the
grid is a stand-in for the SuperLink (``tests.test_evaluator.SitesGrid``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from common.calibration import CURVE_MESSAGE, CURVE_RECORD, nll_curve, pick_temperature
from common.config import parse_run_config, resolve_centres
from common.methods import create_method
from common.pipeline import (
    as_applied,
    centre_splits,
    load_centre_data,
    model_input,
    new_model,
    place,
)
from common.train import predict_logits, resolve_device
from server.calibration import end_of_run
from server.replies import Expected
from server.strategies import create_strategy
from tests.test_evaluator import (  # noqa: F401 (server_task: an autouse fixture)
    CLASSES,
    RUN_CONFIG,
    SitesGrid,
    centre_file,
    global_arrays,
    message,
    server_task,
)

TRAINING = ("clinic-a", "clinic-b", "clinic-c")


def training_sites(tmp_path: Path) -> SitesGrid:
    return SitesGrid({i: {"centre-config": centre_file(tmp_path, name)}
                      for i, name in enumerate(TRAINING, start=1)}, RUN_CONFIG)


def strategy_for(arrays):
    config = parse_run_config(RUN_CONFIG)
    expected = Expected(len(CLASSES), frozenset(TRAINING), config.held_out,
                        config.max_site_images)
    return create_strategy(config, create_method(config), list(arrays.keys()), expected)


def pooled_optimum(arrays) -> float:
    """The temperature one site holding every training centre's validation logits (each
    centre's model as applied there, BatchNorm adapted) would pick."""
    config = parse_run_config(RUN_CONFIG)
    model = new_model(config, len(CLASSES))
    model.load_state_dict({k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()})
    logits, labels = [], []
    device = resolve_device(config.device)
    for spec in resolve_centres(config):
        if spec.name in TRAINING:
            val = centre_splits(load_centre_data(spec, config), spec.split_seed)["val"]
            images = place(val, config)
            applied = as_applied(model, images, config)
            logits.append(predict_logits(applied, images, device, model_input(config)))
            labels.append(val.labels)
    return pick_temperature([nll_curve(np.concatenate(logits), np.concatenate(labels))])


def test_the_sites_curves_pick_the_pooled_optimum_and_every_split_is_scored_at_it(tmp_path):
    grid = training_sites(tmp_path)
    arrays = global_arrays()
    scored_at = []
    end = end_of_run(strategy_for(arrays), grid, arrays, 3, 30.0,
                     lambda t: scored_at.append(t) or {"held_out": {}})
    assert sorted(end.curves) == list(TRAINING) and end.left_out == []
    assert end.temperature == pooled_optimum(arrays)
    assert scored_at == [end.temperature]
    curves = [m for m in grid.sent if m.metadata.message_type == CURVE_MESSAGE]
    assert len(curves) == 3 and all(not m.content.config_records["config"] for m in curves)
    evaluations = [m.content["config"] for m in grid.sent
                   if m.metadata.message_type == "evaluate"]
    assert sorted(c["split"] for c in evaluations) == ["test"] * 3 + ["val"] * 3
    assert {c["temperature"] for c in evaluations} == {end.temperature}
    assert sorted(r["centre"] for r in end.validation) == list(TRAINING)
    assert all("val_confusion_matrix" in r for r in end.validation)
    assert all("test_confusion_matrix" in r for r in end.test)


class TamperingGrid(SitesGrid):
    """Node 2 sends a curve with negative sums, node 3 a reply without a curve."""

    def pull_messages(self, message_ids) -> list[Message]:
        replies = super().pull_messages(message_ids)
        for reply in replies:
            if CURVE_RECORD not in reply.content:
                continue
            if reply.metadata.src_node_id == 2:
                record = dict(reply.content[CURVE_RECORD])
                record["nll_sums"] = [-1.0] * len(record["nll_sums"])
                reply.content[CURVE_RECORD] = MetricRecord(record)
            elif reply.metadata.src_node_id == 3:
                del reply.content[CURVE_RECORD]
        return replies


def test_a_malformed_or_missing_curve_is_left_out_not_the_run(tmp_path):
    grid = TamperingGrid(training_sites(tmp_path).node_configs, RUN_CONFIG)
    arrays = global_arrays()
    end = end_of_run(strategy_for(arrays), grid, arrays, 3, 30.0, lambda t: {})
    assert list(end.curves) == ["clinic-a"]
    assert end.temperature == pick_temperature([end.curves["clinic-a"]])
    reasons = {item["node_id"]: item["reason"] for item in end.left_out}
    assert "'nll_sums' must be" in reasons[2] and "no temperature curve" in reasons[3]
    assert len(end.validation) == len(end.test) == 3


@pytest.mark.parametrize("temperature", [-1.0, 0.0, "hot"])
def test_a_site_refuses_a_temperature_that_is_not_one(tmp_path, temperature):
    grid = training_sites(tmp_path)
    arrays = global_arrays()
    sent = message(1, "evaluate", RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"split": "val", "temperature": temperature, "server-round": 1})}))
    grid.push_messages([sent])
    [reply] = grid.pull_messages([sent.metadata.message_id])
    assert reply.has_error() and reply.error.reason.startswith("site-error:")

"""Every entry of the method registry trains one round on synthetic clinics: the federated ones
on Flower's simulation engine (ServerApp and ClientApps of this project), ``pooled`` and
``local`` in one place; every one writes the same run directory and picks its round with the
same function."""

import json
from pathlib import Path

import numpy as np
import pytest

from common import selection
from common.config import parse_run_config
from common.methods import METHODS
from common.models import batchnorm_keys
from common.pipeline import new_model
from common.weights import load_weights, model_state

pytestmark = pytest.mark.integration

RUN_FILES = ("report.json", "report.html", "report.md", "best.safetensors", "final.safetensors",
             "model_card.json", "checkpoint.safetensors")


def train_one_round(name: str, overrides: dict) -> list[Path]:
    """The report.json of each model that method ``name`` trains."""
    config = parse_run_config(overrides)
    if not METHODS[name].federated:
        from simulations.baselines import run_centralised

        return run_centralised(config)
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import build_server_app

    run_simulation(build_server_app(overrides), build_client_app(overrides), num_supernodes=3,
                   backend_config={"init_args": {"num_cpus": 2, "include_dashboard": False},
                                   "client_resources": {"num_cpus": 1}})
    return sorted(Path(config.output_dir).glob("*/report.json"))


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_a_round_and_writes_the_same_run_directory(
        name, tmp_path, monkeypatch):
    overrides = {"strategy": name, "model": "resnet10t", "image-size": 32,
                 "synthetic-images": 24, "num-server-rounds": 1, "augment": "none",
                 "device": "cpu", "min-train-nodes": 3, "output-dir": str(tmp_path / "runs"),
                 "cache-dir": str(tmp_path / "cache")}
    selected = []
    best_round = selection.best_round
    monkeypatch.setattr(selection, "best_round",
                        lambda rounds: selected.append(rounds) or best_round(rounds))
    reports = train_one_round(name, overrides)
    assert len(reports) == (3 if name == "local" else 1)
    for path in reports:
        report = json.loads(path.read_text())
        assert report["config"]["strategy"] == name
        assert [r["round"] for r in report["rounds"]] == [1]
        assert report["rounds"][0]["replied"] == report["rounds"][0]["sampled"] >= 1
        assert report["best"]["selected_by"] == selection.SELECTED_BY
        tested = report["best"]["in_distribution_test"]["sites"]
        assert sorted(s["centre"] for s in tested) == sorted(report["training_centres"])
        for file in RUN_FILES:
            assert (path.parent / file).is_file(), file
    assert selected and all(len(rounds) == 1 for rounds in selected)
    if name == "fedbn":  # the global model's BatchNorm is the sites', not the initial one:
        exported, _ = load_weights(reports[0].parent / "best.safetensors")
        model = new_model(parse_run_config(overrides), 5)
        initial = model_state(model)
        keys = batchnorm_keys(model)
        statistics = [k for k in keys if k.endswith(".running_mean")]
        zero_scales = [k for k in keys if k.endswith(".weight") and not initial[k].any()]
        assert statistics and zero_scales  # timm zero-initialises each block's last scale
        assert all(not np.allclose(exported[k], initial[k]) for k in statistics)
        assert all(exported[k].any() for k in zero_scales)

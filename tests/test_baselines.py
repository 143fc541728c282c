"""Centralised references (pooled, local): the run directory of a federated run, progress per
round, the one selection rule, the in-distribution test; held-out scoring with test-time
BatchNorm adaptation."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common import selection
from common.config import parse_run_config
from common.data import CentreData, CentreSpec
from common.inference import evaluate_centre
from common.metrics import expected_calibration_error, uncertainty_threshold
from common.modelcard import load_exported_model
from common.pipeline import load_centre_data, new_model, score_held_out
from common.train import predict_probabilities
from simulations.baselines import concatenate, run_centralised

CPU = torch.device("cpu")
RUN_FILES = ("report.json", "report.html", "report.md", "best.safetensors", "final.safetensors",
             "model_card.json", "f1_over_rounds.png", "confusion_matrix.png", "id_vs_ood.png")


@pytest.fixture
def tiny(tmp_path):
    """A run config on small synthetic clinics (clinic-d held out)."""
    return {"model": "test_resnet", "image-size": 32, "synthetic-images": 40,
            "num-server-rounds": 2, "augment": "none", "device": "cpu",
            "cache-dir": str(tmp_path / "cache"), "output-dir": str(tmp_path / "runs")}


def centre(name: str, n: int, groups_from: int = 0) -> CentreData:
    return CentreData(name, ("a", "b"), np.zeros((n, 4, 4, 3), np.uint8),
                      np.arange(n) % 2, np.arange(groups_from, groups_from + n))


def test_concatenate_keeps_groups_of_different_centres_apart():
    joined = concatenate([centre("x", 3), centre("y", 2)], "pooled")
    assert len(joined) == 5 and joined.classes == ("a", "b")
    assert len(np.unique(joined.groups)) == 5


def test_pooled_writes_a_federated_runs_directory_and_selects_by_the_one_rule(
        tiny, tmp_path, capsys, monkeypatch):
    calls = []
    real_best_round = selection.best_round
    monkeypatch.setattr(selection, "best_round",
                        lambda rounds: calls.append(len(rounds)) or real_best_round(rounds))
    config = parse_run_config({**tiny, "strategy": "pooled"})
    [path] = run_centralised(config)
    lines = [line for line in capsys.readouterr().out.splitlines() if "] round " in line]
    assert [line.split(":")[0] for line in lines] == ["[cytofed] round 1/2", "[cytofed] round 2/2"]
    assert "3/3 sites" in lines[0]
    for name in RUN_FILES:
        assert (path.parent / name).is_file(), name
    report = json.loads(path.read_text())
    assert report["config"]["strategy"] == "pooled"
    assert report["held_out_centre"] == "clinic-d"
    assert report["training_centres"] == ["clinic-a", "clinic-b", "clinic-c"]
    assert calls and report["best"]["round"] == real_best_round(report["rounds"])["round"]
    assert report["best"]["selected_by"] == selection.SELECTED_BY
    assert sum(report["rounds"][0]["validation"]["val_confusion_matrix"]) == (
        report["rounds"][0]["validation"]["num-examples"])
    assert 0.0 <= report["best"]["held_out"]["macro_f1"] <= 1.0
    assert report["best"]["held_out_bn_adapted"] is None
    tested = report["best"]["in_distribution_test"]
    assert [s["centre"] for s in tested["sites"]] == report["training_centres"]
    assert tested["num_examples"] == sum(s["num_examples"] for s in tested["sites"]) > 0
    assert report["best"]["id_ood_gap"] == pytest.approx(
        tested["macro_f1"] - report["best"]["held_out"]["macro_f1"])
    # `cytofed evaluate --model RUN` scores the baseline on another centre.
    toml = tmp_path / "clinic-d.toml"
    toml.write_text('name = "clinic-d"\nformat = "synthetic"\n')
    scored = evaluate_centre(path.parent, toml, cache_dir=tmp_path / "cache", device="cpu")
    assert 0.0 <= scored["macro_f1"] <= 1.0 and scored["num_examples"] > 0
    # Temperature scaling, end to end: the centres' curves chose T, the card holds it,
    # `evaluate` applies it, and the report's held-out ECE of the exported model is at T.
    calibration = report["calibration"]
    assert calibration["sites"] == report["training_centres"]
    assert scored["temperature"] == calibration["temperature"] == report["best"]["temperature"]
    assert calibration["temperature"] != 1.0
    model, card = load_exported_model(path.parent)
    held_out = load_centre_data(CentreSpec("clinic-d", format="synthetic"), config)
    inputs = card.preprocessing.model_input()
    probabilities = predict_probabilities(model, inputs.place(held_out.images, CPU), CPU,
                                          inputs, card.temperature)
    best = report["best"]["held_out"]
    assert best["ece"] == pytest.approx(
        expected_calibration_error(held_out.labels, probabilities), abs=1e-6)
    at_one = next(r for r in report["rounds"] if r["round"] == report["best"]["round"])
    assert at_one["held_out"]["ece"] != pytest.approx(best["ece"], abs=1e-4)
    assert best["macro_f1"] == pytest.approx(at_one["held_out"]["macro_f1"])
    threshold = report["model"]["uncertainty"]
    assert f"at temperature {calibration['temperature']:.3g}" in threshold["calibrated_on"]
    assert threshold["coverage"] == pytest.approx(uncertainty_threshold(
        calibration["validation"]["val_correct_by_confidence"],
        calibration["validation"]["val_wrong_by_confidence"])["coverage"])


def test_local_trains_one_model_per_training_centre_each_in_its_run_directory(tiny):
    paths = run_centralised(parse_run_config({**tiny, "strategy": "local",
                                              "num-server-rounds": 1, "test-time-bn": True}))
    reports = [json.loads(p.read_text()) for p in paths]
    assert [r["training_centres"] for r in reports] == [["clinic-a"], ["clinic-b"], ["clinic-c"]]
    assert [p.parent.name.split("-cytofed-")[1] for p in paths] == [
        "clinic-a", "clinic-b", "clinic-c"]
    for report in reports:
        assert report["best"]["held_out_bn_adapted"] is not None
        assert [s["centre"] for s in report["best"]["in_distribution_test"]["sites"]] == (
            report["training_centres"])


def test_the_core_and_the_centralised_references_import_no_flower():
    code = ("import sys, common.methods, common.selection, common.pipeline, "
            "simulations.baselines; sys.exit(any(m.startswith('flwr') for m in sys.modules))")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[1])


def test_a_federated_method_is_not_run_in_one_place(tiny):
    with pytest.raises(ValueError, match="federated"):
        run_centralised(parse_run_config({**tiny, "strategy": "fedavg"}))


@pytest.mark.parametrize(("overrides", "adapted"), [
    ({}, False),
    ({"test-time-bn": True}, True),
    ({"strategy": "fedbn"}, True),
    ({"test-time-bn": True, "norm": "group"}, False),
])
def test_bn_adapted_results_are_reported_apart(overrides, adapted):
    config = parse_run_config({"model": "test_resnet", "device": "cpu", **overrides})
    model = new_model(config, 2)
    data = CentreData("held", ("a", "b"),
                      np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), np.uint8),
                      np.arange(12) % 2, np.arange(12))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = score_held_out(model, data, config)
    assert set(results) == {"held_out", "held_out_bn_adapted"}
    assert (results["held_out_bn_adapted"] is not None) == adapted
    assert all(np.array_equal(before[k], v.cpu()) for k, v in model.state_dict().items())


def test_pooled_takes_every_centres_steps_and_exports_the_average_of_the_last_rounds(
        tiny, monkeypatch):
    from common.weights import load_weights
    from server.recorder import RunRecorder

    plain = {}
    real = RunRecorder.complete_round
    monkeypatch.setattr(RunRecorder, "complete_round", lambda self, record, state, exported: (
        plain.__setitem__(record["round"], (state, exported)),
        real(self, record, state, exported))[1])
    [path] = run_centralised(parse_run_config({
        **tiny, "strategy": "pooled", "local-steps": 2, "batch-size": 8,
        "average-last-rounds": 2}))
    report = json.loads(path.read_text())
    # Three training centres pooled: three sites' fixed steps per round.
    assert [r["train"]["local_steps"] for r in report["rounds"]] == [6, 6]
    averaged = {k: (plain[1][0][k] + plain[2][0][k]) / 2 for k in plain[2][0]}
    for key, value in load_weights(path.parent / "final.safetensors")[0].items():
        np.testing.assert_allclose(value, averaged[key], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(plain[2][1][key], averaged[key], rtol=1e-5, atol=1e-7)
    assert not np.allclose(plain[2][0]["fc.weight"], plain[1][0]["fc.weight"])

"""A real SuperLink with a SuperNode that sends malformed replies (``client.faults``
``malformed``): the server refuses each with its reason, the other sites train, the model
stays finite and the run finishes with its report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.weights import load_weights
from simulations.local_deployment import LocalDeployment

pytestmark = pytest.mark.integration

ROUNDS = 3


def test_a_supernode_sending_malformed_replies_is_refused_and_the_others_train(tmp_path):
    run_config = {"num-server-rounds": ROUNDS, "model": "test_resnet", "image-size": 32,
                  "synthetic-images": 60, "output-dir": str(tmp_path / "runs"),
                  "cache-dir": str(tmp_path / "cache"), "run-name": "malformed",
                  "allow-synthetic": True}  # a real SuperLink: synthetic data must be asked for
    with LocalDeployment(3, tmp_path / "deployment", faults={2: "malformed"}) as deployment:
        path = deployment.run(run_config, timeout=900)
    report = json.loads(path.read_text())
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    faulty = {r["node_id"] for r in rounds[0]["rejected"]}
    assert len(faulty) == 1  # the SuperNode of site 2, and only it
    for result in rounds:
        assert {(r["node_id"], r["reply"]) for r in result["rejected"]} == {
            (*faulty, "train"), (*faulty, "val")}
        assert all(r["reason"] for r in result["rejected"])
        assert (result["sampled"], result["replied"], result["dropped"]) == (3, 3, [])
        assert {c["centre"] for c in result["clients"] if c["node_id"] not in faulty} == {
            "clinic-a", "clinic-b"}
        assert math.isfinite(result["train"]["train_loss"])
        assert result["validation"]["num-examples"] > 0
        assert math.isfinite(result["held_out"]["macro_f1"])
    # After the rounds: its reports at the chosen temperature, on both splits.
    assert [(r["node_id"], r["reply"]) for r in report["rejected_replies"]] == [
        (*faulty, "val"), (*faulty, "test")]
    assert [s["centre"] for s in report["best"]["in_distribution_test"]["sites"]] == [
        "clinic-a", "clinic-b"]
    final, _ = load_weights(path.parent / "final.safetensors")
    assert all(np.all(np.isfinite(array)) for array in final.values())
    markdown = (path.parent / "report.md").read_text()
    assert f"| {next(iter(faulty))} |" in markdown

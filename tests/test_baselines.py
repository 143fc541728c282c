"""Centralised baselines and held-out scoring with test-time BatchNorm adaptation."""

import numpy as np
import pytest

from common.baselines import BASELINES, SELECTED_BY, concatenate
from common.config import parse_run_config
from common.data import CentreData
from common.pipeline import new_model, score_held_out


@pytest.fixture
def tiny(tmp_path):
    """A run config on small synthetic clinics (clinic-d held out)."""
    return {"model": "test_resnet", "image-size": 32, "synthetic-images": 40,
            "num-server-rounds": 2, "augment": "none", "device": "cpu",
            "cache-dir": str(tmp_path / "cache")}


def centre(name: str, n: int, groups_from: int = 0) -> CentreData:
    return CentreData(name, ("a", "b"), np.zeros((n, 4, 4, 3), np.uint8),
                      np.arange(n) % 2, np.arange(groups_from, groups_from + n))


def test_concatenate_keeps_groups_of_different_centres_apart():
    joined = concatenate([centre("x", 3), centre("y", 2)], "pooled")
    assert len(joined) == 5 and joined.classes == ("a", "b")
    assert len(np.unique(joined.groups)) == 5


def test_pooled_selects_a_round_on_validation_and_scores_the_held_out_centre(tiny):
    [report] = BASELINES["pooled"](parse_run_config(tiny))
    assert report["held_out_centre"] == "clinic-d"
    assert report["training_centres"] == ["clinic-a", "clinic-b", "clinic-c"]
    best = max(report["rounds"], key=lambda r: (r["val_macro_f1"], r["round"]))
    assert report["best"]["round"] == best["round"]
    assert report["best"]["selected_by"] == SELECTED_BY
    assert 0.0 <= report["best"]["held_out"]["macro_f1"] <= 1.0
    assert report["best"]["held_out_bn_adapted"] is None


def test_local_trains_one_model_per_training_centre(tiny):
    reports = BASELINES["local"](parse_run_config({**tiny, "test-time-bn": True}))
    assert [r["training_centres"] for r in reports] == [["clinic-a"], ["clinic-b"], ["clinic-c"]]
    assert all(r["best"]["held_out_bn_adapted"] is not None for r in reports)


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

"""Weights survive the wire and the disk unchanged (or within half-precision error)."""

import numpy as np
import pytest
import torch
from torch import nn

from common.weights import from_wire, load_state, load_weights, model_state, save_weights, to_wire


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_state_round_trip_through_a_model():
    source = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    target = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    load_state(target, model_state(source))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key])


def test_load_state_names_the_mismatch():
    model = nn.Linear(3, 2)
    state = model_state(model)
    with pytest.raises(ValueError, match="weight"):
        load_state(model, {**state, "weight": np.zeros((5, 5), np.float32)})
    with pytest.raises(ValueError, match="missing keys"):
        load_state(model, {"weight": state["weight"]})


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 0), ("fp16", 1e-3), ("bf16", 1e-2)])
def test_wire_precision_round_trip(precision, tolerance):
    state = {"w": np.random.default_rng(0).normal(size=(10, 10)).astype(np.float32),
             "steps": np.array([7], dtype=np.int64)}
    wire = to_wire(state, precision)
    if precision != "fp32":
        assert wire["w"].nbytes == state["w"].nbytes // 2
    back = from_wire(wire, precision)
    assert back["w"].dtype == np.float32 and back["steps"] == 7
    np.testing.assert_allclose(back["w"], state["w"], rtol=tolerance, atol=tolerance)


def test_safetensors_round_trip(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1], np.int64)}
    path = save_weights(tmp_path / "m.safetensors", state, {"classes": ["x", "y"]})
    loaded, metadata = load_weights(path)
    assert metadata == {"classes": ["x", "y"]}
    assert set(loaded) == {"a", "b"}
    np.testing.assert_array_equal(loaded["a"], state["a"])


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors"):
        load_weights(tmp_path / "nothing.safetensors")


def test_safetensors_keep_scalars_and_transposed_arrays(tmp_path):
    state = {"step": np.array(7, np.int64), "t": np.arange(6, dtype=np.float32).reshape(2, 3).T}
    loaded, _ = load_weights(save_weights(tmp_path / "w.safetensors", state))
    assert loaded["step"].shape == () and int(loaded["step"]) == 7
    np.testing.assert_array_equal(loaded["t"], state["t"])

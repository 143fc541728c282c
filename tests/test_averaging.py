"""Weight averaging of global models over the last rounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.averaging import WeightAverager, average_states
from common.weights import load_state


def state(value: float, step: int) -> dict[str, np.ndarray]:
    return {"w": np.full((2, 3), value, np.float32), "bn.running_var": np.full(3, value + 1,
                                                                                np.float32),
            "bn.num_batches_tracked": np.array(step, np.int64)}


def test_floats_are_averaged_and_counters_taken_from_the_newest() -> None:
    averaged = average_states([state(1.0, 10), state(2.0, 20), state(6.0, 30)])
    np.testing.assert_allclose(averaged["w"], 3.0)
    np.testing.assert_allclose(averaged["bn.running_var"], 4.0)
    assert averaged["w"].dtype == np.float32
    assert averaged["bn.num_batches_tracked"] == 30
    assert averaged["bn.num_batches_tracked"].dtype == np.int64


def test_window_keeps_the_last_models_only() -> None:
    averager = WeightAverager(window=2)
    np.testing.assert_allclose(averager.update(state(1.0, 1))["w"], 1.0)
    np.testing.assert_allclose(averager.update(state(3.0, 2))["w"], 2.0)
    newest = state(7.0, 3)
    np.testing.assert_allclose(averager.update(newest)["w"], 5.0)
    newest["w"][:] = 100.0  # the averager holds its own copies
    np.testing.assert_allclose(averager.average()["w"], 5.0)


def test_mismatched_models_are_refused_naming_the_key() -> None:
    other = state(1.0, 1)
    other["w"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"model state 0: w is float32 \(3, 2\)"):
        average_states([other, state(2.0, 2)])
    with pytest.raises(ValueError, match="extra"):
        average_states([{**state(1.0, 1), "extra": np.zeros(1)}, state(2.0, 2)])
    with pytest.raises(ValueError, match="at least 1"):
        WeightAverager(0)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))


def test_averaged_global_models_load_and_average_a_linear_head() -> None:
    """Averaging real global models (BatchNorm statistics included) gives a model that loads,
    whose BatchNorm statistics are the means, and whose final linear layer computes the mean
    of the models' linear layers."""
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = small_net().train()
        model(torch.randn(8, 3, 6, 6))  # moves the running statistics
        states.append({k: v.detach().numpy().copy() for k, v in model.state_dict().items()})
    averaged = average_states(states)
    model = small_net()
    load_state(model, averaged)
    np.testing.assert_allclose(model[1].running_mean.numpy(),
                               np.mean([s["1.running_mean"] for s in states], axis=0), rtol=1e-6)
    assert int(model[1].num_batches_tracked) == 1
    features = torch.randn(5, 64)
    heads = []
    for s in states:
        head = nn.Linear(64, 2)
        head.load_state_dict({"weight": torch.from_numpy(s["3.weight"]),
                              "bias": torch.from_numpy(s["3.bias"])})
        heads.append(head(features))
    torch.testing.assert_close(model[3](features), torch.stack(heads).mean(dim=0))
    assert torch.isfinite(model.eval()(torch.randn(2, 3, 6, 6))).all()


def test_exported_models_average_the_window_and_a_resumed_run_restores_it(tmp_path) -> None:
    from common.averaging import WINDOW_FILE, ExportedModels

    models = ExportedModels(3, tmp_path)
    for server_round, value in enumerate((1.0, 2.0, 4.0, 8.0), start=1):
        exported = models.preview(state(value, server_round))
        expected = np.mean([1.0, 2.0, 4.0, 8.0][max(0, server_round - 3):server_round])
        np.testing.assert_allclose(exported["w"], expected)
        models.commit(server_round, state(value, server_round))
    np.testing.assert_allclose(models.current(state(8.0, 4))["w"], (2 + 4 + 8) / 3)
    assert (tmp_path / WINDOW_FILE).is_file()
    # A run that crashed after committing round 4 but before recording it resumes after 3.
    resumed = ExportedModels(3, tmp_path, completed=3)
    assert list(resumed.rounds) == [2, 3]  # round 1 had left the window, round 4 is dropped
    np.testing.assert_allclose(resumed.preview(state(16.0, 4))["w"], (2 + 4 + 16) / 3)
    assert resumed.preview(state(16.0, 4))["bn.num_batches_tracked"] == 4
    # Off: the global model itself, and nothing is written.
    off = ExportedModels(0, tmp_path / "off")
    plain = state(5.0, 1)
    assert off.preview(plain) is plain and off.current(plain) is plain
    off.commit(1, plain)
    assert not (tmp_path / "off").exists()

"""Central differential privacy on real Flower messages: what is clipped and noised, the fixed
denominator and its epsilon, the ledger written before any release, and a crashed and
resumed private run of the real ServerApp and ClientApp (see ``tests.loopback``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from torch import nn

from client.app import app as client_app
from client.privacy import dp_clipping_mod
from common.config import ConfigError, RunConfig
from common.methods import create_method
from common.privacy import BUFFERS_KEY, untrained_keys
from server.app import main as server_main
from server.privacy import LEDGER_FILE, PrivacyLedger, PrivateUpdates, private_updates
from server.rundir import RunDirectory
from server.strategies import create_strategy, record_to_state, state_to_record
from tests.loopback import LoopbackGrid, server_task
from tests.replies import EXPECTED, train_content

GLOBAL = {"conv.weight": np.zeros((2, 3), np.float32), "bn.running_var": np.ones(3, np.float32),
          "fc.bias": np.zeros(4, np.float32)}
BUFFERS = {"bn.running_var"}
TRAINED = ("conv.weight", "fc.bias")


@pytest.fixture(autouse=True)
def _server_task():
    with server_task():
        yield


class Nodes:
    """The part of Flower's Grid a strategy samples nodes from."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def shifted(value: float, state: dict[str, np.ndarray] = GLOBAL) -> dict[str, np.ndarray]:
    return {key: array + np.float32(value) for key, array in state.items()}


def reply(message: Message, state: dict[str, np.ndarray] | None) -> Message:
    """A site's training reply, or an error when ``state`` is None."""
    if state is None:
        return Message(error=Error(code=2, reason="site-error:data"), reply_to=message)
    return Message(content=train_content(state), reply_to=message)


def strategy_for(config: RunConfig):
    return create_strategy(config, create_method(config), GLOBAL, EXPECTED)


def private(tmp_path: Path, sites: int = 3, **settings) -> PrivateUpdates:
    config = RunConfig(**{"dp_noise_multiplier": 1.0, **settings})
    strategy = private_updates(strategy_for(config), config, sites, BUFFERS)
    strategy.use_ledger(PrivacyLedger(tmp_path / LEDGER_FILE), [])
    return strategy


def train_round(strategy: PrivateUpdates, updates: dict[int, dict | None], server_round: int = 1,
                start: dict[str, np.ndarray] = GLOBAL) -> dict[str, np.ndarray]:
    """The release of one round in which node ``n`` answers with ``updates[n]``."""
    messages = strategy.configure_train(server_round, state_to_record(start), ConfigRecord(),
                                        Nodes(list(updates)))
    replies = [reply(m, updates[m.metadata.dst_node_id]) for m in messages]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return record_to_state(arrays)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Epsilon of ``releases`` Gaussian mechanisms of sensitivity 1 and noise std
    ``noise_multiplier``: RDP alpha*T/(2 z^2), converted with the bound of Canonne, Kamath &
    Steinke (2020), minimised over a fine grid of orders."""
    alpha = np.linspace(1.001, 256, 1_000_000)
    rdp = releases * alpha / (2 * noise_multiplier**2)
    return float(np.min(rdp + np.log((alpha - 1) / alpha)
                        - (np.log(delta) + np.log(alpha)) / (alpha - 1)))


def ledger_lines(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / LEDGER_FILE).read_text().splitlines()]


def test_untrained_keys_are_the_batchnorm_buffers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    assert untrained_keys(model) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert untrained_keys(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))) == set()


def test_release_sums_accepted_updates_over_every_site_and_averages_buffers_in_clear(tmp_path):
    strategy = private(tmp_path, dp_noise_multiplier=1e-9, dp_clipping_norm=100.0)
    released = train_round(strategy, {1: shifted(1.0), 2: shifted(4.0), 3: shifted(np.nan)})
    assert [r["node_id"] for r in strategy.rejected] == [3]
    for key in TRAINED:  # (1 + 4 + 0) / 3 sites, not the mean 2.5 of the accepted two
        np.testing.assert_allclose(released[key], 5 / 3, atol=1e-6)
    np.testing.assert_array_equal(released["bn.running_var"], np.full(3, 3.5, np.float32))
    assert {k: v.dtype for k, v in released.items()} == {k: np.float32 for k in GLOBAL}
    assert ledger_lines(tmp_path)[0]["contributions"] == 2
    assert ledger_lines(tmp_path)[0]["denominator"] == 3


def test_noise_has_std_z_c_over_n_on_trained_tensors_and_never_touches_buffers(tmp_path):
    start = {"conv.weight": np.zeros((100, 100), np.float32),
             "bn.running_var": np.full(100, 0.01, np.float32)}
    strategy = private(tmp_path, dp_noise_multiplier=1.0, dp_clipping_norm=1.0)
    released = train_round(strategy, {1: None, 2: None, 3: None}, start=start)
    assert np.std(released["conv.weight"]) == pytest.approx(1 / 3, rel=0.03)
    np.testing.assert_array_equal(released["bn.running_var"], start["bn.running_var"])
    # No site answered, yet the round released a noised model and counts as a release.
    assert strategy.round_privacy()["releases"] == 1
    assert strategy.round_privacy()["contributions"] == 0


def test_server_clips_an_update_the_site_did_not_clip(tmp_path):
    strategy = private(tmp_path, dp_noise_multiplier=1e-9, dp_clipping_norm=1.0)
    released = train_round(strategy, {1: shifted(10.0), 2: None, 3: None})
    norm = math.sqrt(sum(float(np.sum(released[k] ** 2)) for k in TRAINED))
    assert norm == pytest.approx(1 / 3, rel=1e-5)
    np.testing.assert_allclose(released["bn.running_var"], 11.0)  # buffers are not clipped


def test_an_update_that_cannot_be_clipped_is_rejected_not_summed(tmp_path):
    strategy = private(tmp_path, dp_noise_multiplier=1e-9, dp_clipping_norm=100.0)
    integers = {key: np.full(value.shape, 10**9, np.int64) for key, value in GLOBAL.items()}
    released = train_round(strategy, {1: integers, 2: shifted(3.0), 3: None})
    assert [r["node_id"] for r in strategy.rejected] == [1]
    np.testing.assert_allclose(released["fc.bias"], 1.0, atol=1e-6)


def test_epsilon_equals_the_gaussian_closed_form_for_the_fixed_denominator(tmp_path):
    # Known value: one release at noise multiplier 1 costs epsilon 4.73 at delta 1e-5.
    assert gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(4.7284, abs=1e-3)
    strategy = private(tmp_path, dp_noise_multiplier=1.0)
    for server_round in range(1, 11):  # however many sites contribute, each round costs z = 1
        failing = {1: None} if server_round % 3 == 0 else {}
        train_round(strategy, {1: shifted(0.1), 2: shifted(0.2), 3: None, **failing},
                    server_round)
    spent = strategy.round_privacy()
    assert spent["releases"] == 10 and spent["delta"] == 1e-5
    assert spent["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 10, 1e-5), rel=1e-3)
    assert strategy.privacy_report()["epsilon"] == spent["epsilon"]
    assert [line["noise_multiplier"] for line in ledger_lines(tmp_path)] == [1.0] * 10


def test_the_ledger_line_is_fsynced_before_the_release_leaves(tmp_path, monkeypatch):
    strategy = private(tmp_path / "no-such-folder")
    with pytest.raises(FileNotFoundError):  # no ledger line, no release
        train_round(strategy, {1: shifted(0.1), 2: shifted(0.2), 3: shifted(0.3)})
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    strategy = private(tmp_path)
    train_round(strategy, {1: shifted(0.1), 2: shifted(0.2), 3: shifted(0.3)})
    assert synced == [str(tmp_path / LEDGER_FILE), str(tmp_path)]
    with pytest.raises(RuntimeError, match="needs a privacy ledger"):
        config = RunConfig(dp_noise_multiplier=1.0)
        unledgered = private_updates(strategy_for(config), config, 3, BUFFERS)
        train_round(unledgered, {1: shifted(0.1), 2: shifted(0.2), 3: None})


def test_a_resumed_server_counts_every_ledgered_release_once(tmp_path):
    first = private(tmp_path)
    for server_round in (1, 2):
        train_round(first, {1: shifted(0.1), 2: shifted(0.2), 3: shifted(0.3)}, server_round)
    resumed = private(tmp_path)  # the server crashed after releasing round 2
    assert resumed.round_privacy() == first.round_privacy()
    with (tmp_path / LEDGER_FILE).open("a") as ledger:  # a crash in the middle of an append
        ledger.write('{"round": 3, "noise_mul')
    again = private(tmp_path)
    assert again.round_privacy()["releases"] == 2
    train_round(again, {1: shifted(0.1), 2: shifted(0.2), 3: shifted(0.3)}, 3)
    assert [line["round"] for line in ledger_lines(tmp_path)] == [1, 2, 3]
    assert again.epsilon() == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5), rel=1e-3)
    lines = (tmp_path / LEDGER_FILE).read_text().splitlines()
    (tmp_path / LEDGER_FILE).write_text("\n".join([lines[0], "garbage", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=f"{LEDGER_FILE}, line 2: not a JSON release record"):
        private(tmp_path)
    (tmp_path / LEDGER_FILE).unlink()
    with pytest.raises(ValueError, match="records 0 releases but the run's completed rounds "
                                         "counted 3: it was truncated or removed"):
        again.use_ledger(PrivacyLedger(tmp_path / LEDGER_FILE),
                         [{"round": 3, "privacy": again.round_privacy()}])


@pytest.mark.parametrize("config", [RunConfig(dp_noise_multiplier=1.0, strategy="fedmedian"),
                                    RunConfig(dp_noise_multiplier=1.0, wire_precision="bf16")])
def test_incompatible_settings_are_refused_naming_the_field(config):
    with pytest.raises(ConfigError, match="run config field 'dp-noise-multiplier'"):
        private_updates(strategy_for(config), config, 3, BUFFERS)
    assert private_updates(strategy_for(RunConfig()), RunConfig(), 3, BUFFERS) is None


def test_sites_clip_their_trained_tensors_only_when_the_server_asks(tmp_path):
    messages = list(private(tmp_path, dp_clipping_norm=1.0).configure_train(
        1, state_to_record(GLOBAL), ConfigRecord(), Nodes([1, 2, 3])))
    assert messages[0].content["config"][BUFFERS_KEY] == ["bn.running_var"]
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def train(message: Message, _: Context) -> Message:
        return reply(message, shifted(10.0))

    clipped = record_to_state(dp_clipping_mod(messages[0], context, train).content["arrays"])
    norm = math.sqrt(sum(float(np.sum((clipped[k] - GLOBAL[k]) ** 2)) for k in TRAINED))
    assert norm == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_array_equal(clipped["bn.running_var"], np.full(3, 11.0, np.float32))
    del messages[0].content["config"][KEY_CLIPPING_NORM]
    plain = record_to_state(dp_clipping_mod(messages[0], context, train).content["arrays"])
    np.testing.assert_allclose(plain["fc.bias"], 10.0)


def test_a_private_batchnorm_run_crashed_after_a_release_counts_that_release_once(
        tmp_path, monkeypatch):
    """The real ServerApp and ClientApp: round 2 is released (sent to the sites for validation
    and scored on the held-out centre), then the server dies before its checkpoint. The
    resumed run releases round 2 again: the ledger holds both releases, epsilon counts 3."""
    run_config = RunConfig(model="test_resnet", image_size=16, synthetic_images=40,
                           num_server_rounds=2, dp_noise_multiplier=1.0, augment="none",
                           device="cpu", output_dir=str(tmp_path / "runs"),
                           cache_dir=str(tmp_path / "cache"),
                           allow_synthetic=True).to_dict()  # the loopback grid is no simulation
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    complete_round = RunDirectory.complete_round

    def crash_in_round_two(run, rounds, state):
        if rounds[-1]["round"] == 2:
            raise KeyboardInterrupt("server killed before its checkpoint")
        complete_round(run, rounds, state)

    monkeypatch.setattr(RunDirectory, "complete_round", crash_in_round_two)
    grid = LoopbackGrid(client_app, run_config, num_nodes=3)
    with pytest.raises(KeyboardInterrupt):
        server_main(grid, context)
    released = [t for _, t, _ in grid.wire if t.startswith("evaluate")]
    assert len(released) == 6  # rounds 1 and 2, three sites each
    monkeypatch.setattr(RunDirectory, "complete_round", complete_round)
    server_main(LoopbackGrid(client_app, run_config, num_nodes=3), context)

    run_dir = next((tmp_path / "runs").iterdir())
    assert [line["round"] for line in ledger_lines(run_dir)] == [1, 2, 2]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["privacy"]["releases"] == 3
    assert report["privacy"]["epsilon"] == pytest.approx(gaussian_epsilon(1.0, 3, 1e-5),
                                                          rel=1e-3)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for result in report["rounds"]:  # BatchNorm statistics are not noised: no NaN
        assert all(math.isfinite(result["held_out"][k]) for k in ("macro_f1", "ece", "loss"))
    assert "BatchNorm running statistics" in report["privacy"]["not_covered"][0]
    markdown = (run_dir / "report.md").read_text()
    assert "epsilon 9.010 at delta 1e-05" in markdown and "It does not cover" in markdown

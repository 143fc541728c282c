"""Run directories: a restarted server resumes after the last checkpointed round."""

from __future__ import annotations

import numpy as np
import pytest

from server import rundir
from server.rundir import RunDirectory

CONFIG = {"model": "test_resnet", "num-server-rounds": 3}


def weights(value: float) -> dict[str, np.ndarray]:
    return {"fc.weight": np.full((2, 2), value, np.float32)}


def round_record(number: int) -> dict:
    return {"round": number, "held_out": {"macro_f1": number / 10}}


def test_a_new_run_starts_at_round_one(tmp_path):
    state, rounds, completed = RunDirectory.open(tmp_path, "run", CONFIG).resume()
    assert (state, rounds, completed) == (None, [], 0)


def test_a_reopened_run_resumes_after_its_last_round_with_its_metrics(tmp_path):
    run = RunDirectory.open(tmp_path, "run", CONFIG)
    run.complete_round([round_record(1)], weights(1.0))
    run.complete_round([round_record(1), round_record(2)], weights(2.0))
    state, rounds, completed = RunDirectory.open(tmp_path, "run", CONFIG).resume()
    assert completed == 2 and [r["round"] for r in rounds] == [1, 2]
    assert np.all(state["fc.weight"] == 2.0)
    other = RunDirectory.open(tmp_path, "run", {**CONFIG, "num-server-rounds": 4})
    assert other.path != run.path  # another config never resumes this run


@pytest.mark.parametrize("failing_write", ["_write_json_atomically", "save_weights"])
def test_a_crash_while_recording_a_round_reruns_it_and_keeps_every_earlier_metric(
        tmp_path, monkeypatch: pytest.MonkeyPatch, failing_write: str):
    run = RunDirectory.open(tmp_path, "run", CONFIG)
    run.complete_round([round_record(1)], weights(1.0))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(rundir, failing_write, crash)
    with pytest.raises(OSError):
        run.complete_round([round_record(1), round_record(2)], weights(2.0))
    monkeypatch.undo()
    state, rounds, completed = RunDirectory.open(tmp_path, "run", CONFIG).resume()
    # Whichever write failed, the resumed run has the metrics of every round it will not
    # repeat, and repeats round 2 from round 1's weights.
    assert completed == 1 and [r["round"] for r in rounds] == [1]
    assert np.all(state["fc.weight"] == 1.0)

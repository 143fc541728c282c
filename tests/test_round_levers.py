"""Server-side levers through the real ServerApp and ClientApp (``tests.loopback``): weight
averaging of the last rounds' global models (``average-last-rounds``), kept across a resume,
and scoring the held-out centre only every k rounds (``held-out-every``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.app import app as client_app
from common import selection
from common.averaging import WINDOW_FILE
from common.config import RunConfig
from common.weights import load_weights
from server.app import main as server_main
from server.recorder import RunRecorder, progress_line
from server.report import write_report
from tests.loopback import LoopbackGrid, server_task


def run_config(tmp_path: Path, **settings) -> dict:
    """Two small synthetic training centres, clinic-d held out."""
    centres = tmp_path / "centres.toml"
    centres.write_text("".join(f'[[centre]]\nname = "clinic-{c}"\nformat = "synthetic"\n\n'
                               for c in "abd"))
    return RunConfig(**{
        "model": "test_resnet", "image_size": 16, "synthetic_images": 40, "augment": "none",
        "device": "cpu", "held_out": "clinic-d", "local_steps": 2, "batch_size": 8,
        "data_source": str(centres), "output_dir": str(tmp_path / "runs"),
        "cache_dir": str(tmp_path / "cache"), **settings}).to_dict()


def federate(config: dict) -> None:
    grid = LoopbackGrid(client_app, config, num_nodes=2)
    with server_task():
        server_main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=config))


@pytest.fixture
def recorded(monkeypatch):
    """Each recorded round's plain global model (what training continues from) and exported
    model, by round, as the ServerApp hands them to the recorder."""
    rounds: dict[int, list[tuple[dict, dict]]] = {}
    real = RunRecorder.complete_round

    def spy(self, record, state, exported):
        rounds.setdefault(record["round"], []).append((state, exported))
        return real(self, record, state, exported)

    monkeypatch.setattr(RunRecorder, "complete_round", spy)
    return rounds


def mean(*states: dict) -> dict:
    return {k: np.mean([s[k] for s in states], axis=0, dtype=np.float64).astype(states[0][k].dtype)
            for k in states[0]}


def assert_same(state: dict, expected: dict) -> None:
    assert set(state) == set(expected)
    for key in state:
        np.testing.assert_allclose(state[key], expected[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_the_exported_weights_average_the_last_global_models(tmp_path, recorded):
    federate(run_config(tmp_path, num_server_rounds=3, average_last_rounds=2))
    plain = {r: recorded[r][0][0] for r in (1, 2, 3)}
    exported = {r: recorded[r][0][1] for r in (1, 2, 3)}
    assert_same(exported[1], plain[1])
    assert_same(exported[2], mean(plain[1], plain[2]))
    assert_same(exported[3], mean(plain[2], plain[3]))
    assert not np.allclose(plain[3]["fc.weight"], plain[2]["fc.weight"])  # it trained
    run_dir = next((tmp_path / "runs").glob("*"))
    report = json.loads((run_dir / "report.json").read_text())
    assert_same(load_weights(run_dir / "final.safetensors")[0], exported[3])
    assert_same(load_weights(run_dir / "best.safetensors")[0],
                exported[report["best"]["round"]])
    # Training goes on from the plain global model: that is what the checkpoint keeps.
    assert_same(load_weights(run_dir / "checkpoint.safetensors")[0], plain[3])


def test_a_resumed_run_keeps_the_averaging_window(tmp_path, recorded, monkeypatch):
    config = run_config(tmp_path, num_server_rounds=3, average_last_rounds=2)
    real = RunRecorder.complete_round  # the spy

    def crash_in_round_3(self, record, state, exported):
        if record["round"] == 3:
            raise RuntimeError("the server machine went down")
        return real(self, record, state, exported)

    monkeypatch.setattr(RunRecorder, "complete_round", crash_in_round_3)
    with pytest.raises(RuntimeError, match="went down"):
        federate(config)
    [run_dir] = (tmp_path / "runs").glob("*")
    assert load_weights(run_dir / WINDOW_FILE)[1]["rounds"] == [2, 3]  # 3 written, unrecorded
    monkeypatch.setattr(RunRecorder, "complete_round", real)
    federate(config)  # the same run again: resumes after round 2
    assert list(tmp_path.glob("runs/*")) == [run_dir]
    plain_2 = recorded[2][0][0]
    plain_3, exported_3 = recorded[3][-1]
    assert len(recorded[3]) == 1 and len(recorded[2]) == 1  # round 3 recorded once, after resume
    assert_same(exported_3, mean(plain_2, plain_3))
    assert_same(load_weights(run_dir / "final.safetensors")[0], exported_3)


def test_the_held_out_centre_is_scored_every_k_rounds_last_and_when_selected(
        tmp_path, monkeypatch, capsys):
    # Sites' validation that gets worse after round 1: rounds 2-4 never become the selected one.
    monkeypatch.setattr(selection, "selection_score", lambda r: 1.0 / r["round"])
    federate(run_config(tmp_path, num_server_rounds=4, held_out_every=3))
    run_dir = next((tmp_path / "runs").glob("*"))
    report = json.loads((run_dir / "report.json").read_text())
    scored = [r["round"] for r in report["rounds"] if r["held_out"] is not None]
    assert scored == [1, 3, 4]  # selected so far, every third, last
    assert report["best"]["round"] == 1 and report["best"]["held_out"] is not None
    assert report["held_out_macro_f1"] == report["rounds"][-1]["held_out"]["macro_f1"]
    [line] = [line for line in capsys.readouterr().out.splitlines() if "round 2/4" in line]
    assert "held-out not scored this round" in line
    assert (run_dir / "f1_over_rounds.png").is_file() and (run_dir / "model_card.json").is_file()


def round_with(score: float, number: int, held_out: dict | None) -> dict:
    # One site's report, combined as the server does: its macro-F1 rises with ``score``.
    correct = round(10 * score)
    report = {selection.WEIGHT_KEY: 20, "val_confusion_matrix": [correct, 10 - correct, 0, 10]}
    return {"round": number, "validation": selection.combine_site_reports([report]),
            "held_out": held_out}


def test_the_rounds_table_shows_the_score_that_selects_the_round(tmp_path):
    # A big site that is always right and a small one that is always wrong on class b: the
    # pooled macro-F1 and the capped one that selects the round differ.
    big = {selection.WEIGHT_KEY: 200, "val_confusion_matrix": [100, 0, 0, 100]}
    small = {selection.WEIGHT_KEY: 20, "val_confusion_matrix": [10, 0, 10, 0]}
    validation = selection.combine_site_reports([big, small])
    assert abs(validation["val_macro_f1"] - validation[selection.SELECTION_KEY]) > 0.05
    held_out = {"macro_f1": 0.6, "balanced_accuracy": 0.6, "accuracy": 0.6, "ece": 0.1,
                "per_class_f1": {"a": 0.6, "b": 0.6}, "confusion_matrix": [[3, 2], [2, 3]]}
    config = RunConfig(num_server_rounds=1, output_dir=str(tmp_path))
    record = {"round": 1, "validation": validation, "held_out": held_out, "train": {},
              "replied": 2, "sampled": 2, "seconds": 1.0, "dropped": [], "rejected": []}
    best = {"round": 1, "selected_by": selection.SELECTED_BY, "held_out": held_out,
            "held_out_bn_adapted": None, "in_distribution_test": None}
    write_report(tmp_path, {"run_dir": str(tmp_path), "config": config.to_dict(),
                            "classes": ["a", "b"], "held_out_centre": "c",
                            "training_centres": ["x", "y"], "rounds": [record],
                            "final": {"round": 1, "held_out": held_out}, "best": best})
    markdown = (tmp_path / "report.md").read_text()
    assert f"| 1 | n/a | {validation[selection.SELECTION_KEY]:.3f} | 0.600 |" in markdown
    assert f"{validation[selection.SELECTION_KEY]:.3f}" in progress_line(record, 1)


def test_rounds_without_a_held_out_score_are_recorded_and_reported(tmp_path):
    config = RunConfig(num_server_rounds=5, held_out_every=3, output_dir=str(tmp_path))
    recorder = RunRecorder(config, ("a", "b"), "wbc5", ["x"])
    recorder.rounds = [round_with(0.8, 1, {"macro_f1": 0.5})]
    assert not recorder.scores_held_out(2)
    assert not recorder.scores_held_out(2, round_with(0.5, 2, None)["validation"])
    assert recorder.scores_held_out(2, round_with(0.9, 2, None)["validation"])  # selected
    assert recorder.scores_held_out(3) and recorder.scores_held_out(5)
    assert not recorder.scores_held_out(4)
    held_out = {"macro_f1": 0.6, "balanced_accuracy": 0.6, "accuracy": 0.6, "ece": 0.1,
                "per_class_f1": {"a": 0.6, "b": 0.6}, "confusion_matrix": [[3, 2], [2, 3]]}
    rounds = [{**round_with(0.8, 1, held_out), "train": {}, "replied": 1, "sampled": 1,
               "seconds": 1.0, "dropped": [], "rejected": []},
              {**round_with(0.5, 2, None), "train": {}, "replied": 1, "sampled": 1,
               "seconds": 1.0, "dropped": [], "rejected": []}]
    best = {"round": 1, "selected_by": selection.SELECTED_BY, "held_out": held_out,
            "held_out_bn_adapted": None, "in_distribution_test": None}
    report = {"run_dir": str(tmp_path), "config": config.to_dict(), "classes": ["a", "b"],
              "held_out_centre": "c", "training_centres": ["x"], "rounds": rounds,
              "final": {"round": 2, "held_out": held_out}, "best": best}
    write_report(tmp_path, report)
    markdown = (tmp_path / "report.md").read_text()
    assert "scored every 3 rounds" in markdown
    # Round 2: no training loss sent, the sites' validation score, no held-out score.
    assert "| 2 | n/a | 0.733 | n/a | n/a | n/a | 1/1 |" in markdown

"""End to end through `flwr run .` on Flower's real simulation engine (tiny model and images)."""

import json
import re
from pathlib import Path

import pytest
import torch

from common.config import parse_run_config
from common.data import CentreSpec
from common.metrics import expected_calibration_error
from common.modelcard import load_exported_model
from common.pipeline import load_centre_data
from common.train import predict_probabilities
from tests.integration.conftest import flwr_run

pytestmark = pytest.mark.integration


def test_federated_run_writes_a_report_that_beats_chance(flower_env, tmp_path):
    output = flwr_run(flower_env, {
        "num-server-rounds": 3, "local-epochs": 4, "learning-rate": 0.005,
        "model": "test_resnet", "image-size": 32, "synthetic-images": 150,
        "stain-normalise": "reinhard",
        "output-dir": str(tmp_path / "runs"), "cache-dir": str(tmp_path / "cache"),
    }, supernodes=3)
    assert len(re.findall(r"\[cytofed\] round \d/3", output)) == 3, output[-3000:]
    report_path = re.search(r"\[cytofed\] report: (\S+)", output).group(1)
    report = json.loads(Path(report_path).read_text())
    assert report["held_out_centre"] == "clinic-d"
    assert "clinic-d" not in report["training_centres"]
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    final = report["final"]["held_out"]
    # Five classes: a uniform random guess scores a macro-F1 of about 0.2.
    assert final["macro_f1"] > 0.25
    assert report["held_out_macro_f1"] == final["macro_f1"]
    run_dir = tmp_path / "runs"
    for name in ("report.md", "final.safetensors", "best.safetensors", "confusion_matrix.png",
                 "f1_over_rounds.png"):
        assert len(list(run_dir.glob(f"*/{name}"))) == 1, name
    assert_exported_at_the_federated_temperature(report, output)


def assert_exported_at_the_federated_temperature(report: dict, output: str) -> None:
    """Every site's curve chose T; the card holds T and the run's input (stain normalisation,
    the backbone's mean/std); the report's held-out ECE of the exported model is at T."""
    calibration = report["calibration"]
    assert calibration["sites"] == sorted(report["training_centres"]), calibration
    assert calibration["left_out"] == []
    assert f"[cytofed] temperature {calibration['temperature']:.3f} from 3 sites" in output
    model, card = load_exported_model(Path(report["run_dir"]))
    assert card.temperature == calibration["temperature"] == report["best"]["temperature"]
    assert card.preprocessing.stain_normalisation == "reinhard"
    assert card.preprocessing.mean == card.preprocessing.std == (0.5, 0.5, 0.5)
    config = parse_run_config(report["config"])
    held_out = load_centre_data(CentreSpec("clinic-d", format="synthetic"), config)
    inputs, cpu = card.preprocessing.model_input(), torch.device("cpu")
    probabilities = predict_probabilities(model, inputs.place(held_out.images, cpu), cpu,
                                          inputs, card.temperature)
    assert report["best"]["held_out"]["ece"] == pytest.approx(
        expected_calibration_error(held_out.labels, probabilities), abs=1e-5)
    tested = report["best"]["in_distribution_test"]
    assert sorted(s["centre"] for s in tested["sites"]) == sorted(report["training_centres"])


def test_bad_config_is_refused_before_training(flower_env, tmp_path):
    output = flwr_run(flower_env, {"learning-rate": -1.0, "output-dir": str(tmp_path / "runs")},
                      supernodes=3, timeout=300)
    assert "run config field 'learning-rate': expected a positive number, got -1.0" in output
    assert "configure_train" not in output and "[cytofed] round" not in output
    assert not (tmp_path / "runs").exists()

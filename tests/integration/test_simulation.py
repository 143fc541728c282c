"""End to end through `flwr run .` on Flower's real simulation engine (tiny model and images)."""

import json
import re
from pathlib import Path

import pytest

from tests.integration.conftest import flwr_run

pytestmark = pytest.mark.integration


def test_federated_run_writes_a_report_that_beats_chance(flower_env, tmp_path):
    output = flwr_run(flower_env, {
        "num-server-rounds": 3, "local-epochs": 4, "learning-rate": 0.005,
        "model": "test_resnet", "image-size": 32, "synthetic-images": 150,
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


def test_bad_config_is_refused_before_training(flower_env, tmp_path):
    output = flwr_run(flower_env, {"learning-rate": -1.0, "output-dir": str(tmp_path / "runs")},
                      supernodes=3, timeout=300)
    assert "run config field 'learning-rate': expected a positive number, got -1.0" in output
    assert "configure_train" not in output and "[cytofed] round" not in output
    assert not (tmp_path / "runs").exists()

"""`cytofed bench` with Flower: its figure (d), federation scaling (`--sites`) and the local
deployment engine, on real Flower simulations and processes."""

import json
import os
from pathlib import Path

import pytest

from simulations.cli import main
from simulations.local_deployment import LocalDeployment
from tests.test_bench import TINY, assert_sane

pytestmark = pytest.mark.integration


def test_bench_prints_all_five_figures(tiny_centre, capsys):
    flower = "num-server-rounds=2 model='test_resnet' image-size=32 synthetic-images=60"
    assert main([*TINY, *tiny_centre, "--flower-config", flower, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert_sane(result)
    figure = result["flower"]
    assert figure["rounds"] == 2 and figure["sites"] == 3
    assert 0 < figure["critical_path_compute_seconds"] < figure["round_seconds"]
    assert 0 < figure["overhead_ratio"] < 1
    assert figure["summed_site_compute_seconds"] > 0
    assert figure["update_bytes"] > 0
    assert 0 <= figure["held_out_macro_f1"] <= 1


def test_bench_sites_measures_round_time_and_server_memory_per_site_count(tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("CYTOFED_CACHE_DIR", str(tmp_path / "cache"))
    figure = tmp_path / "sites.png"
    assert main(["bench", "--device", "cpu", "--sites", "2,3", "--figure", str(figure),
                 "--flower-config", "model='test_resnet' num-server-rounds=2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["sites"] for r in results] == [2, 3]
    for result in results:
        assert result["rounds"] == 2
        assert result["workers"] == min(os.cpu_count() or 1, 3, result["sites"])
        assert 0 < result["critical_path_compute_seconds"] < result["round_seconds"]
        assert result["server_peak_bytes"] >= result["server_baseline_bytes"] > 0
        assert result["server_growth_in_updates"] == pytest.approx(
            result["server_growth_bytes"] / result["update_bytes"])
    assert figure.stat().st_size > 0


def processes_with_env(marker: str) -> list[int]:
    """Ids of the processes whose environment contains ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_local_deployment_runs_the_app_and_stops_every_process(tmp_path):
    run_config = {"num-server-rounds": 2, "model": "test_resnet", "image-size": 32,
                  "synthetic-images": 60, "output-dir": str(tmp_path / "runs"),
                  "cache-dir": str(tmp_path / "cache"), "run-name": "deployed",
                  "allow-synthetic": True}  # a real SuperLink: synthetic data must be asked for
    with LocalDeployment(3, tmp_path / "deployment") as deployment:
        assert processes_with_env(f"FLWR_HOME={tmp_path / 'deployment'}")
        report = json.loads(deployment.run(run_config, timeout=900).read_text())
    assert [r["replied"] for r in report["rounds"]] == [3, 3]
    assert {c["centre"] for c in report["rounds"][-1]["clients"]} == {
        "clinic-a", "clinic-b", "clinic-c"}  # partition-id i is the i-th training centre
    assert 0 <= report["held_out_macro_f1"] <= 1
    assert not processes_with_env(f"FLWR_HOME={tmp_path / 'deployment'}")

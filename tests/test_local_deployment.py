"""Choosing Flower's engine and describing a local deployment; running one is an integration
test (tests/integration/test_bench_flower.py)."""

from __future__ import annotations

import pytest

from simulations.local_deployment import ENGINE_VARIABLE, LocalDeployment, engine, flower_program


def test_the_engine_is_simulation_unless_the_variable_names_deployment(monkeypatch):
    monkeypatch.delenv(ENGINE_VARIABLE, raising=False)
    assert engine() == "simulation"
    monkeypatch.setenv(ENGINE_VARIABLE, "deployment")
    assert engine() == "deployment"
    monkeypatch.setenv(ENGINE_VARIABLE, "ray")
    with pytest.raises(ValueError, match=f"{ENGINE_VARIABLE} is 'ray'; expected one of"):
        engine()


def test_a_deployment_needs_a_site_and_flower_commands_are_found(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="at least one site"):
        LocalDeployment(0, tmp_path)
    assert flower_program("flower-superlink").endswith("flower-superlink")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no-such-flower-command not found"):
        flower_program("no-such-flower-command")

"""A production run (real SuperNodes on a SuperLink) never trains on synthetic data unless
the run config asks for it with ``allow-synthetic = true``."""

from __future__ import annotations

from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from common.config import SYNTHETIC, ConfigError, RunConfig


def is_simulation(grid: Grid) -> bool:
    """Whether the ServerApp runs on Flower's simulation engine (every other grid is a
    deployment)."""
    return isinstance(grid, InMemoryGrid)


def refuse_synthetic_in_production(config: RunConfig, grid: Grid) -> None:
    """Raise ConfigError for a deployment on the synthetic clinics without ``allow-synthetic``."""
    if config.data_source == SYNTHETIC and not config.allow_synthetic and not is_simulation(grid):
        raise ConfigError("data-source", "the consortium's centres TOML file in a production "
                          "run (set allow-synthetic=true for a demonstration on the synthetic "
                          "clinics)", config.data_source)

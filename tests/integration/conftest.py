"""Real Flower processes for integration tests, stopped by process id when a test ends.

Every environment made here has its own local-SuperLink ports and process token
(``simulations.local_run``): tests of two checkouts on one machine never share a SuperLink,
and teardown stops exactly the processes the test started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from simulations.local_run import TOKEN_KEY, isolated_environment, processes_of, stop_processes_of

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def processes_running(env: dict[str, str], command: str) -> list[int]:
    """Ids of the processes started with ``env`` whose command line contains ``command``."""
    found = []
    for pid in processes_of(env[TOKEN_KEY]):
        try:
            if command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def stop_processes(pids: list[int]) -> None:
    """SIGKILL each of ``pids`` (a crash, as tests of failures want it)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def flower_environment(home: Path) -> dict[str, str]:
    """Environment for Flower processes and `flwr` commands with a private FLWR_HOME, free
    local-SuperLink ports and a process token."""
    return {**isolated_environment(), "FLWR_HOME": str(home),
            "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}


def stop_flower(env: dict[str, str]) -> None:
    """Stop every process started with this environment (by pid)."""
    stop_processes_of(env[TOKEN_KEY])


@pytest.fixture
def flower_env(tmp_path: Path):
    """Environment for `flwr` commands with a private FLWR_HOME; stops what they started."""
    env = flower_environment(tmp_path / "flwr-home")
    yield env
    stop_flower(env)


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
    return result


def toml_value(value: object) -> str:
    """A run-config value as `--run-config` reads it (TOML: 'text', true, 2, 0.5)."""
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def flwr_run_command(run_config: dict, supernodes: int = 3,
                     superlink: str | None = None) -> list[str]:
    """`flwr run . --stream` on a local simulation of ``supernodes`` SuperNodes or, given
    ``superlink``, on that SuperLink connection of the Flower config."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    if superlink:
        return [str(BIN / "flwr"), "run", ".", superlink, "--stream", "--run-config", overrides]
    return [str(BIN / "flwr"), "run", ".", "--stream", "--federation-config",
            f"num-supernodes={supernodes} client-resources-num-cpus=1",
            "--run-config", overrides]


def flwr_run(env: dict, run_config: dict, supernodes: int, timeout: float = 900) -> str:
    """`flwr run . --stream` on a local simulation; returns its combined output.

    `flwr run` exits 0 once the log stream ends, even when the run failed: callers assert
    on the output.
    """
    result = subprocess.run(flwr_run_command(run_config, supernodes), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output

"""Real Flower processes for integration tests, stopped by process id when a test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def processes_with_env(marker: str, command: str = "") -> list[int]:
    """Ids of processes whose environment contains ``marker`` (our own FLWR_HOME) and whose
    command line contains ``command``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (marker.encode() in (entry / "environ").read_bytes()
                    and command.encode() in (entry / "cmdline").read_bytes()):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_processes(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def flower_environment(home: Path) -> dict[str, str]:
    """Environment for Flower processes and `flwr` commands with a private FLWR_HOME."""
    return {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
            "PYTHONUNBUFFERED": "1"}


def stop_flower(env: dict[str, str]) -> None:
    """Kill every process that runs with this environment's FLWR_HOME."""
    stop_processes(processes_with_env(f"FLWR_HOME={env['FLWR_HOME']}"))


@pytest.fixture
def flower_env(tmp_path: Path):
    """Environment for `flwr` commands with a private FLWR_HOME; kills what they started."""
    env = flower_environment(tmp_path / "flwr-home")
    yield env
    stop_flower(env)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)
    return result


def flwr_run_command(run_config: dict, supernodes: int = 3,
                     superlink: str | None = None) -> list[str]:
    """`flwr run . --stream` on a local simulation of ``supernodes`` SuperNodes or, given
    ``superlink``, on that SuperLink connection of the Flower config."""
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                         for k, v in run_config.items())
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

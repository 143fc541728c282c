"""Real Flower processes for integration tests, stopped by process id when a test ends."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def processes_with_env(marker: str) -> list[int]:
    """Ids of processes whose environment contains ``marker`` (our own FLWR_HOME)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_processes(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def flower_env(tmp_path: Path):
    """Environment for `flwr` commands with a private FLWR_HOME; kills what they started."""
    home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONUNBUFFERED": "1"}
    yield env
    stop_processes(processes_with_env(f"FLWR_HOME={home}"))


def flwr_run(env: dict, run_config: dict, supernodes: int, timeout: float = 900) -> str:
    """`flwr run . --stream` on a local simulation; returns its combined output.

    `flwr run` exits 0 once the log stream ends, even when the run failed: callers assert
    on the output.
    """
    overrides = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                         for k, v in run_config.items())
    command = [str(BIN / "flwr"), "run", ".", "--stream", "--federation-config",
               f"num-supernodes={supernodes} client-resources-num-cpus=1",
               "--run-config", overrides]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output

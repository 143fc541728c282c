"""Local Flower runs that neither share a SuperLink nor leave processes behind.

Flower starts the local SuperLink of ``flwr run .`` on fixed ports (39091 and 39093) and
leaves it running, so two checkouts on one machine would send their runs to the same one.
:func:`isolated_environment` gives a command free ports of its own
(``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, ``FLWR_LOCAL_CONTROL_API_PORT``) and a random
token in ``CYTOFED_PROCESS_TOKEN``, which every process it starts inherits (Flower's detached
SuperLink, SuperExec and simulation, Ray's workers); :func:`stop_processes_of` stops exactly
those, each by its pid. Nothing is found by a name pattern. From a shell (``make run``)::

    python -m simulations.local_run [--timeout SECONDS] -- flwr run . --stream ...

exits with the command's status, or 124 when it ran past ``--timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

TOKEN_KEY = "CYTOFED_PROCESS_TOKEN"
PORT_KEYS = ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT")
TIMED_OUT = 124  # as timeout(1)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def isolated_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with free local-SuperLink ports and a
    new process token."""
    env = dict(os.environ if base is None else base)
    env.update({key: str(free_port()) for key in PORT_KEYS})
    env[TOKEN_KEY] = secrets.token_hex(16)
    return env


def processes_of(token: str) -> list[int]:
    """Ids of the processes (readable by this user) whose environment holds ``token``."""
    entry = f"{TOKEN_KEY}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            variables = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry in variables:
            found.append(int(proc.name))
    return found


def stop_processes_of(token: str, grace: float = 5.0) -> list[int]:
    """Stop every process holding ``token``: SIGTERM, then SIGKILL after ``grace`` seconds.

    Returns the ids that were signalled.
    """
    signalled = processes_of(token)
    for pid in signalled:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := processes_of(token)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return signalled


def run_isolated(command: Sequence[str], timeout: float | None = None,
                 env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` in an :func:`isolated_environment`; afterwards (also on timeout or
    Ctrl-C) stop every process it left. Returns its exit status or :data:`TIMED_OUT`."""
    env = isolated_environment(env)
    ports = ", ".join(f"{key}={env[key]}" for key in PORT_KEYS)
    print(f"[cytofed] local run on free ports ({ports})", file=sys.stderr, flush=True)
    process = subprocess.Popen(list(command), env=env)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"[cytofed] stopped after {timeout:g}s", file=sys.stderr, flush=True)
        return TIMED_OUT
    finally:
        left = stop_processes_of(env[TOKEN_KEY])
        process.wait()
        if left:
            print(f"[cytofed] stopped the {len(left)} processes the run left (local "
                  "SuperLink, workers)", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.local_run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop the command and everything it started after this many "
                             "seconds (exit status 124)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the command, e.g. flwr run . --stream")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    return run_isolated(command, args.timeout)


if __name__ == "__main__":
    sys.exit(main())

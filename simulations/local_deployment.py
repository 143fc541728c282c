"""Flower's deployment engine on one machine: a SuperLink and one SuperNode per site as local
processes on loopback, no Ray.

The federated runs of ``cytofed loco`` (with ``CYTOFED_FLOWER_ENGINE=deployment``) and
``cytofed bench --flower-engine deployment`` use it where Ray is missing, as on the GPU machine
of the device tool. Each :class:`LocalDeployment` has a private ``FLWR_HOME`` (the SuperLink's
and each SuperNode's), free ports, no TLS (loopback only, nothing outside the machine can
connect) and no runtime dependency installation (the app's dependencies are those of the
Python that runs it). SuperNode ``i`` serves ``partition-id = i``, the run's ``i``-th training
centre, as in simulation. The processes stay in the caller's process group (a signal to the
group, such as ``timeout``'s, reaches them too) and are stopped with their descendants (the
SuperExecs, the ServerApp and the per-message ClientApp processes they start) by process id.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
import tomli_w

APP_DIR = Path(__file__).resolve().parents[1]  # the Flower app: pyproject.toml's folder
CONNECTION = "local-deployment"
ENGINE_VARIABLE = "CYTOFED_FLOWER_ENGINE"  # "simulation" (default, Ray) or "deployment"
ENGINES = ("simulation", "deployment")
START_TIMEOUT = 180.0  # seconds for the SuperLink or a SuperNode to come up
# SuperExec polls for tasks every second by default; a message should not wait that long.
TASK_POLL_SECONDS = "0.1"
REPORT_LINE = re.compile(r"\[cytofed\] report: (\S+)")


def engine() -> str:
    """The Flower engine federated runs use: ``CYTOFED_FLOWER_ENGINE``, else simulation."""
    name = os.environ.get(ENGINE_VARIABLE, "simulation")
    if name not in ENGINES:
        raise ValueError(f"{ENGINE_VARIABLE} is {name!r}; expected one of {', '.join(ENGINES)}")
    return name


def flower_program(name: str) -> str:
    """A Flower command beside this Python, else on PATH."""
    beside = Path(sys.executable).parent / name
    program = str(beside) if beside.is_file() else shutil.which(name)
    if program is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH: "
                                "is Flower installed?")
    return program


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalDeployment:
    """A SuperLink and ``sites`` SuperNodes under ``root`` (logs in ``root/logs``), for
    ``with``; :meth:`run` runs the app on them and returns its report. ``faults`` (tests only):
    site -> the ``client.faults`` fault its SuperNode is started with."""

    def __init__(self, sites: int, root: Path, faults: Mapping[int, str] | None = None) -> None:
        if sites < 1:
            raise ValueError(f"a deployment needs at least one site, got {sites}")
        self.sites, self.root = sites, Path(root)
        self.faults = dict(faults or {})
        self.address = f"127.0.0.1:{free_port()}"
        self.processes: dict[str, subprocess.Popen] = {}

    def environment(self, home: str) -> dict[str, str]:
        """The environment of a Flower process or command with ``FLWR_HOME`` ``root/home``."""
        return {**os.environ, "FLWR_HOME": str(self.root / home), "PYTHONUNBUFFERED": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_SECONDS}

    def log(self, name: str) -> str:
        path = self.root / "logs" / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def start(self, name: str, command: list[str], home: str) -> None:
        """Start a process, its output in ``logs/<name>.log``."""
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with (self.root / "logs" / f"{name}.log").open("wb") as log:
            self.processes[name] = subprocess.Popen(
                command, cwd=APP_DIR, env=self.environment(home), stdout=log,
                stderr=subprocess.STDOUT)

    def wait_for(self, name: str, ready: Callable[[str], bool], what: str) -> None:
        """Wait until ``ready`` holds for the process's log; fail if it exits or times out."""
        deadline = time.monotonic() + START_TIMEOUT
        while not ready(self.log(name)):
            if self.processes[name].poll() is not None:
                raise RuntimeError(f"{what} exited with status {self.processes[name].returncode}"
                                   f"; its log ends:\n{self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start within {START_TIMEOUT:.0f} s")
            time.sleep(0.2)

    def __enter__(self) -> LocalDeployment:
        try:
            home = self.root / "superlink"
            home.mkdir(parents=True, exist_ok=True)
            (home / "config.toml").write_text(tomli_w.dumps({"superlink": {
                "default": CONNECTION,
                CONNECTION: {"address": self.address, "insecure": True}}}))
            host, port = self.address.split(":")
            self.start("superlink", [flower_program("flower-superlink"), "--insecure",
                                     "--host", host, "--port", port,
                                     "--disable-runtime-dependency-installation"], "superlink")
            self.wait_for("superlink", lambda log: "Uvicorn running on http" in log,
                          "the SuperLink")
            for site in range(self.sites):
                self.start(f"site-{site}", [
                    flower_program("flower-supernode"), "--insecure", "--superlink",
                    self.address, "--port", str(free_port()),
                    "--node-config", f"partition-id={site} num-partitions={self.sites}"
                    + (f" fault='{self.faults[site]}'" if site in self.faults else ""),
                ], f"site-{site}")
            for site in range(self.sites):
                self.wait_for(f"site-{site}", lambda log: "SuperNode ID:" in log,
                              f"the SuperNode of site {site}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Kill every process this deployment started and their descendants (all stopped
        first, so that none starts another meanwhile)."""
        tree = []
        for process in self.processes.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(process.pid)
                tree += [parent, *parent.children(recursive=True)]
        for action in (psutil.Process.suspend, psutil.Process.kill):
            for member in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    action(member)
        for process in self.processes.values():
            process.wait()

    def run(self, overrides: dict[str, Any], timeout: float | None = None) -> Path:
        """``flwr run`` of the app with ``overrides`` over its run config, streamed to
        ``logs/run-<run-name>.log`` until it ends; returns the run's report.json."""
        name = str(overrides.get("run-name", "run"))
        config = self.root / f"run-{name}.toml"
        config.write_text(tomli_w.dumps(overrides))
        log_path = self.root / "logs" / f"run-{name}.log"
        with log_path.open("wb") as log:
            subprocess.run([flower_program("flwr"), "run", str(APP_DIR), CONNECTION, "--stream",
                            "--run-config", str(config)], cwd=APP_DIR,
                           env=self.environment("superlink"), stdout=log,
                           stderr=subprocess.STDOUT, timeout=timeout, check=False)
        output = log_path.read_text(errors="replace")
        match = REPORT_LINE.search(output)
        if match is None:
            raise RuntimeError(f"run {name!r} on the local deployment wrote no report; its log "
                               f"({log_path}) ends:\n{output[-3000:]}")
        return Path(match.group(1))


def run_deployed(overrides: dict[str, Any], sites: int) -> Path:
    """One run of the app with ``overrides`` on a fresh :class:`LocalDeployment` of ``sites``
    sites; returns its report.json (the run's ``output-dir`` should be absolute)."""
    with (tempfile.TemporaryDirectory(prefix="cytofed-deployment-") as root,
          LocalDeployment(sites, Path(root)) as deployment):
        return deployment.run(overrides)

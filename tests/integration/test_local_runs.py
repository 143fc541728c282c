"""Two checkouts on one machine run `make run` at the same time: each gets a local SuperLink on
free ports of its own, both finish, and neither leaves a process behind."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("make") is None or shutil.which("git") is None,
                                 reason="needs make and git")]

TINY_RUN = ("num-server-rounds=1 local-epochs=1 model='test_resnet' image-size=32 "
            "synthetic-images=40")


def copy_checkout(destination: Path) -> Path:
    """The project's files (tracked and new, not ignored) copied to ``destination``."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def processes_in(checkout: Path) -> list[int]:
    """Processes whose environment names the checkout's FLWR_HOME (the Makefile exports it)."""
    marker = f"FLWR_HOME={checkout / '.flwr'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def test_two_make_runs_at_once_in_two_clones_both_finish(tmp_path):
    venv = Path(sys.prefix)
    clones = [copy_checkout(tmp_path / name) for name in ("one", "two")]
    processes = []
    for clone in clones:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("FLWR_", "CYTOFED_"))}
        env["PYTHONPATH"] = str(clone)
        with (clone / "make-run.log").open("wb") as log:
            processes.append(subprocess.Popen(
                ["make", "-C", str(clone), "run", f"VENV={venv}", "-o", f"{venv}/.installed",
                 f"RUN_CONFIG={TINY_RUN}"], env=env, stdout=log, stderr=subprocess.STDOUT))
    statuses = [process.wait(timeout=1200) for process in processes]
    logs = [(clone / "make-run.log").read_text(errors="replace") for clone in clones]
    assert statuses == [0, 0], [log[-3000:] for log in logs]
    ports = set()
    for clone, log in zip(clones, logs, strict=True):
        [port] = re.findall(r"Starting local SuperLink on 127\.0\.0\.1:(\d+)", log)
        ports.add(int(port))
        report = re.search(r"\[cytofed\] report: (\S+)", log)
        assert report and Path(report.group(1)).is_relative_to(clone / "runs"), log[-3000:]
        assert Path(report.group(1)).is_file()
        assert processes_in(clone) == []
    assert len(ports) == 2 and not ports & {39091, 39093}

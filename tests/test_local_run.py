"""Local runs get their own ports and stop exactly the processes they started, by pid."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

from simulations import local_run

# Starts a grandchild in its own session (as Flower starts its local SuperLink), writes its
# pid and exits at once, leaving it behind.
LEAVE_A_DAEMON = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                         start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_each_environment_has_free_ports_and_a_token_of_its_own():
    first, second = local_run.isolated_environment({}), local_run.isolated_environment({})
    ports = [int(env[key]) for env in (first, second) for key in local_run.PORT_KEYS]
    assert first[local_run.TOKEN_KEY] != second[local_run.TOKEN_KEY]
    assert 39091 not in ports and 39093 not in ports
    for port in ports:  # nothing listens there
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_what_a_run_leaves_behind_is_stopped_and_nothing_else(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                                 start_new_session=True)  # same command, not the run's
    try:
        pid_file = tmp_path / "daemon.pid"
        status = local_run.run_isolated([sys.executable, "-c", LEAVE_A_DAEMON, str(pid_file)])
        assert status == 0
        assert not alive(int(pid_file.read_text()))
        assert alive(bystander.pid)
    finally:
        bystander.kill()
        bystander.wait()


def test_a_run_past_its_timeout_is_stopped_with_status_124(tmp_path):
    pid_file = tmp_path / "daemon.pid"
    started = time.monotonic()
    status = local_run.main(["--timeout", "2", "--", sys.executable, "-c",
                             LEAVE_A_DAEMON + "import time; time.sleep(600)", str(pid_file)])
    assert status == local_run.TIMED_OUT
    assert time.monotonic() - started < 30
    assert not alive(int(pid_file.read_text()))

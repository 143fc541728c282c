"""A real deployment on loopback and the failures it must survive.

One SuperLink with TLS and SuperNode authentication, one ``cytofed site`` daemon per synthetic
clinic (clinic-a, -b, -c; clinic-d is the server's held-out centre), keys and certificates from
``deploy/make_certs.py``, and ``flwr run . consortium`` with a private FLWR_HOME naming the
SuperLink and the CA. They live for the whole module and are stopped by process id at its end.
Tests run in file order: the last fixture kills a site.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from common.weights import load_weights
from tests.integration.conftest import (
    BIN,
    ROOT,
    flower_environment,
    flwr_run_command,
    free_port,
    processes_with_env,
    stop_flower,
    stop_processes,
    wait_for,
)

pytestmark = pytest.mark.integration

CONNECTION = "consortium"
SITES = ("clinic-a", "clinic-b", "clinic-c")
TINY = {"num-server-rounds": 2, "model": "test_resnet", "image-size": 32,
        "synthetic-images": 100}


@dataclass
class Consortium:
    """The running deployment: where its files are and what it started."""

    root: Path
    env: dict[str, str]
    address: str
    node_ids: dict[str, int] = field(default_factory=dict)  # key name -> registered node id
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def run_config(self, run_name: str, **overrides: object) -> dict:
        return {**TINY, "output-dir": str(self.root / "runs"),
                "cache-dir": str(self.root / "cache"), "run-name": run_name, **overrides}

    def flwr(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    def start(self, name: str, command: list[str], home: str = "") -> subprocess.Popen:
        """A process whose output goes to ``<root>/logs/<name>.log``; a site gets its own
        FLWR_HOME ``<shared home>-<site>``, where its SuperNode installs the app."""
        (self.root / "logs").mkdir(exist_ok=True)
        env = {**self.env, "FLWR_HOME": f"{self.env['FLWR_HOME']}-{home}"} if home else self.env
        with (self.root / "logs" / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def register(self, key: str) -> int:
        output = self.flwr("supernode", "register", str(self.certs / "sites" / key / "auth.pub"),
                           CONNECTION, "--name", key, "--format", "json")
        self.node_ids[key] = int(json.loads(output[output.index("{"):])["node-id"])
        return self.node_ids[key]

    def site_command(self, centre_file: Path, key: str, *supernode_args: str) -> list[str]:
        """`cytofed site` for a centre TOML with the key pair ``key``."""
        return [str(BIN / "cytofed"), "site", "--centre-config", str(centre_file),
                "--superlink", self.address,
                "--root-certificates", str(self.certs / "sites" / key / "ca.crt"),
                "--auth-key", str(self.certs / "sites" / key / "auth.key"),
                "--", "--port", str(free_port()), *supernode_args]

    def centre_file(self, centre: str) -> Path:
        path = self.root / "centres" / f"{centre}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f'name = "{centre}"\nformat = "synthetic"\n')
        return path

    def activated(self, name: str) -> bool:
        """Whether the SuperNode logging to ``name`` was let in by the SuperLink."""
        return "SuperNode ID:" in self.log(name)

    def online(self) -> set[int]:
        nodes = json.loads(self.flwr("supernode", "list", CONNECTION, "--format", "json"))
        return {int(n["node-id"]) for n in nodes["nodes"] if n["status"] == "online"}

    def report(self, output: str) -> tuple[Path, dict]:
        match = re.search(r"\[cytofed\] report: (\S+)", output)
        assert match, output[-4000:]
        path = Path(match.group(1))
        return path.parent, json.loads(path.read_text())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    """SuperLink (TLS, --enable-supernode-auth) and the three clinics' registered daemons."""
    root = tmp_path_factory.mktemp("deployment")
    port = free_port()
    env = flower_environment(root / "flwr-home")
    deployment = Consortium(root, env, f"127.0.0.1:{port}")
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                    str(deployment.certs), "--host", "localhost", "--site", "clinic-a",
                    "--site", "clinic-b", "--site", "clinic-c", "--site", "faulty",
                    "--site", "stranger"], check=True, capture_output=True)
    (root / "flwr-home").mkdir()
    (root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{deployment.address}"\n'
        f'root-certificates = "{deployment.certs / "ca.crt"}"\n')
    try:
        deployment.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(deployment.certs / "ca.crt"),
            "--ssl-certfile", str(deployment.certs / "superlink.pem"),
            "--ssl-keyfile", str(deployment.certs / "superlink.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"])
        wait_for(lambda: "Uvicorn running on https" in deployment.log("superlink"), 180,
                 "the SuperLink to serve TLS")
        for site in SITES:
            deployment.register(site)
            deployment.start(site, deployment.site_command(deployment.centre_file(site), site),
                             home=site)
        wait_for(lambda: all(deployment.activated(s) for s in SITES), 300,
                 "the three sites to come online")
        yield deployment
    finally:
        stop_processes([p.pid for p in deployment.processes.values()])
        stop_flower(env)


def test_unregistered_key_is_refused_and_a_client_without_tls_cannot_connect(consortium):
    # The daemon's way in, with a key pair the consortium never registered...
    stranger = consortium.start("stranger", consortium.site_command(
        consortium.centre_file("clinic-a"), "stranger"), home="stranger")
    # ...and a bare SuperNode without TLS (`cytofed site` has no plain-HTTP mode).
    plain = consortium.start("plain", [
        str(BIN / "flower-supernode"), "--insecure", "--superlink", consortium.address,
        "--max-retries", "1", "--port", str(free_port())], home="plain")
    assert stranger.wait(timeout=120) != 0 and plain.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in consortium.log("stranger")
    assert "could not establish a connection" in consortium.log("plain")
    assert "No SuperNode found with the given public key" in consortium.log("superlink")
    assert consortium.online() == {consortium.node_ids[s] for s in SITES}


def test_bad_configs_are_refused_before_training_with_the_field_named(consortium):
    # One per kind of check; tests/test_config.py covers every field.
    bad = {"local-epochs": ("two", "'local-epochs': expected a value of type int"),
           "strategy": ("fedsgd", "'strategy': expected one of"),
           "learning-rate": (-0.1, "'learning-rate': expected a positive number"),
           "data-source": ("/nowhere/centres.toml", "'data-source': expected 'synthetic' or "
                                                      "an existing centres TOML file")}

    def start(key: str) -> subprocess.Popen:
        return consortium.start(f"bad-{key}", flwr_run_command(
            consortium.run_config(f"bad-{key}", **{key: bad[key][0]}), superlink=CONNECTION))

    # The first run alone (it may install the app), then the others at once.
    first, *others = bad
    start(first).wait(timeout=600)
    for process in [start(key) for key in others]:
        process.wait(timeout=600)
    for key, (_, message) in bad.items():
        log = consortium.log(f"bad-{key}")
        assert f"run config field {message}" in log, log[-3000:]
        assert "configure_train" not in log and "[cytofed] round" not in log
    assert not list((consortium.root / "runs").glob("*-bad-*"))
    # A site whose centre points at missing data never starts its SuperNode.
    missing = consortium.root / "centres" / "missing.toml"
    missing.write_text('name = "clinic-e"\npath = "/nowhere/images"\n')
    refused = subprocess.run(consortium.site_command(missing, "clinic-a"), cwd=ROOT,
                             env=consortium.env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "centre 'clinic-e': data path /nowhere/images does not exist" in refused.stderr


def completed_rounds(runs: Path, run_name: str) -> list[int]:
    """Rounds recorded so far in the progress file of run ``run_name``."""
    found = []
    for progress in runs.glob(f"*-{run_name}/progress.json"):
        try:
            found += [r["round"] for r in json.loads(progress.read_text())["rounds"]]
        except (json.JSONDecodeError, OSError):
            continue  # being replaced right now
    return found


def received_train_message(log: str, run_id: str) -> bool:
    """Whether a SuperNode's log shows a training message of run ``run_id`` arriving."""
    return any(block.startswith(run_id) and "Receiving: train message" in block
               for block in log.split("[RUN ")[1:])


@pytest.fixture(scope="module")
def federated_run(consortium: Consortium) -> tuple[str, str, Path, dict]:
    """Two rounds of the three clinics plus a fourth registered site that sends NaN weights
    (its SuperNode started with the test-only ``fault`` node config), through two failures:
    the ServerApp is killed after round 1 and the same `flwr run` is started again, and
    clinic-c's daemon is killed once it has the resumed run's round-2 training message."""
    consortium.register("faulty")
    consortium.start("faulty", home="faulty", command=[
        str(BIN / "flower-supernode"), "--superlink", consortium.address,
        "--root-certificates", str(consortium.certs / "ca.crt"),
        "--auth-supernode-private-key", str(consortium.certs / "sites" / "faulty" / "auth.key"),
        "--port", str(free_port()), "--node-config",
        f"centre-config='{consortium.centre_file('clinic-c')}' fault='nan-weights'"])
    wait_for(lambda: consortium.activated("faulty"), 180, "the faulty site to come online")
    command = flwr_run_command(consortium.run_config("federation"), superlink=CONNECTION)
    first = consortium.start("launch-1", command)
    wait_for(lambda: "[cytofed] round 1/2" in consortium.log("launch-1"), 600,
             "round 1 to complete")
    serverapps = processes_with_env(f"FLWR_HOME={consortium.env['FLWR_HOME']}",
                                    "flwr-serverapp")
    assert len(serverapps) == 1
    stop_processes([*serverapps, first.pid])
    first.wait(timeout=60)
    assert completed_rounds(consortium.root / "runs", "federation") == [1]
    second = consortium.start("launch-2", command)
    run_id = wait_for(lambda: re.search(r"Successfully started run (\d+)",
                                        consortium.log("launch-2")), 300, "the second launch")
    wait_for(lambda: received_train_message(consortium.log("clinic-c"), run_id.group(1)), 300,
             "clinic-c to receive round 2's training message")
    os.kill(consortium.processes["clinic-c"].pid, signal.SIGKILL)
    consortium.processes["clinic-c"].wait(timeout=60)
    second.wait(timeout=600)
    output = consortium.log("launch-2")
    return (consortium.log("launch-1"), output, *consortium.report(output))


def test_registered_sites_train_over_tls_and_a_report_is_written(consortium, federated_run):
    _, _, run_dir, report = federated_run
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["held_out_centre"] == "clinic-d"
    assert sorted(report["training_centres"]) == list(SITES)
    first = report["rounds"][0]
    assert (first["sampled"], first["replied"], first["dropped"]) == (4, 4, [])
    assert sorted(c["centre"] for c in first["clients"]) == [*SITES, "clinic-c"]
    assert {c["node_id"] for c in first["clients"]} == set(consortium.node_ids.values())
    for name in ("report.md", "final.safetensors", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name


def test_nan_weights_are_rejected_and_the_global_model_stays_finite(consortium, federated_run):
    _, _, run_dir, report = federated_run
    for completed in report["rounds"]:
        assert [(r["node_id"], "NaN or Inf" in r["reason"]) for r in completed["rejected"]] == [
            (consortium.node_ids["faulty"], True)]
        assert math.isfinite(completed["held_out"]["macro_f1"])
        assert math.isfinite(completed["train"]["train_loss"])
    final, _ = load_weights(run_dir / "final.safetensors")
    assert all(np.all(np.isfinite(array)) for array in final.values())
    assert str(consortium.node_ids["faulty"]) in (run_dir / "report.md").read_text()


def test_restarted_serverapp_resumes_after_the_last_completed_round(federated_run):
    first, second, run_dir, report = federated_run
    assert "[cytofed] round 1/2" in first and "[cytofed] round 2/2" not in first
    assert re.search(rf"\[cytofed\] resuming {re.escape(str(run_dir))} after round 1", second)
    assert "[cytofed] round 1/2" not in second and "[cytofed] round 2/2" in second, second
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert len(list(run_dir.parent.glob("*-federation"))) == 1


def test_killed_site_is_listed_as_dropped_and_the_others_finish(consortium, federated_run):
    _, _, run_dir, report = federated_run
    killed = consortium.node_ids["clinic-c"]
    second = report["rounds"][1]
    assert [d["node_id"] for d in second["dropped"]] == [killed], second["dropped"]
    assert (second["sampled"], second["replied"]) == (4, 3)
    assert sorted(c["centre"] for c in second["clients"]) == ["clinic-a", "clinic-b", "clinic-c"]
    assert killed not in {c["node_id"] for c in second["clients"]}
    assert math.isfinite(report["final"]["held_out"]["macro_f1"])
    assert str(killed) in (run_dir / "report.md").read_text()

"""A real deployment on loopback, behind its gate, and the attacks and failures it must survive.

The consortium server is 127.0.0.1: the SuperLink (TLS, SuperNode authentication) listens
there, and the operator's `flwr` commands use it. Its gate (nginx with
deploy/gate/cytofed-gate.conf.template) listens on a second loopback address, 127.0.0.2, as on
a public one: every site connects through it, and so does every attack. The sites are one
`cytofed site` daemon per synthetic clinic (clinic-a, -b, -c) and the evaluator of the
held-out clinic-d (`--role evaluator`); runs use held-out-evaluation='site', and the
SuperLink, hence the ServerApp, has an image cache of its own that must stay empty. Keys and
certificates come from deploy/make_certs.py. Everything lives for the whole module and is
stopped by process id at its end. Tests run in file order: the last fixture kills a site.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.fleet_pb2 import PullMessagesRequest
from flwr.proto.node_pb2 import Node
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from common.evaluator_protocol import METRIC_KEYS
from common.weights import load_weights
from simulations.local_run import free_port
from tests.gate import gate_command, nginx_config, requires_nginx
from tests.integration.conftest import (
    BIN,
    ROOT,
    flower_environment,
    flwr_run_command,
    processes_running,
    stop_flower,
    stop_processes,
    wait_for,
)

pytestmark = [pytest.mark.integration, requires_nginx]

CONNECTION = "consortium"  # the operator's connection, on the server host
THROUGH_GATE = "through-gate"  # the same commands from outside
GATE_HOST = "127.0.0.2"
SITES = ("clinic-a", "clinic-b", "clinic-c")
EVALUATOR = "clinic-d"
TINY = {"num-server-rounds": 2, "model": "test_resnet", "image-size": 32,
        "synthetic-images": 100, "held-out": EVALUATOR, "held-out-evaluation": "site",
        "allow-synthetic": True}


@dataclass
class Consortium:
    """The running deployment: where its files are and what it started."""

    root: Path
    env: dict[str, str]
    address: str  # the SuperLink, on the server host's loopback
    gate: str  # the gate, as the sites (and attackers) see it
    node_ids: dict[str, int] = field(default_factory=dict)  # key name -> registered node id
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def server_cache(self) -> Path:
        return self.root / "server-cache"

    def run_config(self, run_name: str, **overrides: object) -> dict:
        return {**TINY, "output-dir": str(self.root / "runs"),
                "cache-dir": str(self.root / "run-config-cache"), "run-name": run_name,
                **overrides}

    def flwr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env,
                                capture_output=True, text=True, timeout=300)
        assert not check or result.returncode == 0, result.stdout + result.stderr
        return result

    def start(self, name: str, command: list[str], home: str = "") -> subprocess.Popen:
        """A process whose output goes to ``<root>/logs/<name>.log``; a site gets its own
        FLWR_HOME ``<shared home>-<site>``, where its SuperNode installs the app, and its own
        image cache; everything else the server's."""
        (self.root / "logs").mkdir(exist_ok=True)
        env = {**self.env, "CYTOFED_CACHE_DIR": str(self.server_cache)}
        if home:
            env.update(FLWR_HOME=f"{self.env['FLWR_HOME']}-{home}",
                       CYTOFED_CACHE_DIR=str(self.root / f"cache-{home}"))
        with (self.root / "logs" / f"{name}.log").open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def register(self, key: str) -> int:
        output = self.flwr("supernode", "register", str(self.certs / "sites" / key / "auth.pub"),
                           CONNECTION, "--name", key, "--format", "json").stdout
        self.node_ids[key] = int(json.loads(output[output.index("{"):])["node-id"])
        return self.node_ids[key]

    def site_command(self, centre_file: Path, key: str, *supernode_args: str,
                     role: str = "train") -> list[str]:
        """`cytofed site` through the gate for a centre TOML with the key pair ``key``."""
        return [str(BIN / "cytofed"), "site", "--centre-config", str(centre_file),
                "--superlink", self.gate,
                "--root-certificates", str(self.certs / "sites" / key / "ca.crt"),
                "--auth-key", str(self.certs / "sites" / key / "auth.key"),
                "--role", role, "--allow-synthetic",
                "--", "--port", str(free_port()), *supernode_args]

    def centre_file(self, centre: str) -> Path:
        path = self.root / "centres" / f"{centre}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(f'name = "{centre}"\nformat = "synthetic"\n')
        return path

    def activated(self, name: str) -> bool:
        """Whether the SuperNode logging to ``name`` was let in by the SuperLink."""
        return "SuperNode ID:" in self.log(name)

    def nodes(self) -> dict[int, str]:
        """Node id -> status of every node the SuperLink knows (asked on the server host)."""
        listed = json.loads(self.flwr("supernode", "list", CONNECTION, "--format",
                                      "json").stdout)
        return {int(n["node-id"]): n["status"] for n in listed["nodes"]}

    def online(self) -> set[int]:
        return {node for node, status in self.nodes().items() if status == "online"}

    def runs(self) -> list[str]:
        return re.findall(r"\d{6,}", self.flwr("ls", CONNECTION).stdout)

    def report(self, output: str) -> tuple[Path, dict]:
        match = re.search(r"\[cytofed\] report: (\S+)", output)
        assert match, output[-4000:]
        path = Path(match.group(1))
        return path.parent, json.loads(path.read_text())


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Consortium]:
    """SuperLink (TLS, --enable-supernode-auth) on 127.0.0.1, its gate on 127.0.0.2, the three
    clinics' and the evaluator's registered daemons connected through the gate."""
    root = tmp_path_factory.mktemp("deployment")
    port, gate_port = free_port(), free_port(GATE_HOST)
    env = flower_environment(root / "flwr-home")
    deployment = Consortium(root, env, f"127.0.0.1:{port}", f"{GATE_HOST}:{gate_port}")
    subprocess.run([sys.executable, str(ROOT / "deploy" / "make_certs.py"), "--out",
                    str(deployment.certs), "--host", "localhost", "--ip", GATE_HOST,
                    *[arg for key in (*SITES, EVALUATOR, "faulty", "stranger")
                      for arg in ("--site", key)]], check=True, capture_output=True)
    (root / "flwr-home").mkdir()
    (root / "flwr-home" / "config.toml").write_text("".join(
        [f'[superlink]\ndefault = "{CONNECTION}"\n'] + [
            f'\n[superlink.{name}]\naddress = "{address}"\n'
            f'root-certificates = "{deployment.certs / "ca.crt"}"\n'
            for name, address in ((CONNECTION, deployment.address),
                                  (THROUGH_GATE, deployment.gate))]))
    try:
        deployment.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(deployment.certs / "ca.crt"),
            "--ssl-certfile", str(deployment.certs / "superlink.pem"),
            "--ssl-keyfile", str(deployment.certs / "superlink.key"),
            "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation"])
        deployment.start("gate", gate_command(nginx_config(
            root / "gate", deployment.gate, deployment.address, deployment.certs)))
        wait_for(lambda: "Uvicorn running on https" in deployment.log("superlink"), 180,
                 "the SuperLink to serve TLS")
        for site in (*SITES, EVALUATOR):
            deployment.register(site)
        for site in SITES:
            deployment.start(site, deployment.site_command(deployment.centre_file(site), site),
                             home=site)
        deployment.start(EVALUATOR, deployment.site_command(
            deployment.centre_file(EVALUATOR), EVALUATOR, role="evaluator"), home=EVALUATOR)
        wait_for(lambda: all(deployment.activated(s) for s in (*SITES, EVALUATOR)), 300,
                 "the three sites and the evaluator to come online through the gate")
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
        str(BIN / "flower-supernode"), "--insecure", "--superlink", consortium.gate,
        "--max-retries", "1", "--port", str(free_port())], home="plain")
    assert stranger.wait(timeout=120) != 0 and plain.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in consortium.log("stranger")
    assert "could not establish a connection" in consortium.log("plain")
    assert "No SuperNode found with the given public key" in consortium.log("superlink")
    assert consortium.online() == {consortium.node_ids[s] for s in (*SITES, EVALUATOR)}


def raw_request(address: str, request: bytes, cafile: Path) -> bytes:
    """Send ``request`` bytes as they are over TLS to ``address``; the whole answer."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(cafile))
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as tcp, \
            context.wrap_socket(tcp, server_hostname=host) as tls:
        tls.sendall(request)
        while chunk := tls.recv(65536):
            answer += chunk
    return answer


def post(path: bytes, headers: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gate\r\nContent-Length: 0\r\n"
            b"Content-Type: application/protobuf\r\nConnection: close\r\n" + headers + b"\r\n")


# Requests that try to reach the Control or runtime API, or self-registration, past the gate.
RAW_ATTACKS = {
    "dot segments": post(b"/v1/fleet/../control/list-runs"),
    "encoded dot segments": post(b"/v1/fleet/%2e%2e/control/list-runs"),
    "dot segments after a Fleet route": post(b"/v1/fleet/get-run/../../control/list-runs"),
    "encoded slashes": post(b"/v1/fleet/get-run%2f..%2f..%2fcontrol%2flist-runs"),
    "encoded slash in a Control path": post(b"/v1%2fcontrol%2flist-runs"),
    "double slash": post(b"//v1/control/list-runs"),
    "upper case": post(b"/V1/CONTROL/LIST-RUNS"),
    "trailing slash": post(b"/v1/fleet/get-run/"),
    "path parameter": post(b"/v1/fleet/get-run;/../../control/list-runs"),
    "absolute URI to the SuperLink": post(b"https://127.0.0.1/v1/control/list-runs"),
    "NUL byte": post(b"/v1/fleet/get-run%00"),
    "newline": post(b"/v1/fleet/get-run%0a"),
    "fragment": post(b"/v1/fleet/get-run#/../../control/list-runs"),
    "query": post(b"/v1/fleet/get-run?/../../control/list-runs"),
    "GET on a Fleet route": b"GET /v1/fleet/pull-messages HTTP/1.1\r\nHost: gate\r\n"
                            b"Connection: close\r\n\r\n",
    "HTTP/1.0 without Host": b"POST /v1/control/list-runs HTTP/1.0\r\n\r\n",
    "request smuggling (CL.TE)": (
        b"POST /v1/fleet/get-run HTTP/1.1\r\nHost: gate\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + post(b"/v1/control/list-runs")),
    "override header": post(b"/v1/fleet/get-run", b"X-Original-URL: /v1/control/list-runs\r\n"
                                                   b"X-Rewrite-URL: /v1/control/list-runs\r\n"),
}
# Plain requests to what only the server host may use.
FORBIDDEN_ROUTES = ("/v1/control/register-node", "/v1/control/list-nodes",
                    "/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run",
                    "/v1/runtime/acquire-task", "/v1/runtime/pull-messages",
                    "/v1/runtime/get-nodes", "/v1/fleet/register-node",
                    "/v1/fleet/unregister-node", "/docs", "/openapi.json", "/health")


def refused(answer: bytes) -> bool:
    """Whether an answer is a refusal: by the gate (its header, or nginx's 400 for malformed
    requests) or by the SuperLink's node authentication on a Fleet route (401); never
    something the SuperLink served."""
    statuses = re.findall(rb"^HTTP/1\.[01] (\d{3})", answer, flags=re.MULTILINE)
    return bool(statuses) and all(
        status == b"400" or (status in (b"403", b"405") and b"X-Cytofed-Gate: refused" in answer)
        or (status == b"401" and b"Invalid SuperNode authentication" in answer)
        for status in statuses)


def impersonate_a_site(consortium: Consortium) -> bytes:
    """A Fleet call claiming clinic-a's node id, signed with a key of the attacker's own."""
    private = ec.generate_private_key(ec.SECP384R1())
    with FleetHttpClient.from_server_address(
            consortium.gate, False, str(consortium.certs / "ca.crt"),
            interceptors=[NodeAuthHttpInterceptor(private, private.public_key())]) as client:
        try:
            client.PullMessages(PullMessagesRequest(node=Node(
                node_id=consortium.node_ids["clinic-a"])))
        except httpx.HTTPStatusError as error:
            return (f"HTTP/1.1 {error.response.status_code}\r\n\r\n".encode()
                    + error.response.content)
    return b"HTTP/1.1 200 served\r\n\r\n"


def test_the_control_api_answers_on_the_server_host_only(consortium, tmp_path):
    nodes, runs = consortium.nodes(), consortium.runs()
    intruder = tmp_path / "intruder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                    str(intruder)], check=True)
    flwr_attacks = {
        "flwr supernode register": ("supernode", "register", f"{intruder}.pub", THROUGH_GATE),
        "flwr supernode list": ("supernode", "list", THROUGH_GATE),
        "flwr ls": ("ls", THROUGH_GATE),
        "flwr run": tuple(flwr_run_command(consortium.run_config("intrusion"),
                                           superlink=THROUGH_GATE)[1:]),
    }
    attempts: dict[str, bool] = {}
    outputs: dict[str, str] = {}
    for name, args in flwr_attacks.items():
        result = consortium.flwr(*args, check=False)
        outputs[name] = result.stdout + result.stderr
        attempts[name] = result.returncode != 0 and "403 Forbidden" in outputs[name]
    ca = str(consortium.certs / "ca.crt")
    with httpx.Client(verify=ca, timeout=30) as client:
        for route in FORBIDDEN_ROUTES:
            answer = client.post(f"https://{consortium.gate}{route}", content=b"",
                                 headers={"content-type": "application/protobuf"})
            attempts[f"POST {route}"] = (answer.status_code == 403
                                         and answer.headers.get("x-cytofed-gate") == "refused")
        # The same from the server host: the operator's way in works.
        served = client.post(f"https://{consortium.address}/v1/control/list-runs", content=b"",
                             headers={"content-type": "application/protobuf"})
        assert served.status_code == 200 and "x-cytofed-gate" not in served.headers
    for name, request in RAW_ATTACKS.items():
        attempts[name] = refused(raw_request(consortium.gate, request, consortium.certs
                                             / "ca.crt"))
    attempts["impersonating a registered site"] = refused(impersonate_a_site(consortium))
    through = sorted(name for name, was_refused in attempts.items() if not was_refused)
    print(f"\n{len(attempts)} attack attempts through the gate, {len(through)} got through")
    assert through == [], {name: outputs.get(name, "")[-1000:] for name in through}
    assert consortium.nodes() == nodes and consortium.runs() == runs
    # The operator on the server host registers, lists and runs (the federated run below).
    probe = consortium.flwr("supernode", "register", f"{intruder}.pub", CONNECTION, "--format",
                            "json").stdout
    probe_id = int(json.loads(probe[probe.index("{"):])["node-id"])
    assert probe_id in consortium.nodes()
    consortium.flwr("supernode", "unregister", str(probe_id), CONNECTION)
    assert probe_id not in consortium.nodes() or consortium.nodes()[probe_id] != "online"


def test_bad_configs_are_refused_before_training_with_the_field_named(consortium):
    # One per kind of check; tests/test_config.py covers every field.
    bad = {"local-epochs": ("two", "'local-epochs': expected a value of type int"),
           "strategy": ("fedsgd", "'strategy': expected one of"),
           "learning-rate": (-0.1, "'learning-rate': expected a positive number"),
           "data-source": ("/nowhere/centres.toml", "'data-source': expected 'synthetic' or "
                                                      "an existing centres TOML file"),
           "allow-synthetic": (False, "'data-source': expected the consortium's centres TOML "
                                      "file in a production run")}

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
        str(BIN / "flower-supernode"), "--superlink", consortium.gate,
        "--root-certificates", str(consortium.certs / "ca.crt"),
        "--auth-supernode-private-key", str(consortium.certs / "sites" / "faulty" / "auth.key"),
        "--port", str(free_port()), "--node-config",
        f"centre-config='{consortium.centre_file('clinic-c')}' fault='nan-weights'"])
    wait_for(lambda: consortium.activated("faulty"), 180, "the faulty site to come online")
    command = flwr_run_command(consortium.run_config("federation"), superlink=CONNECTION)
    first = consortium.start("launch-1", command)
    wait_for(lambda: "[cytofed] round 1/2" in consortium.log("launch-1"), 600,
             "round 1 to complete")
    serverapps = processes_running(consortium.env, "flwr-serverapp")
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
    training = {key: node for key, node in consortium.node_ids.items() if key != EVALUATOR}
    assert {c["node_id"] for c in first["clients"]} == set(training.values())
    for name in ("report.md", "final.safetensors", "checkpoint.safetensors"):
        assert (run_dir / name).is_file(), name


def test_held_out_metrics_are_computed_at_the_evaluator_site_and_the_server_has_no_images(
        consortium, federated_run):
    first, second, _, report = federated_run
    evaluator = consortium.node_ids[EVALUATOR]
    for launch in (first, second):
        assert (f"[cytofed] held-out centre 'clinic-d' is scored at its evaluator site (node "
                f"{evaluator})") in launch
    for completed in report["rounds"]:  # never asked to train or validate
        assert evaluator not in {c["node_id"] for c in completed["clients"]}
        assert evaluator not in {d["node_id"] for d in completed["dropped"]}
        assert set(completed["held_out"]) == METRIC_KEYS
        assert completed["held_out"]["num_examples"] == TINY["synthetic-images"]
    log = consortium.log(EVALUATOR)
    assert "evaluate.held_out" in log and "Receiving: train message" not in log
    assert not consortium.server_cache.exists()  # the ServerApp decoded no image
    assert list((consortium.root / f"cache-{EVALUATOR}").rglob("*.npz"))


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

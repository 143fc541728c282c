"""deploy/: certificates Flower accepts; compose/systemd files that use real commands and flags,
keep the SuperLink behind the gate and give each service only its own files (neither Docker nor
systemd runs here, so their files are checked, not started); the gate's nginx configuration;
a runbook whose runs name the real data; no broad kill patterns anywhere."""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import flwr
import flwr.supernode.fleet_http_client as fleet_client
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from client.daemon import register_site_command
from common.centres import read_centre
from tests.gate import TEMPLATE, check_config, nginx_config, requires_nginx

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
# What each service may see of deploy/certs: nothing more (the CA key, never).
SERVICE_FILES = {
    "superlink": {"ca.crt", "superlink.pem", "superlink.key", "superexec.secret"},
    "gate": {"ca.crt", "superlink.pem", "superlink.key"},
    "superexec": {"ca.crt", "superexec.secret"},
    "site": {"auth.key", "ca.crt"},
}


def make_certs(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(out), *args],
                   check=True, capture_output=True)


def long_options(program: str) -> set[str]:
    """The ``--options`` a command's ``--help`` lists."""
    result = subprocess.run([str(BIN / program), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def mount(volume: str) -> tuple[str, str, str]:
    """(host path, container path, "ro" or "rw") of a short-syntax compose volume (the host
    side may hold ``${VAR:?message}``, colon included)."""
    rest, _, last = volume.rpartition(":")
    mode = last if last in ("ro", "rw") else "rw"
    if last in ("ro", "rw"):
        rest, _, last = rest.rpartition(":")
    return rest, last, mode


def mount_mode(volume: str) -> tuple[str, str]:
    """(container path, "ro" or "rw") of a short-syntax compose volume."""
    _, container, mode = mount(volume)
    return container, mode


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    site_parser = argparse.ArgumentParser()
    register_site_command(site_parser)
    return {"flower-superlink": long_options("flower-superlink"),
            "flower-superexec": long_options("flower-superexec"),
            "cytofed": set(re.findall(r"(--[a-z][a-z0-9-]*)", site_parser.format_help()))}


def test_certificates_and_keys_are_what_flower_and_tls_expect(tmp_path):
    make_certs(tmp_path, "--host", "link.example.org", "--ip", "10.0.0.5", "--site", "lab")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "superlink.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"link.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {
        "10.0.0.5", "127.0.0.1"}
    site = tmp_path / "sites" / "lab"
    private = load_ssh_private_key((site / "auth.key").read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    assert try_load_public_key(site / "auth.pub") == public  # as `flwr supernode register`
    assert (site / "ca.crt").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert not list(tmp_path.rglob("ca.key"))  # the CA key never sits with handed-out files
    ca_key = tmp_path.with_name(tmp_path.name + "-ca") / "ca.key"
    for secret in (ca_key, tmp_path / "superlink.key", tmp_path / "superexec.secret",
                   site / "auth.key"):
        assert secret.stat().st_mode & 0o777 == 0o600, secret
    for folder in (ca_key.parent, tmp_path, tmp_path / "sites", site):
        assert folder.stat().st_mode & 0o777 == 0o700, folder


def test_a_ca_key_left_in_the_output_folder_is_moved_out_and_never_accepted_inside(tmp_path):
    out = tmp_path / "certs"
    make_certs(out, "--ca-dir", str(tmp_path / "offline"))
    (tmp_path / "offline" / "ca.key").replace(out / "ca.key")  # an older layout
    make_certs(out, "--ca-dir", str(tmp_path / "offline"), "--site", "lab")
    assert not (out / "ca.key").exists() and (tmp_path / "offline" / "ca.key").is_file()
    refused = subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(out),
                              "--ca-dir", str(out / "ca")], capture_output=True, text=True)
    assert refused.returncode == 2
    assert "the CA key must never sit with the files that are handed out" in refused.stderr


def test_rerunning_adds_sites_and_rotates_keys_without_touching_the_rest(tmp_path):
    make_certs(tmp_path, "--site", "lab")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    make_certs(tmp_path, "--site", "lab", "--site", "new-lab")
    assert all(p.read_bytes() == content for p, content in before.items())
    assert (tmp_path / "sites" / "new-lab" / "auth.pub").is_file()
    make_certs(tmp_path, "--rotate", "lab")
    assert (tmp_path / "sites" / "lab" / "auth.pub").read_bytes() != before[
        tmp_path / "sites" / "lab" / "auth.pub"]
    assert (tmp_path / "ca.crt").read_bytes() == before[tmp_path / "ca.crt"]


def test_compose_runs_flower_images_with_tls_auth_and_read_only_site_data(options):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"superlink", "gate", "superexec", "site"}
    version = flwr.__version__
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    assert services["superexec"]["build"]["args"]["BASE_IMAGE"] == f"flwr/superexec:{version}"
    assert f"ARG BASE_IMAGE=flwr/supernode:{version}" in (DEPLOY / "Dockerfile").read_text()
    superlink = services["superlink"]["command"]
    assert {"--enable-supernode-auth", "--ssl-certfile=certs/superlink.pem"} <= set(superlink)
    site = services["site"]
    assert site["entrypoint"] == ["cytofed", "site"]
    assert "--role=${ROLE:-train}" in site["command"]
    modes = dict(mount_mode(volume) for volume in site["volumes"])
    assert modes["/data"] == modes["/app/certs/auth.key"] == modes["/app/site/site.toml"] == "ro"
    programs = {"superlink": "flower-superlink", "superexec": "flower-superexec",
                "site": "cytofed"}
    for name, program in programs.items():
        used = {arg.split("=")[0] for arg in services[name]["command"]}
        assert used <= options[program], (name, used - options[program])


def test_compose_publishes_only_the_gate_and_the_superlink_on_loopback():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    published = {name: service.get("ports", []) for name, service in services.items()}
    assert published["superlink"] == ["127.0.0.1:9092:9092"]
    assert published["gate"] == ["${GATE_PORT:-8000}:8000"]
    assert not published["superexec"] and not published["site"]
    gate = services["gate"]
    [template] = [v for v in gate["volumes"] if "/etc/nginx/templates/" in v]
    assert (DEPLOY / mount(template)[0]).resolve() == TEMPLATE
    variables = set(re.findall(r"\$\{(CYTOFED_[A-Z_]+)\}", TEMPLATE.read_text()))
    assert variables == {k for k in gate["environment"] if k.startswith("CYTOFED_")}
    assert gate["environment"]["CYTOFED_SUPERLINK"] == "superlink:9092"


@pytest.mark.parametrize("service", sorted(SERVICE_FILES))
def test_each_service_mounts_only_its_own_files_read_only(service):
    volumes = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"][service]["volumes"]
    certificates = [mount(v) for v in volumes if "certs" in mount(v)[0]]
    assert {Path(host).name for host, _, _ in certificates} == SERVICE_FILES[service]
    assert all(mode == "ro" for _, _, mode in certificates)
    assert all(Path(host).suffix or Path(host).name == "auth.key" for host, _, _ in certificates)
    sources = " ".join(mount(v)[0] for v in volumes)
    assert "ca.key" not in sources and "certs-ca" not in sources and "held-out" not in sources


def test_the_example_site_file_is_a_valid_centre_reading_data_from_the_mount(tmp_path):
    spec = read_centre(DEPLOY / "site.toml.example")
    assert spec.path == Path("/data")


@pytest.mark.parametrize(("unit", "program"), [("cytofed-superlink.service", "flower-superlink"),
                                               ("cytofed-site.service", "cytofed")])
def test_systemd_units_run_real_commands_with_real_flags(options, unit, program):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / unit).read_text().replace("\\\n", " "))
    command = shlex.split(parser["Service"]["ExecStart"])
    assert Path(command[0]).name == program and (BIN / program).is_file()
    assert {arg for arg in command if arg.startswith("--")} <= options[program]
    assert parser["Service"]["User"] == "cytofed"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    if program == "flower-superlink":  # sites come through the gate
        assert command[command.index("--host") + 1] == "127.0.0.1"
    else:
        assert command[command.index("--role") + 1] == "${CYTOFED_ROLE}"


def superlink_routes(prefix: str) -> set[str]:
    """The routes under ``prefix`` that the SuperNode's HTTP client calls."""
    source = Path(fleet_client.__file__).read_text()
    return set(re.findall(rf'path="{prefix}([a-z-]+)"', source))


def test_the_gate_passes_exactly_the_fleet_routes_of_a_registered_supernode():
    [allowed] = re.findall(r"location ~ \^/v1/fleet/\(([a-z|-]+)\)\\z", TEMPLATE.read_text())
    needed = superlink_routes("/v1/fleet/") - {"register-node", "unregister-node"}
    assert set(allowed.split("|")) == needed
    assert "/v1/control" not in TEMPLATE.read_text().split("location /")[0]


@requires_nginx
def test_the_rendered_gate_is_a_valid_nginx_configuration(tmp_path):
    make_certs(tmp_path / "certs", "--ip", "127.0.0.2")
    config = nginx_config(tmp_path / "gate", "127.0.0.2:8443", "127.0.0.1:9092",
                          tmp_path / "certs")
    result = check_config(config)
    assert result.returncode == 0, result.stderr
    (tmp_path / "certs" / "superlink.key").unlink()
    assert check_config(config).returncode != 0  # nginx -t really reads the files


def test_the_runbook_runs_name_the_real_data_and_the_evaluator_site():
    runbook = (DEPLOY / "README.md").read_text()
    runs = [" ".join(line.split()) for line in re.findall(r"flwr run [^\n]*(?:\n\s+[^\n]*)*",
                                                         runbook) if "--run-config" in line]
    assert runs, "the runbook shows no `flwr run --run-config`"
    for run in runs:
        assert re.search(r"data-source='/\S+\.toml'", run), run
        assert "held-out-evaluation='site'" in run and re.search(r"held-out='\w", run), run
        assert "allow-synthetic" not in run
    assert "--role evaluator" in runbook


BROAD_KILLS = re.compile(r"\b(pkill|killall)\b|kill\s+-9\s+-1\b")


def test_no_process_is_stopped_by_a_name_pattern():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    scripts = [ROOT / name for name in tracked if name != "tests/test_deploy.py" and (
        name.endswith((".sh", ".py", ".yaml", ".service")) or name in ("Makefile", ".ci/run"))]
    offenders = [str(path.relative_to(ROOT)) for path in scripts
                 if path.is_file() and BROAD_KILLS.search(path.read_text(errors="replace"))]
    assert offenders == []

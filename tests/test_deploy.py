"""deploy/: certificates Flower accepts, and compose/systemd files that use real commands and
flags (neither Docker nor systemd runs here, so their files are checked, not started)."""

from __future__ import annotations

import argparse
import configparser
import re
import shlex
import subprocess
import sys
from pathlib import Path

import flwr
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from client.daemon import register_site_command
from common.centres import read_centre

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
BIN = Path(sys.executable).parent


def make_certs(out: Path, *args: str) -> None:
    subprocess.run([sys.executable, str(DEPLOY / "make_certs.py"), "--out", str(out), *args],
                   check=True, capture_output=True)


def long_options(program: str) -> set[str]:
    """The ``--options`` a command's ``--help`` lists."""
    result = subprocess.run([str(BIN / program), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def mount_mode(volume: str) -> tuple[str, str]:
    """(container path, "ro" or "rw") of a short-syntax compose volume (the host side may
    hold ``${VAR:?message}``, colon included)."""
    rest, _, last = volume.rpartition(":")
    if last in ("ro", "rw"):
        return rest.rpartition(":")[2], last
    return last, "rw"


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
    for secret in ("ca.key", "superlink.key", "superexec.secret", "sites/lab/auth.key"):
        assert (tmp_path / secret).stat().st_mode & 0o077 == 0, secret


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
    assert set(services) == {"superlink", "superexec", "site"}
    version = flwr.__version__
    assert services["superlink"]["image"] == f"flwr/superlink:{version}"
    assert services["superexec"]["build"]["args"]["BASE_IMAGE"] == f"flwr/superexec:{version}"
    assert f"ARG BASE_IMAGE=flwr/supernode:{version}" in (DEPLOY / "Dockerfile").read_text()
    superlink = services["superlink"]["command"]
    assert {"--enable-supernode-auth", "--ssl-certfile=certs/superlink.pem"} <= set(superlink)
    site = services["site"]
    assert site["entrypoint"] == ["cytofed", "site"]
    modes = dict(mount_mode(volume) for volume in site["volumes"])
    assert modes["/data"] == modes["/app/certs"] == modes["/app/site/site.toml"] == "ro"
    programs = {"superlink": "flower-superlink", "superexec": "flower-superexec",
                "site": "cytofed"}
    for name, program in programs.items():
        used = {arg.split("=")[0] for arg in services[name]["command"]}
        assert used <= options[program], (name, used - options[program])


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

"""The emulated GPU-machine Python of the CPU dry run: the machine's packages and nothing else."""

from __future__ import annotations

import subprocess

from simulations.device_emulation import DEVICE_PACKAGES, emulate, normalise

PROBE = """
import importlib.util
for name in ("numpy", "PIL", "flwr", "ray", "tomli_w"):
    print(name, importlib.util.find_spec(name) is not None)
"""


def test_the_emulated_python_has_the_machines_packages_only(tmp_path):
    python = emulate(tmp_path / "device")
    result = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    found = dict(line.split() for line in result.stdout.splitlines())
    assert found == {"numpy": "True", "PIL": "True", "flwr": "False", "ray": "False",
                     "tomli_w": "False"}


def test_package_names_are_compared_as_the_index_writes_them():
    assert normalise("Typing_Extensions") == "typing-extensions"
    assert {"torch", "timm", "grpcio", "pillow"} <= DEVICE_PACKAGES
    assert not {"flwr", "ray", "cryptography", "sqlalchemy"} & DEVICE_PACKAGES

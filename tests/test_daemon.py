"""``cytofed site``: the site daemon refuses unusable data or keys before starting a SuperNode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from client import daemon
from simulations.cli import main

REPO = Path(__file__).resolve().parents[1]
MAKE_CERTS = REPO / "deploy" / "make_certs.py"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A consortium made by deploy/make_certs.py with one site, ``lab``."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([sys.executable, str(MAKE_CERTS), "--out", str(out), "--site", "lab"],
                   check=True, capture_output=True)
    return out


def centre_file(folder: Path, body: str) -> Path:
    path = folder / "site.toml"
    path.write_text(body)
    return path


def site_args(centre: Path, keys: Path, *extra: str) -> list[str]:
    return ["site", "--centre-config", str(centre), "--superlink", "link.example:8000",
            "--root-certificates", str(keys / "ca.crt"),
            "--auth-key", str(keys / "sites" / "lab" / "auth.key"), *extra]


def test_usable_folder_is_counted_per_class_without_decoding(wbc_class_folders, tmp_path):
    centre = centre_file(tmp_path, f'name = "lab"\npath = "{wbc_class_folders}"\n')
    spec, counts = daemon.check_centre(centre)
    assert spec.name == "lab"
    # Platelets map to no wbc5 class; the corrupt neutrophil file is listed, not decoded.
    assert counts == {"neutrophil": 5, "lymphocyte": 4, "monocyte": 4, "eosinophil": 5,
                      "basophil": 4}


def write_platelets_only(root: Path) -> None:
    (root / "platelet").mkdir(parents=True)
    (root / "platelet" / "p.png").write_bytes(b"x")


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: None, r"data path .*nowhere does not exist"),
    (Path.mkdir, r"data path .*nowhere is empty"),
    (write_platelets_only, r"nothing in .*nowhere .* maps to a wbc5 class"),
])
def test_unusable_data_paths_are_refused(tmp_path, setup, message):
    root = tmp_path / "nowhere"
    setup(root)
    centre = centre_file(tmp_path, 'name = "lab"\npath = "nowhere"\n')
    with pytest.raises((ValueError, FileNotFoundError), match=rf"centre 'lab': {message}"):
        daemon.check_centre(centre)


def test_unreadable_data_is_refused(wbc_class_folders, tmp_path, monkeypatch):
    # Tests run as root, for whom every file is readable: deny access the way os.access would.
    centre = centre_file(tmp_path, f'name = "lab"\npath = "{wbc_class_folders}"\n')
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != wbc_class_folders
                        and real_access(p, mode))
    with pytest.raises(ValueError, match=r"data path .*wbc_folders is not readable"):
        daemon.check_centre(centre)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) == wbc_class_folders)
    with pytest.raises(ValueError, match=r"none of the 22 image files .* is readable"):
        daemon.check_centre(centre)


def test_refusal_exits_non_zero_naming_the_problem(tmp_path, keys, capsys):
    centre = centre_file(tmp_path, 'name = "lab"\npath = "missing"\n')
    assert main(site_args(centre, keys)) == 2
    assert "cytofed site: error: centre 'lab': data path" in capsys.readouterr().err
    assert main(site_args(tmp_path / "absent.toml", keys)) == 2
    assert "centre file" in capsys.readouterr().err
    bad_key = site_args(centre_file(tmp_path, 'name = "clinic-a"\nformat = "synthetic"\n'),
                        keys, "--allow-synthetic")
    bad_key[bad_key.index("--auth-key") + 1] = str(keys / "superlink.key")  # PEM, not OpenSSH
    assert main(bad_key) == 2
    assert "not an unencrypted OpenSSH private key" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["train", "evaluator"])
def test_usable_site_becomes_flower_supernode_with_its_centre_and_role(tmp_path, keys,
                                                                        monkeypatch, capsys,
                                                                        role):
    centre = centre_file(tmp_path, 'name = "clinic-a"\nformat = "synthetic"\n')
    executed = []
    monkeypatch.setattr(os, "execv", lambda program, argv: executed.append(argv))
    main(site_args(centre, keys, "--role", role, "--allow-synthetic", "--", "--port", "9095"))
    [argv] = executed
    assert Path(argv[0]).name == "flower-supernode"
    assert argv[1:] == [
        "--superlink", "link.example:8000", "--root-certificates", str(keys / "ca.crt"),
        "--auth-supernode-private-key", str(keys / "sites" / "lab" / "auth.key"),
        "--node-config", f"centre-config='{centre}' role='{role}'", "--port", "9095"]
    assert f"cytofed site clinic-a ({role}): synthetic clinic" in capsys.readouterr().out
    executed.clear()
    assert main(site_args(centre, keys, "--check", "--allow-synthetic")) == 0
    assert not executed
    assert "ready; would run" in capsys.readouterr().out


def test_a_synthetic_clinic_is_refused_unless_asked_for(tmp_path, keys, monkeypatch, capsys):
    centre = centre_file(tmp_path, 'name = "clinic-a"\nformat = "synthetic"\n')
    monkeypatch.setattr(os, "execv", lambda program, argv: pytest.fail("started a SuperNode"))
    assert main(site_args(centre, keys, "--role", "evaluator")) == 2
    assert ("centre 'clinic-a' in " f"{centre} is a synthetic clinic, not the site's images; "
            "pass --allow-synthetic") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(site_args(centre, keys, "--role", "auditor", "--allow-synthetic"))
    assert "argument --role: invalid choice: 'auditor'" in capsys.readouterr().err

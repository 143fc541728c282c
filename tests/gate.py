"""The gate of deploy/gate/ (nginx) for tests: its template rendered, a private nginx started.

The nginx runs as one process (``master_process off``) with its configuration, logs and
temporary files in a test folder, so it needs neither root nor /etc/nginx and is stopped by
its process id.
"""

from __future__ import annotations

import shutil
import string
import subprocess
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1] / "deploy" / "gate" / "cytofed-gate.conf.template"
NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).is_file()), None)
requires_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx): the gate tests "
                          "run the real proxy")


def render_gate(listen: str, superlink: str, certs: Path, superlink_name: str = "localhost"
                ) -> str:
    """The gate's server block, as envsubst renders the template."""
    text = string.Template(TEMPLATE.read_text()).safe_substitute(
        CYTOFED_GATE_LISTEN=listen, CYTOFED_SUPERLINK=superlink,
        CYTOFED_SUPERLINK_NAME=superlink_name, CYTOFED_GATE_CERTS=str(certs))
    assert "${CYTOFED_" not in text, "a template variable was left unrendered"
    return text


def nginx_config(folder: Path, listen: str, superlink: str, certs: Path) -> Path:
    """A whole nginx.conf in ``folder`` around the rendered gate."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gate.conf").write_text(render_gate(listen, superlink, certs))
    temporary = {name: folder / "tmp" / name for name in (
        "client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temporary.values():
        path.mkdir(parents=True, exist_ok=True)
    config = folder / "nginx.conf"
    config.write_text(
        f"daemon off;\nmaster_process off;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    access_log {folder / 'access.log'};\n"
        + "".join(f"    {name}_temp_path {path};\n" for name, path in temporary.items())
        + f"    include {folder / 'gate.conf'};\n}}\n")
    return config


def check_config(config: Path) -> subprocess.CompletedProcess:
    """``nginx -t`` of ``config``."""
    return subprocess.run([NGINX, "-t", "-c", str(config), "-p", str(config.parent),
                           "-e", str(config.parent / "error.log")],
                          capture_output=True, text=True, timeout=60)


def gate_command(config: Path) -> list[str]:
    """The command that serves the gate in the foreground."""
    return [NGINX, "-c", str(config), "-p", str(config.parent),
            "-e", str(config.parent / "error.log")]

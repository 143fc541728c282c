"""``cytofed site``: a hospital's long-running Flower SuperNode, started only on usable data.

The site's centre TOML is checked first: it parses, its data path exists, is readable and not
empty, and at least one readable file maps to a class of the centre's taxonomy (files are
listed, never decoded, so this takes seconds on a large folder); a synthetic clinic is refused
unless ``--allow-synthetic`` asks for a demonstration site. So are the SuperLink's CA
certificate and the site's authentication key. On any problem the command prints one line
naming it and exits non-zero; otherwise it replaces itself with ``flower-supernode`` (same
process id, so systemd or a test stops the daemon by that id), connected over TLS with node
authentication and ``--node-config "centre-config='<absolute path of the TOML>'
role='<train or evaluator>'"``, which the ClientApp reads (``client.site.site_centre``,
``client.evaluator``). ``--role evaluator`` makes the site the run's held-out centre: it
never trains and answers only with the held-out metrics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from common.centres import read_centre, usable_records
from common.data import CentreSpec
from common.evaluator_protocol import ROLE_KEY, ROLES, TRAIN
from common.sources import SYNTHETIC
from common.taxonomy import TAXONOMIES


def check_centre(centre_config: Path,
                 allow_synthetic: bool = False) -> tuple[CentreSpec, dict[str, int]]:
    """The site's centre and its usable image files per class (empty for a synthetic clinic,
    refused unless ``allow_synthetic``).

    Raises FileNotFoundError or ValueError naming the file, the centre and what is wrong.
    """
    spec = read_centre(centre_config)
    if spec.format == SYNTHETIC:
        if not allow_synthetic:
            raise ValueError(f"centre {spec.name!r} in {centre_config} is a synthetic clinic, "
                             "not the site's images; pass --allow-synthetic only for a "
                             "demonstration site")
        from common.synthetic import clinic_by_name

        clinic_by_name(spec.name)
        return spec, {}
    path = spec.path
    if path is not None and path.exists():
        access = os.R_OK | (os.X_OK if path.is_dir() else 0)
        if not os.access(path, access):
            raise ValueError(f"centre {spec.name!r}: data path {path} is not readable by this "
                             "user; give the daemon's user read access")
        if (path.is_dir() and not any(path.iterdir())) or (
                path.is_file() and path.stat().st_size == 0):
            raise ValueError(f"centre {spec.name!r}: data path {path} is empty")
    kept, _ = usable_records(spec)
    readable = [(record, label) for record, label in kept if os.access(record.path, os.R_OK)]
    if not readable:
        raise ValueError(f"centre {spec.name!r}: none of the {len(kept)} image files in {path} "
                         "that map to a class is readable by this user")
    counts = Counter(label for _, label in readable)
    classes = TAXONOMIES[spec.taxonomy]
    return spec, {classes[i]: counts[i] for i in sorted(counts)}


def check_auth_key(path: Path) -> None:
    """The SuperNode's private key: an EC key in OpenSSH format, as Flower reads it."""
    if not path.is_file():
        raise FileNotFoundError(f"authentication key {path} does not exist")
    try:
        key = load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"authentication key {path}: not an unencrypted OpenSSH private "
                         f"key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"authentication key {path}: expected an ECDSA (NIST curve) key, "
                         f"got {type(key).__name__}")


def supernode_command(args: argparse.Namespace, centre_config: Path) -> list[str]:
    """The ``flower-supernode`` command line of this site."""
    if "'" in str(centre_config):
        raise ValueError(f"centre file {centre_config}: its path may not contain a quote (')")
    beside = Path(sys.executable).parent / "flower-supernode"
    program = str(beside) if beside.is_file() else shutil.which("flower-supernode")
    if program is None:
        raise FileNotFoundError("flower-supernode not found beside Python or on PATH")
    return [program, "--superlink", args.superlink,
            "--root-certificates", str(args.root_certificates.resolve()),
            "--auth-supernode-private-key", str(args.auth_key.resolve()),
            "--node-config", f"centre-config='{centre_config}' {ROLE_KEY}='{args.role}'",
            *args.supernode_args]


def run_site(args: argparse.Namespace) -> int:
    """Check the site, then become its SuperNode (or, with ``--check``, stop there)."""
    centre_config = args.centre_config.resolve()
    spec, counts = check_centre(centre_config, args.allow_synthetic)
    if not args.root_certificates.is_file():
        raise FileNotFoundError(f"CA certificate {args.root_certificates} does not exist")
    check_auth_key(args.auth_key)
    data = (f"{sum(counts.values())} usable images ("
            + ", ".join(f"{name} {n}" for name, n in counts.items()) + ")"
            if counts else "synthetic clinic")
    print(f"cytofed site {spec.name} ({args.role}): {data}", flush=True)
    command = supernode_command(args, centre_config)
    if args.check:
        print(f"cytofed site {spec.name}: ready; would run {' '.join(command)}")
        return 0
    os.execv(command[0], command)  # does not return


def register_site_command(parser: argparse.ArgumentParser) -> None:
    """Add ``cytofed site --centre-config F --superlink H:P --root-certificates C
    --auth-key K [--role train|evaluator] [--allow-synthetic] [--check]
    [-- FLOWER-SUPERNODE ARGS]``."""
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--centre-config", type=Path, required=True,
                        help="the site's centre TOML (name, path, format, taxonomy, ...)")
    parser.add_argument("--superlink", required=True,
                        help="the SuperLink's address as host:port")
    parser.add_argument("--root-certificates", type=Path, required=True,
                        help="the consortium CA certificate that signed the SuperLink's")
    parser.add_argument("--auth-key", type=Path, required=True,
                        help="the site's SuperNode private key (registered with "
                             "`flwr supernode register`)")
    parser.add_argument("--role", choices=ROLES, default=TRAIN,
                        help="train (default): a training site; evaluator: the held-out "
                             "centre, which never trains and sends only held-out metrics")
    parser.add_argument("--allow-synthetic", action="store_true",
                        help="accept a synthetic clinic as the site's data (demonstrations)")
    parser.add_argument("--check", action="store_true",
                        help="only check the data and keys, do not start the SuperNode")
    parser.add_argument("supernode_args", nargs="*", metavar="FLOWER-SUPERNODE-ARG",
                        help="after --: further flower-supernode options (e.g. --port 9095)")
    parser.set_defaults(func=run_site)

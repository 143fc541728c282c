#!/usr/bin/env python3
"""Certificates and keys of a cytofed consortium: a CA, the SuperLink's TLS certificate and
one SuperNode authentication key pair per site.

Run from anywhere with a Python that has ``cryptography`` (any cytofed or Flower install)::

    python deploy/make_certs.py --out certs --host superlink.example.org --ip 10.0.0.5 \\
        --site clinic-a --site clinic-b

writes (existing files are kept, so the same command adds a site later)::

    certs-ca/ca.key                     the CA's key, beside --out, never in it (--ca-dir;
                                        keep it offline)
    certs/ca.crt                        the consortium CA certificate
    certs/superlink.key, superlink.pem  the SuperLink's (and its gate's) TLS key and certificate
    certs/sites/<site>/auth.key         the site's SuperNode private key (OpenSSH, P-384)
    certs/sites/<site>/auth.pub         its public key, for `flwr supernode register`
    certs/sites/<site>/ca.crt           the CA certificate that verifies the SuperLink
    certs/superexec.secret              shared by the SuperLink and its SuperExec container

Every folder is 0700 and every private key 0600. A ``ca.key`` that an older version left in
``--out`` is moved to ``--ca-dir``.

``--rotate SITE`` replaces a site's key pair; ``--renew-server`` re-issues the SuperLink
certificate (for new host names or before it expires). The SuperLink certificate always
names ``localhost`` and ``127.0.0.1`` too: the SuperLink's own SuperExec connects there.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import shutil
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CURVE = ec.SECP384R1  # Flower accepts NIST curves for SuperNode authentication


def _private_folder(path: Path) -> Path:
    """``path`` as a folder only its owner may enter (created if needed)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, in a folder only its owner may enter."""
    _private_folder(path.parent)
    temporary = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def _write_public(path: Path, data: bytes) -> None:
    _private_folder(path.parent)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cytofed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
             days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days)))


def make_ca(out: Path, ca_dir: Path,
            days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The consortium CA, created on first use and loaded afterwards; its key lives in
    ``ca_dir``, outside ``out``."""
    key_path, cert_path = ca_dir / "ca.key", out / "ca.crt"
    if (out / "ca.key").is_file() and not key_path.is_file():
        _private_folder(ca_dir)
        (out / "ca.key").replace(key_path)
        print(f"moved the CA key out of {out} to {key_path}")
    if key_path.is_file() and cert_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path} is not an EC private key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(CURVE())
    name = _name("cytofed consortium CA")
    cert = (_builder(name, name, key, days)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    print(f"created CA {cert_path}")
    return key, cert


def make_server_certificate(out: Path, ca_key: ec.EllipticCurvePrivateKey,
                            ca_cert: x509.Certificate, hosts: list[str], ips: list[str],
                            days: int, renew: bool) -> None:
    """The SuperLink's TLS key and certificate for ``hosts`` and ``ips`` (plus loopback)."""
    key_path, cert_path = out / "superlink.key", out / "superlink.pem"
    if cert_path.is_file() and not renew:
        return
    names = list(dict.fromkeys([*hosts, "localhost"]))
    addresses = list(dict.fromkeys([*ips, "127.0.0.1"]))
    key = ec.generate_private_key(CURVE())
    san = [x509.DNSName(h) for h in names] + [
        x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (_builder(_name(names[0]), ca_cert.subject, key, days)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(key_path, _pem_key(key))
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    print(f"issued SuperLink certificate {cert_path} for {', '.join(names + addresses)}")


def make_site_keys(out: Path, site: str, rotate: bool) -> None:
    """A site's SuperNode authentication key pair (OpenSSH encoding, as Flower reads it)."""
    if not SITE_NAME.match(site):
        raise ValueError(f"site name {site!r}: use letters, digits, '.', '_' or '-'")
    folder = _private_folder(_private_folder(out / "sites") / site)
    private, public = folder / "auth.key", folder / "auth.pub"
    if not private.is_file() or rotate:
        key = ec.generate_private_key(CURVE())
        _write_private(private, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()))
        _write_public(public, key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            + f" cytofed-{site}\n".encode())
        print(f"{'rotated' if rotate else 'created'} key pair of site {site}: {public}")
    shutil.copyfile(out / "ca.crt", folder / "ca.crt")


def make_superexec_secret(out: Path) -> None:
    """The secret a SuperExec in its own container presents to the SuperLink (compose)."""
    path = out / "superexec.secret"
    if not path.is_file():
        _write_private(path, secrets.token_hex(32).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output folder")
    parser.add_argument("--ca-dir", type=Path, default=None,
                        help="folder of the CA's key (default: <out>-ca beside the output "
                             "folder; it must not be inside it)")
    parser.add_argument("--host", action="append", default=[],
                        help="DNS name of the SuperLink (repeatable)")
    parser.add_argument("--ip", action="append", default=[],
                        help="IP address of the SuperLink (repeatable)")
    parser.add_argument("--site", action="append", default=[],
                        help="site that gets a key pair if it has none (repeatable)")
    parser.add_argument("--rotate", action="append", default=[],
                        help="site whose key pair is replaced (repeatable)")
    parser.add_argument("--renew-server", action="store_true",
                        help="re-issue the SuperLink certificate")
    parser.add_argument("--days", type=int, default=825, help="certificate validity")
    args = parser.parse_args(argv)
    try:
        for ip in args.ip:
            ipaddress.ip_address(ip)
        out = args.out.resolve()
        ca_dir = args.ca_dir or out.with_name(out.name + "-ca")
        if ca_dir.resolve().is_relative_to(out):
            raise ValueError(f"--ca-dir {ca_dir} is inside --out {args.out}: the CA key must "
                             "never sit with the files that are handed out")
        _private_folder(args.out)
        ca_key, ca_cert = make_ca(args.out, ca_dir, args.days)
        make_server_certificate(args.out, ca_key, ca_cert, args.host, args.ip, args.days,
                                args.renew_server)
        make_superexec_secret(args.out)
        for site in args.site:
            make_site_keys(args.out, site, rotate=False)
        for site in args.rotate:
            make_site_keys(args.out, site, rotate=True)
    except ValueError as error:
        print(f"make_certs: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Self-signed certificates for trying out the coordinator over HTTPS (``fedfm server gen-certs``).

:func:`generate_certificates` writes, into one directory:

* ``ca.pem`` / ``ca.key`` -- a throw-away certificate authority ("fedfm test CA"), an EC P-256 key
  with ``BasicConstraints(ca=True, path_length=0)``; it signs everything below and nothing else;
* ``server.pem`` / ``server.key`` -- the coordinator's certificate (leaf only, signed by the CA),
  valid for TLS server authentication, with one subject-alternative name per host (IP literals as
  ``IPAddress`` entries, everything else as ``DNSName``);
* ``client-<name>.pem`` / ``client-<name>.key`` for each client name -- certificates for TLS
  client authentication (common name = the client's name), for mutual TLS.

:func:`add_client_certificate` signs one more client certificate with a CA already in such a
directory. Private keys are unencrypted PEM (PKCS#8), written atomically with mode ``0600``;
existing files are never replaced unless asked to.

This is for trying things out -- on a laptop, in CI, on a test network -- not a production PKI:
the CA key sits unencrypted next to the certificates, there is no revocation (CRL or OCSP), no
key rotation and no hardware protection. For a real deployment use certificates from your
organisation's PKI or a public CA.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "DEFAULT_HOSTS",
    "SERVER_CERT",
    "SERVER_KEY",
    "GeneratedCerts",
    "add_client_certificate",
    "client_paths",
    "generate_certificates",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")

CA_COMMON_NAME = "fedfm test CA"
SERVER_COMMON_NAME = "fedfm coordinator"

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A DNS name as it may appear in a dNSName SAN: ASCII labels (IDNA A-labels), optional leading
# wildcard label, optional trailing dot.
_DNS_NAME = re.compile(
    r"^(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_BACKDATE = dt.timedelta(minutes=5)
_KEY_MODE = 0o600
_CERT_MODE = 0o644


@dataclass
class GeneratedCerts:
    """Where :func:`generate_certificates` wrote its files."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    """Client name -> (``client-<name>.pem``, ``client-<name>.key``)."""


def client_paths(directory: str | Path, name: str) -> tuple[Path, Path]:
    """The (certificate, key) paths of client ``name`` in ``directory``."""
    directory = Path(directory)
    return directory / f"client-{name}.pem", directory / f"client-{name}.key"


def generate_certificates(
    out_dir: str | Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> GeneratedCerts:
    """Write a new test CA, a server certificate for ``hosts`` and one certificate per client.

    Raises ``ValueError`` for a bad host, client name or ``days``, and ``FileExistsError`` (before
    writing anything) when one of the files exists already and ``overwrite`` is false.
    """
    _check_days(days)
    host_list = _unique(hosts)
    if not host_list:
        raise ValueError("at least one host is needed for the server certificate")
    sans = [_san_entry(host) for host in host_list]
    client_list = list(clients)
    for name in client_list:
        _check_client_name(name)
    duplicates = sorted({name for name in client_list if client_list.count(name) > 1})
    if duplicates:
        raise ValueError(f"client names given more than once: {', '.join(duplicates)}")

    directory = Path(out_dir)
    result = GeneratedCerts(
        directory=directory,
        ca_cert=directory / CA_CERT,
        ca_key=directory / CA_KEY,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        client_certs={name: client_paths(directory, name) for name in client_list},
    )
    targets = [result.ca_cert, result.ca_key, result.server_cert, result.server_key]
    for cert_path, key_path in result.client_certs.values():
        targets += [cert_path, key_path]
    if not overwrite:
        _refuse_existing(targets)
    directory.mkdir(parents=True, exist_ok=True)

    now = _now()
    not_after = now + dt.timedelta(days=days)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, now - _BACKDATE, not_after)
    _write_key(result.ca_key, ca_key)
    _write_cert(result.ca_cert, ca_cert)

    server_key = _new_key()
    server_cert = _leaf_certificate(
        ca_cert,
        ca_key,
        server_key,
        common_name=SERVER_COMMON_NAME,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=sans,
        not_before=now - _BACKDATE,
        not_after=not_after,
    )
    _write_key(result.server_key, server_key)
    _write_cert(result.server_cert, server_cert)

    for name, (cert_path, key_path) in result.client_certs.items():
        _issue_client(ca_cert, ca_key, name, cert_path, key_path, now, not_after)
    return result


def add_client_certificate(
    directory: str | Path, name: str, *, days: int = 365, overwrite: bool = False
) -> tuple[Path, Path]:
    """Sign a certificate for client ``name`` with the CA in ``directory`` (``ca.pem``/``ca.key``).

    Returns the (certificate, key) paths. The certificate never outlives the CA. Raises
    ``FileNotFoundError`` when the CA is missing, ``ValueError`` for a bad name or ``days`` or a
    CA key that does not match its certificate, and ``FileExistsError`` when the client's files
    exist already and ``overwrite`` is false.
    """
    _check_days(days)
    _check_client_name(name)
    directory = Path(directory)
    ca_cert, ca_key = _load_ca(directory)
    cert_path, key_path = client_paths(directory, name)
    if not overwrite:
        _refuse_existing([cert_path, key_path])
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= now:
        raise ValueError(f"the CA in {directory} has expired ({ca_cert.not_valid_after_utc})")
    _issue_client(ca_cert, ca_key, name, cert_path, key_path, now, not_after)
    return cert_path, key_path


# -- validation ------------------------------------------------------------------------------


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive integer, got {days!r}")


def _check_client_name(name: str) -> None:
    if not isinstance(name, str) or not _CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"invalid client name {name!r}: use 1-64 characters from A-Z, a-z, 0-9, '_', '.', '-'"
        )


def _unique(items: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item.strip(), None)
    return list(seen)


def _san_entry(host: str) -> x509.GeneralName:
    """``IPAddress`` for an IPv4/IPv6 literal (brackets allowed), ``DNSName`` otherwise."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(literal))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.fullmatch(host):
        raise ValueError(f"invalid host {host!r}: expected an IP address or an ASCII DNS name")
    return x509.DNSName(host)


def _refuse_existing(paths: Sequence[Path]) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise FileExistsError(
                errno.EEXIST,
                f"{path} exists already (pass overwrite=True / --overwrite to replace it)",
                str(path),
            )


# -- certificates ----------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, not_before: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(CA_COMMON_NAME))
        .issuer_name(_name(CA_COMMON_NAME))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )
    return builder.sign(key, hashes.SHA256())


def _leaf_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _issue_client(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    cert_path: Path,
    key_path: Path,
    now: dt.datetime,
    not_after: dt.datetime,
) -> None:
    key = _new_key()
    cert = _leaf_certificate(
        ca_cert,
        ca_key,
        key,
        common_name=name,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=[],
        not_before=now - _BACKDATE,
        not_after=not_after,
    )
    _write_key(key_path, key)
    _write_cert(cert_path, cert)


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    missing = [str(p) for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            errno.ENOENT,
            f"no CA in {directory}: missing {', '.join(missing)} "
            "(create one with `fedfm server gen-certs`)",
            missing[0],
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key (was it made by gen-certs?)")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} does not belong to {cert_path}")
    return cert, key


# -- files -----------------------------------------------------------------------------------


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _atomic_write(path, data, _KEY_MODE)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _atomic_write(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file next to ``path`` with ``mode``, then rename it over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600 already; set the final mode before writing
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise

"""`fedfm.deploy.certs`: the test CA and certificates behind `fedfm server gen-certs`."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedfm.deploy.certs import (
    GeneratedCerts,
    add_client_certificate,
    generate_certificates,
)

TIMEOUT = 5.0


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> GeneratedCerts:
    return generate_certificates(tmp_path_factory.mktemp("certs"), clients=["site0", "site.1"])


def test_generated_files_and_extensions(certs: GeneratedCerts) -> None:
    files = [certs.ca_cert, certs.ca_key, certs.server_cert, certs.server_key]
    files += [p for pair in certs.client_certs.values() for p in pair]
    for path in files:
        assert path.is_file() and path.parent == certs.directory
    for key in [certs.ca_key, certs.server_key, *(k for _, k in certs.client_certs.values())]:
        assert _mode(key) == 0o600, key
    assert certs.client_certs["site0"] == (
        certs.directory / "client-site0.pem",
        certs.directory / "client-site0.key",
    )
    assert not list(certs.directory.glob(".*.tmp"))  # no temp files left behind

    ca = _load(certs.ca_cert)
    assert _cn(ca) == "fedfm test CA"
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    ca.verify_directly_issued_by(ca)

    server = _load(certs.server_cert)
    server.verify_directly_issued_by(ca)
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    # validity: backdated a few minutes, ends `days` (365) later
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 365 * 86400 + 4 * 60 <= lifetime.total_seconds() <= 365 * 86400 + 6 * 60

    for name, (cert_path, _) in certs.client_certs.items():
        client = _load(cert_path)
        client.verify_directly_issued_by(ca)
        assert _cn(client) == name
        assert _eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert not client.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_custom_hosts(tmp_path: Path) -> None:
    hosts = ["fl.example.org", "10.0.0.7", "[fe80::1]"]
    made = generate_certificates(tmp_path, hosts=hosts, days=2)
    server = _load(made.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("fe80::1"),
    }
    assert made.client_certs == {}
    with pytest.raises(ValueError, match="bad host"):
        generate_certificates(tmp_path / "x", hosts=["bad host"])
    with pytest.raises(ValueError, match="days"):
        generate_certificates(tmp_path / "y", days=0)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# -- a real (mutual) TLS handshake over loopback ---------------------------------------------


def _server_context(certs: GeneratedCerts) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(str(certs.ca_cert))
    context.verify_flags |= ssl.VERIFY_X509_STRICT  # Python 3.13's default; keep us compatible
    return context


def _client_context(certs: GeneratedCerts, client: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    context.load_verify_locations(str(certs.ca_cert))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if client is not None:
        cert, key = certs.client_certs[client]
        context.load_cert_chain(str(cert), str(key))
    return context


def _exchange(certs: GeneratedCerts, client: str | None, server_hostname: str) -> dict[str, Any]:
    """Serve one TLS connection on 127.0.0.1 and connect to it; report what each side saw.

    The server echoes one message upper-cased. Every socket has a timeout and the server thread is
    joined with one, so a broken handshake fails the test instead of hanging it.
    """
    server_ctx = _server_context(certs)
    client_ctx = _client_context(certs, client)
    seen: dict[str, Any] = {}

    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        port = listener.getsockname()[1]

        def serve() -> None:
            try:
                raw, _ = listener.accept()
                raw.settimeout(TIMEOUT)
                with server_ctx.wrap_socket(raw, server_side=True) as tls:
                    seen["server_peer"] = tls.getpeercert()
                    data = tls.recv(1024)
                    tls.sendall(data.upper())
            except Exception as exc:  # reported to the test, not raised in the thread
                seen["server_error"] = exc

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
            ):
                seen["client_peer"] = tls.getpeercert()
                tls.sendall(b"hello fedfm")
                seen["reply"] = tls.recv(1024)
        except (ssl.SSLError, OSError) as exc:
            seen["client_error"] = exc
        finally:
            thread.join(TIMEOUT * 2)
        assert not thread.is_alive(), "TLS server thread did not finish"
    return seen


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake(certs: GeneratedCerts, server_hostname: str) -> None:
    seen = _exchange(certs, "site0", server_hostname)
    assert "client_error" not in seen and "server_error" not in seen, seen
    assert seen["reply"] == b"HELLO FEDFM"
    subject = dict(item for rdn in seen["server_peer"]["subject"] for item in rdn)
    assert subject["commonName"] == "site0"
    issuer = dict(item for rdn in seen["client_peer"]["issuer"] for item in rdn)
    assert issuer["commonName"] == "fedfm test CA"


def test_client_without_certificate_is_refused(certs: GeneratedCerts) -> None:
    seen = _exchange(certs, None, "localhost")
    # The server never completes a handshake with a peer certificate ...
    assert "server_peer" not in seen, seen
    assert isinstance(seen.get("server_error"), ssl.SSLError), seen
    # ... and the client never gets an answer: with TLS 1.2 its handshake fails, with TLS 1.3 it
    # learns of the refusal on its first read (an alert, a reset or an empty read).
    assert seen.get("reply", b"") == b""


def test_wrong_hostname_is_refused(certs: GeneratedCerts) -> None:
    seen = _exchange(certs, "site0", "fl.example.org")
    assert isinstance(seen.get("client_error"), ssl.SSLCertVerificationError), seen
    assert "server_peer" not in seen and "reply" not in seen, seen


# -- overwriting, names, adding clients ------------------------------------------------------


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    first = generate_certificates(tmp_path, clients=["a"])
    before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.pem") as info:
        generate_certificates(tmp_path)
    assert info.value.filename == str(first.ca_cert)
    assert first.ca_cert.read_bytes() == before

    # only a client file in the way: still refused, and nothing else is written
    other = tmp_path / "other"
    other.mkdir()
    (other / "client-b.key").write_text("mine")
    with pytest.raises(FileExistsError, match="client-b.key"):
        generate_certificates(other, clients=["b"])
    assert sorted(p.name for p in other.iterdir()) == ["client-b.key"]

    second = generate_certificates(tmp_path, clients=["a"], overwrite=True)
    assert second.ca_cert.read_bytes() != before
    _load(second.client_certs["a"][0]).verify_directly_issued_by(_load(second.ca_cert))
    assert _mode(second.ca_key) == 0o600


@pytest.mark.parametrize("bad", ["", "a b", "../evil", "x" * 65, "naïve", "a/b"])
def test_bad_client_name(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="invalid client name") as info:
        generate_certificates(tmp_path / "certs", clients=["ok", bad])
    assert repr(bad) in str(info.value)
    assert not (tmp_path / "certs").exists()


def test_duplicate_client_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="more than once: a"):
        generate_certificates(tmp_path, clients=["a", "b", "a"])


def test_add_client_certificate(tmp_path: Path) -> None:
    made = generate_certificates(tmp_path, days=30)
    cert_path, key_path = add_client_certificate(tmp_path, "site-9", days=400)
    assert (cert_path, key_path) == (tmp_path / "client-site-9.pem", tmp_path / "client-site-9.key")
    assert _mode(key_path) == 0o600
    ca = _load(made.ca_cert)
    client = _load(cert_path)
    client.verify_directly_issued_by(ca)
    assert _cn(client) == "site-9"
    assert _eku(client) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.not_valid_after_utc <= ca.not_valid_after_utc  # never outlives its CA

    # it works for mutual TLS against the original server certificate
    made.client_certs["site-9"] = (cert_path, key_path)
    assert _exchange(made, "site-9", "localhost")["reply"] == b"HELLO FEDFM"

    with pytest.raises(FileExistsError, match="client-site-9"):
        add_client_certificate(tmp_path, "site-9")
    add_client_certificate(tmp_path, "site-9", overwrite=True)
    with pytest.raises(ValueError, match="invalid client name"):
        add_client_certificate(tmp_path, "no/slash")


def test_add_client_certificate_without_ca(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no CA in .*ca.pem"):
        add_client_certificate(tmp_path, "site0")
    generate_certificates(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(FileNotFoundError, match="ca.key"):
        add_client_certificate(tmp_path, "site0")
    assert not (tmp_path / "client-site0.pem").exists()

"""The triggerer's sender (network_requests.sending_async) over TLS on 127.0.0.1, and what it
reads: one read of the Connection per request, one SSL context per setting (reused: building
one loads the CA bundle), none for plain HTTP, a DNS SRV Connection handed to a worker."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import ipaddress
import json
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("airflow_db")


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, valid for a day (cryptography, an Airflow dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def tls_api(tmp_path) -> Iterator[tuple[str, Path]]:
    cert, key = _self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _spec(conn_id: str, endpoint: str = "/secure/1"):
    from network_requests.request_spec import RequestSpec, TaskRef

    return RequestSpec(conn_id=conn_id, endpoint=endpoint, method="GET", task=TaskRef("d", "r", "t"))


def _connection_uri(base_url: str, extra: dict) -> str:
    from airflow.models.connection import Connection

    host, port = base_url.split("://", 1)[1].rsplit(":", 1)
    return Connection(conn_type="https", host=host, port=int(port), extra=json.dumps(extra)).get_uri()


def test_https_with_the_connections_ca_bundle_is_sent_and_its_context_is_built_once(tls_api, monkeypatch):
    from network_requests import sending_async

    base_url, cert = tls_api
    monkeypatch.setenv("AIRFLOW_CONN_TLS_API", _connection_uri(base_url, {"verify": str(cert)}))
    sending_async._cached_ssl.cache_clear()

    async def two_requests():
        answers = []
        for item in (1, 2):
            request = await asyncio.to_thread(sending_async.prepare, _spec("tls_api", f"/secure/{item}"))
            answers.append(await sending_async.send(request, deadline=None, max_response_bytes=None))
        return request, answers

    request, answers = asyncio.run(two_requests())

    assert request.url.startswith("https://127.0.0.1:") and request.verify == str(cert)
    assert [(response.status_code, response.json()) for response, _ in answers] == [
        (200, {"path": "/secure/1"}), (200, {"path": "/secure/2"})]
    info = sending_async._cached_ssl.cache_info()
    assert (info.misses, info.hits) == (1, 1), "one context built for the bundle, then reused"

    # A renewed bundle (a new mtime) gets a new context; the cached one is not used for it.
    before = sending_async._ssl(str(cert), None)
    os.utime(cert, (cert.stat().st_atime, cert.stat().st_mtime + 10))
    assert sending_async._ssl(str(cert), None) is not before


def test_https_without_the_ca_bundle_is_refused_as_a_transient_connection_problem(tls_api, monkeypatch):
    from network_requests import sending_async
    from network_requests.exceptions import TransientRequestError

    base_url, _ = tls_api
    monkeypatch.setenv("AIRFLOW_CONN_TLS_API", _connection_uri(base_url, {}))
    request = sending_async.prepare(_spec("tls_api"))

    with pytest.raises(TransientRequestError) as raised:
        asyncio.run(sending_async.send(request, deadline=None, max_response_bytes=None))
    assert "127.0.0.1" in str(raised.value)


def test_plain_http_builds_no_ssl_context_and_reads_the_connection_once(monkeypatch):
    from network_requests import sending_async
    from network_requests.hooks import NetworkRequestHook

    monkeypatch.setenv("AIRFLOW_CONN_PLAIN_API", "http://127.0.0.1:9")
    reads: list[str] = []
    original = NetworkRequestHook.get_connection

    def counted(cls, conn_id):
        reads.append(conn_id)
        return original.__func__(cls, conn_id)

    monkeypatch.setattr(NetworkRequestHook, "get_connection", classmethod(counted))
    built: list[tuple] = []
    monkeypatch.setattr(sending_async, "_cached_ssl", lambda *args: built.append(args))

    request = sending_async.prepare(_spec("plain_api"))
    with pytest.raises(Exception):  # nothing listens on port 9: the point is what was built before
        asyncio.run(sending_async.send(request, deadline=None, max_response_bytes=None))

    assert reads == ["plain_api"], "the Connection is read once per request"
    assert built == [], "no SSL context for an http:// request"


def test_a_dns_srv_connection_is_handed_to_a_worker(monkeypatch):
    from network_requests import sending_async

    monkeypatch.setenv("AIRFLOW_CONN_SRV_API", json.dumps(
        {"conn_type": "http", "host": "_http._tcp.example.internal", "extra": {"srv_lookup": True}}))

    with pytest.raises(sending_async.CannotSendHere, match="DNS SRV"):
        sending_async.prepare(_spec("srv_api"))

"""Every transport-level failure of FhirClient is a FhirError: bad URL, TLS, protocol, decoding, size."""

from __future__ import annotations

import contextlib
import datetime
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fhir_test_servers import Reply, ScriptedServer, outcome

from fhir_adapters import (
    FhirClient,
    FhirError,
    InvalidRequestError,
    InvalidResponseError,
    RequestTooLargeError,
    TemporaryFhirError,
    TlsError,
    WriteRefusal,
    write_refusal,
)

PATIENT = {"resourceType": "Patient", "id": "pat-1"}
NGINX_413 = (
    b"<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    b"<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


def make_client(base: str, **kwargs: Any) -> FhirClient:
    kwargs.setdefault("auth", None)
    kwargs.setdefault("backoff_seconds", 0.01)
    return FhirClient(base, **kwargs)


def searchset(next_url: str) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": {"resourceType": "Condition", "id": "c1"}, "search": {"mode": "match"}}],
        "link": [{"relation": "next", "url": next_url}],
    }


@pytest.mark.parametrize("control", ["\x01", "\x7f", "\x1b"])
async def test_same_origin_next_link_with_control_characters_is_an_invalid_response(
    server: ScriptedServer, control: str
) -> None:
    server.handle = lambda request: Reply(
        body=searchset(f"{server.url}/fhir/Condition?_page_token=a{control}b")
    )
    async with make_client(f"{server.url}/fhir") as client:
        with pytest.raises(InvalidResponseError, match="next link is not a valid URL"):
            await client.search("Condition", {"patient": "pat-1"})
    assert len(server.requests) == 1  # the bad link was never requested


async def test_a_base_url_with_control_characters_is_an_invalid_request(server: ScriptedServer) -> None:
    server.handle = lambda request: Reply(body=PATIENT)
    async with make_client(f"{server.url}/fh\x01ir") as client:
        with pytest.raises(InvalidRequestError):
            await client.read("Patient", "pat-1")
    assert server.requests == []


@pytest.fixture(scope="module")
def untrusted_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real HTTPS server on loopback with a self-signed certificate no trust store holds."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}/fhir"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


async def test_an_untrusted_certificate_is_a_tls_error_and_not_retried(untrusted_tls_server: str) -> None:
    async with make_client(untrusted_tls_server, retries=3, backoff_seconds=5) as client:
        with pytest.raises(TlsError, match="TLS"):
            # Five seconds of backoff per retry would show in the test's time if it retried.
            await client.read("Patient", "pat-1")


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A TCP server on loopback that reads a request and answers `answer` verbatim, then closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                with contextlib.suppress(OSError):
                    connection.recv(65536)
                    connection.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/fhir"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


async def test_a_server_that_speaks_no_http_is_a_temporary_fhir_error() -> None:
    with raw_server(b"HELLO THIS IS NOT HTTP\r\n\r\n") as base:
        async with make_client(base, retries=1) as client:
            with pytest.raises(TemporaryFhirError, match="RemoteProtocolError"):
                await client.read("Patient", "pat-1")


async def test_an_undecodable_body_is_an_invalid_response() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: 12\r\nConnection: close\r\n\r\nnot gzip at!"
    )
    with raw_server(answer) as base:
        async with make_client(base) as client:
            with pytest.raises(InvalidResponseError, match="could not be read"):
                await client.read("Patient", "pat-1")


async def test_a_proxys_plain_500_too_large_is_not_retried_and_says_too_large(server: ScriptedServer) -> None:
    server.handle = lambda request: Reply(500, b"request entity too large", content_type="text/plain")
    device = {"resourceType": "Device", "identifier": [{"system": "urn:x", "value": "d"}], "status": "active"}
    async with make_client(f"{server.url}/fhir", retries=3) as client:
        with pytest.raises(RequestTooLargeError) as caught:
            await client.create(device, if_none_exist="identifier=urn:x|d")  # retryable, yet sent once
    assert len(server.requests) == 1
    assert caught.value.status == 500
    assert caught.value.sent_bytes == len(server.requests[0].body)
    assert write_refusal(caught.value) is WriteRefusal.TOO_LARGE


async def test_a_plain_500_without_those_words_stays_temporary(server: ScriptedServer) -> None:
    server.handle = lambda request: Reply(500, b"upstream failed", content_type="text/plain")
    async with make_client(f"{server.url}/fhir", retries=1) as client:
        with pytest.raises(TemporaryFhirError) as caught:
            await client.read("Patient", "pat-1")
    assert not isinstance(caught.value, RequestTooLargeError)
    assert len(server.requests) == 2


async def test_a_proxys_413_page_and_a_stated_limit(server: ScriptedServer) -> None:
    answers = iter(
        [
            Reply(413, NGINX_413, content_type="text/html"),
            Reply(413, outcome("request body is larger than 1048576 bytes; put large content in a Binary")),
        ]
    )
    server.handle = lambda request: next(answers)
    async with make_client(f"{server.url}/fhir") as client:
        for expected_limit in (None, 1048576):
            with pytest.raises(RequestTooLargeError) as caught:
                await client.create({"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="})
            assert caught.value.limit_bytes == expected_limit
            assert isinstance(caught.value, FhirError)
            assert write_refusal(caught.value) is WriteRefusal.TOO_LARGE


def test_an_inline_limit_refusal_is_told_apart_from_a_body_limit() -> None:
    inline = RequestTooLargeError(
        "refused",
        status=413,
        operation_outcome=outcome("inline attachment data is 90000 bytes; this server accepts at most 65536"),
        diagnostics="inline attachment data is 90000 bytes; this server accepts at most 65536",
    )
    assert write_refusal(inline) is WriteRefusal.INLINE_TOO_LARGE

"""Signed checkpoints: torn and malformed lines, the anchoring statement, the separate key, the HTTP sink."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.audit import AuditError, AuditLog, JsonlCheckpointSink, SignedCheckpoint, sign_checkpoint
from service.audit.checkpoints import CheckpointError, HttpCheckpointSink, check_sink_url
from service.audit.verify import VerifyResult
from service.crypto import Keyring
from service.crypto.keyring import new_key_material

GOOD_HASH = "a" * 64


@pytest.fixture
def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def checkpoint_file(tmp_path: Path) -> Path:
    return tmp_path / "checkpoints.jsonl"


@pytest.fixture
def audit(signing_key: Ed25519PrivateKey, checkpoint_file: Path) -> AuditLog:
    return AuditLog(
        Keyring(new_key_material()), sink=JsonlCheckpointSink(checkpoint_file), signing_key=signing_key
    )


async def append(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession], n: int) -> None:
    for index in range(n):
        async with sessionmaker() as session, session.begin():
            await audit.append(
                session,
                action="fhir.read",
                outcome="success",
                actor="Practitioner/prac-1",
                patient="pat-1",
                ehr="sandbox",
                resource="Condition/cond-1",
                request_id=f"req-{index}",
            )


async def checkpoint(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]) -> SignedCheckpoint:
    async with sessionmaker() as session, session.begin():
        return await audit.checkpoint(session)


async def verify(audit: AuditLog, sessionmaker: async_sessionmaker[AsyncSession]) -> VerifyResult:
    async with sessionmaker() as session, session.begin():
        return await audit.verify(session)


def tear_a_write(path: Path, line: str, *, room: int) -> subprocess.CompletedProcess[str]:
    """Append ``line`` through the sink in another process whose file size limit leaves ``room`` bytes."""
    code = f"""
import resource, signal, sys
from service.audit.checkpoints import CheckpointError, JsonlCheckpointSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = {str(path)!r}
size = __import__("os").path.getsize(path)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + {room}, size + {room}))
try:
    JsonlCheckpointSink(path)._append({line!r})
except CheckpointError as error:
    print(error)
    sys.exit(3)
"""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


async def test_a_torn_write_is_reported_and_the_next_checkpoint_still_writes(
    audit, sessionmaker, checkpoint_file, signing_key
):
    await append(audit, sessionmaker, 3)
    await checkpoint(audit, sessionmaker)
    # A real short write: the disk (here: the file size limit) runs out in the middle of the next line.
    await append(audit, sessionmaker, 1)
    torn = sign_checkpoint(signing_key, seq=4, head_hash=GOOD_HASH, time="2026-12-01T00:00:00.000000Z")
    result = tear_a_write(checkpoint_file, torn.to_json(), room=25)
    assert result.returncode == 3, result.stderr
    assert "disk full" in result.stdout
    assert not checkpoint_file.read_bytes().endswith(b"\n")

    report = await verify(audit, sessionmaker)
    assert not report.ok
    assert report.chain_intact
    assert [(p.line, "torn last line" in p.reason) for p in report.problems] == [(2, True)]
    assert report.anchored_seq == 3

    # A fresh process keeps checkpointing: the next checkpoint starts on a line of its own.
    again = AuditLog(
        Keyring(new_key_material()), sink=JsonlCheckpointSink(checkpoint_file), signing_key=signing_key
    )
    await append(again, sessionmaker, 1)
    async with sessionmaker() as session, session.begin():
        written = await again.maybe_checkpoint(session, every=1)
    assert written is not None
    assert written.seq == 5
    lines = checkpoint_file.read_text().split("\n")
    assert json.loads(lines[2])["seq"] == 5
    assert lines[3] == ""
    report = await verify(again, sessionmaker)
    assert [p.line for p in report.problems] == [2]
    assert "torn" not in report.problems[0].reason  # no longer the last line: plainly not JSON
    assert (report.anchored_seq, report.unanchored) == (5, 0)


def _malformed_lines(signing_key: Ed25519PrivateKey) -> dict[str, tuple[str, str]]:
    good = json.loads(
        sign_checkpoint(signing_key, seq=1, head_hash=GOOD_HASH, time="2026-12-01T00:00:00.000000Z").to_json()
    )
    other = sign_checkpoint(
        Ed25519PrivateKey.generate(), seq=1, head_hash=GOOD_HASH, time="2026-12-01T00:00:00.000000Z"
    )
    return {
        "seq-not-a-number": (
            json.dumps({**good, "seq": "four"}),
            'seq must be a non-negative integer, not "four"',
        ),
        "missing-field": (
            json.dumps({k: v for k, v in good.items() if k != "signature"}),
            "missing field(s)",
        ),
        "a-list": ("[1,2]", "not a JSON object (a list)"),
        "not-json": ('{"seq": 1, "head_', "not valid JSON"),
        "bad-hash": (json.dumps({**good, "head_hash": "xyz"}), "head_hash must be 64"),
        "signature-not-base64": (json.dumps({**good, "signature": "%%%"}), "not valid base64"),
        "extra-field": (json.dumps({**good, "note": 1}), "unexpected field(s): note"),
        "signed-by-another-key": (other.to_json(), "invalid signature"),
    }


@pytest.mark.parametrize(
    "kind",
    [
        "seq-not-a-number",
        "missing-field",
        "a-list",
        "not-json",
        "bad-hash",
        "signature-not-base64",
        "extra-field",
        "signed-by-another-key",
    ],
)
async def test_every_malformed_line_is_reported_with_its_line_and_reason(
    kind, audit, sessionmaker, checkpoint_file, signing_key
):
    await append(audit, sessionmaker, 2)
    await checkpoint(audit, sessionmaker)
    line, reason = _malformed_lines(signing_key)[kind]
    with checkpoint_file.open("a") as handle:
        handle.write(line + "\n")
    await append(audit, sessionmaker, 1)
    await checkpoint(audit, sessionmaker)
    report = await verify(audit, sessionmaker)
    assert not report.ok
    assert report.chain_intact
    assert [p.line for p in report.problems] == [2]
    assert reason in report.problems[0].reason
    # The good lines around it still count.
    assert (report.checkpoints_checked, report.anchored_seq) == (2, 3)


def test_anchor_statements():
    assert (
        VerifyResult(ok=True, count=1296, anchored_seq=1256).anchor_statement()
        == "1,296 records, last 40 not yet anchored (last signed checkpoint at record 1,256)"
    )
    assert (
        VerifyResult(ok=True, count=1296, anchored_seq=1296)
        .anchor_statement()
        .startswith("1,296 records, all anchored")
    )
    nothing = VerifyResult(ok=True, count=12).anchor_statement()
    assert nothing.startswith("12 records, none anchored")
    assert "deleted from the end of the log would go unnoticed" in nothing
    assert VerifyResult(ok=True, count=0).anchor_statement() == "0 records; nothing to anchor"


async def test_no_checkpoint_means_nothing_is_anchored(audit, sessionmaker):
    await append(audit, sessionmaker, 3)
    report = await verify(audit, sessionmaker)
    assert report.ok
    assert report.anchored_seq == 0
    assert report.unanchored == 3
    assert "none anchored" in report.anchor_statement()


async def test_a_keyring_holder_cannot_forge_checkpoints(sessionmaker, checkpoint_file, signing_key):
    """Everything the keyring holds signs nothing the checkpoint key's public half accepts."""
    keyring = Keyring(new_key_material())
    audit = AuditLog(keyring, sink=JsonlCheckpointSink(checkpoint_file), signing_key=signing_key)
    await append(audit, sessionmaker, 2)
    await checkpoint(audit, sessionmaker)
    material = new_key_material()
    attacker_keys = [Ed25519PrivateKey.generate()]
    seed = getattr(material, "audit_signing_seed", None)
    if seed is not None:
        attacker_keys.append(Ed25519PrivateKey.from_private_bytes(seed))
    for key in attacker_keys:
        forger = AuditLog(keyring, sink=JsonlCheckpointSink(checkpoint_file), signing_key=key)
        await checkpoint(forger, sessionmaker)
    report = await verify(audit, sessionmaker)
    assert [p.line for p in report.problems] == list(range(2, 2 + len(attacker_keys)))
    assert all("invalid signature" in p.reason for p in report.problems)
    # Verifying needs the public key only.
    public_only = AuditLog(
        keyring, sink=JsonlCheckpointSink(checkpoint_file), verify_key=signing_key.public_key()
    )
    assert (await verify(public_only, sessionmaker)).checkpoints_checked == 1
    with pytest.raises(AuditError, match="signing key"):
        await checkpoint(public_only, sessionmaker)


# --- the HTTP sink, against a real HTTP server on 127.0.0.1 ---------------------------------------------


@dataclass
class LogService:
    url: str
    bodies: list[bytes] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    answer: int = 201


@pytest.fixture
def log_service() -> Iterator[LogService]:
    service = LogService(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            service.paths.append(self.path)
            if self.path == "/checkpoints":
                service.bodies.append(body)
            self.send_response(service.answer)
            if service.answer in (301, 302, 307, 308):
                self.send_header("Location", "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    service.url = f"http://127.0.0.1:{server.server_address[1]}/checkpoints"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def http_audit(log_service: LogService, checkpoint_file: Path, signing_key: Ed25519PrivateKey) -> AuditLog:
    sink = HttpCheckpointSink(log_service.url, local=JsonlCheckpointSink(checkpoint_file))
    return AuditLog(Keyring(new_key_material()), sink=sink, signing_key=signing_key)


async def test_http_sink_posts_each_checkpoint_and_keeps_the_file(
    log_service, sessionmaker, checkpoint_file, signing_key
):
    audit = http_audit(log_service, checkpoint_file, signing_key)
    await append(audit, sessionmaker, 2)
    written = await checkpoint(audit, sessionmaker)
    assert [json.loads(body) for body in log_service.bodies] == [json.loads(written.to_json())]
    assert json.loads(checkpoint_file.read_text()) == json.loads(written.to_json())
    assert (await verify(audit, sessionmaker)).anchored_seq == 2


@pytest.mark.parametrize(("answer", "said"), [(503, "answered 503"), (302, "redirects are not followed")])
async def test_http_sink_refusal_is_raised_and_nothing_is_lost_locally(
    answer, said, log_service, sessionmaker, checkpoint_file, signing_key
):
    audit = http_audit(log_service, checkpoint_file, signing_key)
    await append(audit, sessionmaker, 2)
    log_service.answer = answer
    with pytest.raises(AuditError, match=said) as raised:
        await checkpoint(audit, sessionmaker)
    assert "kept in" in str(raised.value)
    assert log_service.paths == ["/checkpoints"]  # the redirect was not followed
    report = await verify(audit, sessionmaker)
    assert (report.ok, report.anchored_seq) == (True, 2)
    # The service is back: the next checkpoint goes out and covers everything before it.
    log_service.answer = 200
    await append(audit, sessionmaker, 1)
    async with sessionmaker() as session, session.begin():
        again = await audit.maybe_checkpoint(session, every=1)
    assert again is not None
    assert json.loads(log_service.bodies[-1])["seq"] == 3


async def test_http_sink_that_cannot_be_reached_is_an_error_not_a_loss(
    sessionmaker, checkpoint_file, signing_key
):
    unreachable = LogService(url="http://127.0.0.1:9/checkpoints")  # the discard port: nothing listens
    audit = http_audit(unreachable, checkpoint_file, signing_key)
    await append(audit, sessionmaker, 1)
    with pytest.raises(AuditError, match="could not be reached"):
        await checkpoint(audit, sessionmaker)
    assert json.loads(checkpoint_file.read_text())["seq"] == 1


@pytest.mark.parametrize(
    "url",
    ["http://logs.example/checkpoints", "ftp://127.0.0.1/x", "https://user:pw@logs.example/x", "not a url"],
)
def test_http_sink_urls_must_be_https_or_loopback(url):
    with pytest.raises(CheckpointError):
        check_sink_url(url)


def test_http_sink_accepts_https_and_loopback_http():
    check_sink_url("https://logs.example/checkpoints")
    check_sink_url("http://[::1]:8080/x")
    check_sink_url("http://localhost/x")


def test_signature_must_be_64_bytes():
    from service.audit.checkpoints import CheckpointFormatError, SignedCheckpoint

    short = base64.b64encode(b"x" * 10).decode()
    with pytest.raises(CheckpointFormatError, match="64 bytes"):
        SignedCheckpoint.from_dict({"seq": 1, "head_hash": GOOD_HASH, "time": "t", "signature": short})

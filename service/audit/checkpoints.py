"""Signed audit checkpoints (the signed head of the chain) and the sinks that keep them outside the DB.

The file sink appends one JSON line per checkpoint with a single ``write`` under an exclusive lock, then
fsyncs. A line cut short (disk full, crash mid-write) stays in the file as it is: reading reports it with its
line number, and the next checkpoint starts on a fresh line, so one torn write never stops checkpointing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.audit.chain import canonical_time, checkpoint_message

CHECKPOINT_FIELDS = ("head_hash", "seq", "signature", "time")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SIGNATURE_BYTES = 64


class CheckpointError(Exception):
    """A checkpoint could not be signed or written."""


class RemoteCheckpointError(CheckpointError):
    """The checkpoint is safe in the local file, but the remote sink did not take it."""


class CheckpointFormatError(ValueError):
    """A stored checkpoint line is not a well-formed checkpoint; the message says why."""


@dataclass(frozen=True)
class SignedCheckpoint:
    """One signed statement: the chain had ``seq`` records ending in ``head_hash`` at ``time``."""

    seq: int
    head_hash: str
    time: str
    signature: str  # base64 Ed25519 over chain.checkpoint_message(...)

    def to_json(self) -> str:
        return json.dumps(
            {"seq": self.seq, "head_hash": self.head_hash, "time": self.time, "signature": self.signature},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, line: str) -> SignedCheckpoint:
        """Parse one stored line; anything but a well-formed checkpoint raises ``CheckpointFormatError``."""
        try:
            data = json.loads(line)
        except ValueError:
            raise CheckpointFormatError("not valid JSON") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> SignedCheckpoint:
        if not isinstance(data, dict):
            raise CheckpointFormatError(f"not a JSON object (a {_json_kind(data)})")
        missing = [name for name in CHECKPOINT_FIELDS if name not in data]
        if missing:
            raise CheckpointFormatError(f"missing field(s): {', '.join(missing)}")
        extra = sorted(set(data) - set(CHECKPOINT_FIELDS))
        if extra:
            raise CheckpointFormatError(f"unexpected field(s): {', '.join(map(str, extra))}")
        seq, head_hash, time, signature = data["seq"], data["head_hash"], data["time"], data["signature"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise CheckpointFormatError(f"seq must be a non-negative integer, not {_shown(seq)}")
        if not isinstance(head_hash, str) or not _HEX64.fullmatch(head_hash):
            raise CheckpointFormatError("head_hash must be 64 lower-case hex characters")
        if not isinstance(time, str) or not time:
            raise CheckpointFormatError("time must be a non-empty string")
        if not isinstance(signature, str):
            raise CheckpointFormatError("signature must be a base64 string")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointFormatError("signature is not valid base64") from None
        if len(raw) != _SIGNATURE_BYTES:
            raise CheckpointFormatError(f"signature must be {_SIGNATURE_BYTES} bytes, not {len(raw)}")
        return cls(seq=seq, head_hash=head_hash, time=time, signature=signature)

    def is_signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(
                base64.b64decode(self.signature, validate=True),
                checkpoint_message(seq=self.seq, head_hash=self.head_hash, time=self.time),
            )
        except (InvalidSignature, ValueError):
            return False
        return True


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def sign_checkpoint(key: Ed25519PrivateKey, *, seq: int, head_hash: str, time: str) -> SignedCheckpoint:
    signature = key.sign(checkpoint_message(seq=seq, head_hash=head_hash, time=time))
    return SignedCheckpoint(
        seq=seq, head_hash=head_hash, time=time, signature=base64.b64encode(signature).decode()
    )


@dataclass(frozen=True)
class LocatedCheckpoint:
    line: int  # 1-based line number in the sink's file
    checkpoint: SignedCheckpoint


@dataclass(frozen=True)
class CheckpointProblem:
    line: int | None  # None: about the sink as a whole
    reason: str


@dataclass(frozen=True)
class CheckpointReadout:
    """Everything a sink holds: the well-formed checkpoints and, for every other line, why not."""

    source: str
    checkpoints: tuple[LocatedCheckpoint, ...] = ()
    problems: tuple[CheckpointProblem, ...] = ()


def parse_checkpoint_file(text: str, *, source: str) -> CheckpointReadout:
    """Each line on its own: one bad line is reported, it never hides the others."""
    checkpoints: list[LocatedCheckpoint] = []
    problems: list[CheckpointProblem] = []
    lines = text.split("\n")
    torn_last = lines[-1] != ""  # a file of whole lines ends with "\n", leaving an empty last piece
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            checkpoints.append(LocatedCheckpoint(number, SignedCheckpoint.from_json(line)))
        except CheckpointFormatError as error:
            reason = str(error)
            if number == len(lines) and torn_last:
                reason = f"torn last line (no newline at the end; cut short while writing?): {reason}"
            problems.append(CheckpointProblem(number, reason))
    return CheckpointReadout(source=source, checkpoints=tuple(checkpoints), problems=tuple(problems))


class CheckpointSink(Protocol):
    """Storage outside the database for signed checkpoints (a file, object storage, a log service)."""

    @property
    def description(self) -> str: ...

    async def write(self, checkpoint: SignedCheckpoint) -> None: ...

    async def read(self) -> CheckpointReadout: ...


class JsonlCheckpointSink:
    """Signed checkpoints appended as JSON lines to a local file: one write per line, flushed and fsynced."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def description(self) -> str:
        return f"file {self.path}"

    async def write(self, checkpoint: SignedCheckpoint) -> None:
        await asyncio.to_thread(self._append, checkpoint.to_json())

    def _append(self, line: str) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as error:
            raise CheckpointError(f"cannot open checkpoint file {self.path}: {error.strerror}") from None
        try:
            # Writers in other processes (API replicas sharing the volume) take turns.
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            data = (line + "\n").encode()
            if not _ends_with_newline(descriptor):
                data = b"\n" + data  # after a torn line: start on a fresh line, leave the torn one as it is
            written = os.write(descriptor, data)
            if written != len(data):
                raise CheckpointError(
                    f"checkpoint file {self.path}: only {written} of {len(data)} bytes written (disk full?)"
                )
            os.fsync(descriptor)
        except OSError as error:
            raise CheckpointError(f"cannot write checkpoint file {self.path}: {error.strerror}") from None
        finally:
            os.close(descriptor)

    async def read(self) -> CheckpointReadout:
        return await asyncio.to_thread(self._read)

    def _read(self) -> CheckpointReadout:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return CheckpointReadout(source=self.description)
        except OSError as error:
            problem = CheckpointProblem(None, f"cannot read {self.path}: {error.strerror}")
            return CheckpointReadout(source=self.description, problems=(problem,))
        return parse_checkpoint_file(raw.decode("utf-8", errors="replace"), source=self.description)

    async def read_all(self) -> list[SignedCheckpoint]:
        """The well-formed checkpoints only (``read`` also says what is wrong with the other lines)."""
        return [located.checkpoint for located in (await self.read()).checkpoints]


FileCheckpointSink = JsonlCheckpointSink  # the name the composition root uses


def _ends_with_newline(descriptor: int) -> bool:
    size = os.fstat(descriptor).st_size
    return size == 0 or os.pread(descriptor, 1, size - 1) == b"\n"


class HttpCheckpointSink:
    """Every checkpoint kept in a local file first, then POSTed as JSON to a log service outside this host.

    TLS is always verified and redirects are never followed (a redirect answer is a failure). When the service
    refuses or cannot be reached, the checkpoint is already safe in the local file and the error is raised;
    the next checkpoint covers everything before it, so a missed POST leaves no unanchored gap behind.
    """

    def __init__(
        self,
        url: str,
        *,
        local: JsonlCheckpointSink,
        timeout_seconds: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_sink_url(url)
        self.url = url
        self.local = local
        self._timeout = timeout_seconds
        self._transport = transport

    @property
    def description(self) -> str:
        return f"{self.local.description} and POST to {_origin(self.url)}"

    async def write(self, checkpoint: SignedCheckpoint) -> None:
        await self.local.write(checkpoint)
        try:
            async with httpx.AsyncClient(
                verify=True, follow_redirects=False, timeout=self._timeout, transport=self._transport
            ) as client:
                response = await client.post(
                    self.url,
                    content=checkpoint.to_json().encode(),
                    headers={"Content-Type": "application/json", "User-Agent": "CareCanvas/0.1"},
                )
        except httpx.HTTPError as error:
            raise RemoteCheckpointError(
                f"checkpoint at seq {checkpoint.seq} kept in {self.local.path}, but the HTTP sink at "
                f"{_origin(self.url)} could not be reached ({type(error).__name__})"
            ) from None
        if not 200 <= response.status_code < 300:
            raise RemoteCheckpointError(
                f"checkpoint at seq {checkpoint.seq} kept in {self.local.path}, but the HTTP sink at "
                f"{_origin(self.url)} answered {response.status_code}"
                + (" (redirects are not followed)" if response.is_redirect else "")
            )

    async def read(self) -> CheckpointReadout:
        return await self.local.read()


def check_sink_url(url: str) -> None:
    """https, or plain http only to a loopback address (a log service sidecar, tests)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise CheckpointError("the audit checkpoint URL must be an https:// URL")
    if parts.username or parts.password:
        raise CheckpointError("the audit checkpoint URL must not carry credentials")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise CheckpointError("the audit checkpoint URL must use https:// (plain http only to loopback)")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class Checkpointer:
    """Signs chain heads with the audit signing key and writes them to the sink."""

    def __init__(
        self,
        sink: CheckpointSink | None,
        signing_key: Ed25519PrivateKey | None,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._sink = sink
        self._signing_key = signing_key
        self._clock = clock
        self._last_seq: int | None = None

    @property
    def enabled(self) -> bool:
        return self._sink is not None and self._signing_key is not None

    async def read(self) -> CheckpointReadout:
        if self._sink is None:
            return CheckpointReadout(source="no checkpoint sink configured")
        return await self._sink.read()

    async def write(self, *, seq: int, head_hash: str) -> SignedCheckpoint:
        """Sign ``seq``/``head_hash`` (a committed head) and write it to the sink."""
        if self._sink is None or self._signing_key is None:
            raise CheckpointError("checkpoints need a sink and an audit signing key")
        checkpoint = sign_checkpoint(
            self._signing_key, seq=seq, head_hash=head_hash, time=canonical_time(self._clock())
        )
        try:
            await self._sink.write(checkpoint)
        except RemoteCheckpointError:
            self._last_seq = seq  # kept in the local file: it counts
            raise
        self._last_seq = seq
        return checkpoint

    async def _stored_head(self) -> int:
        readout = await self.read()
        return max((located.checkpoint.seq for located in readout.checkpoints), default=0)

    async def due(self, *, seq: int, every: int) -> bool:
        """Whether ``every`` records were appended since the last stored checkpoint."""
        if every < 1:
            raise ValueError("every must be ≥ 1")
        if not self.enabled:
            return False
        if self._last_seq is None:
            self._last_seq = await self._stored_head()
        return seq - self._last_seq >= every

"""Signed audit checkpoints (the signed head of the chain) and the sinks that keep them outside the DB."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.audit.chain import canonical_time, checkpoint_message


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
        data = json.loads(line)
        return cls(
            seq=int(data["seq"]),
            head_hash=str(data["head_hash"]),
            time=str(data["time"]),
            signature=str(data["signature"]),
        )

    def is_signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            key.verify(
                base64.b64decode(self.signature, validate=True),
                checkpoint_message(seq=self.seq, head_hash=self.head_hash, time=self.time),
            )
        except (InvalidSignature, ValueError):
            return False
        return True


def sign_checkpoint(key: Ed25519PrivateKey, *, seq: int, head_hash: str, time: str) -> SignedCheckpoint:
    signature = key.sign(checkpoint_message(seq=seq, head_hash=head_hash, time=time))
    return SignedCheckpoint(
        seq=seq, head_hash=head_hash, time=time, signature=base64.b64encode(signature).decode()
    )


class CheckpointSink(Protocol):
    """Storage outside the database for signed checkpoints (a file, object storage, a log service)."""

    async def write(self, checkpoint: SignedCheckpoint) -> None: ...

    async def read_all(self) -> list[SignedCheckpoint]: ...


class JsonlCheckpointSink:
    """Signed checkpoints appended as JSON lines to a local file (fsynced)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    async def write(self, checkpoint: SignedCheckpoint) -> None:
        await asyncio.to_thread(self._append, checkpoint.to_json() + "\n")

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    async def read_all(self) -> list[SignedCheckpoint]:
        return await asyncio.to_thread(self._read)

    def _read(self) -> list[SignedCheckpoint]:
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [SignedCheckpoint.from_json(line) for line in lines if line.strip()]


FileCheckpointSink = JsonlCheckpointSink  # the name the composition root uses


class CheckpointError(Exception):
    """A checkpoint could not be signed or written."""


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

    async def read_all(self) -> list[SignedCheckpoint]:
        return [] if self._sink is None else await self._sink.read_all()

    async def write(self, *, seq: int, head_hash: str) -> SignedCheckpoint:
        """Sign ``seq``/``head_hash`` (a committed head) and write it to the sink."""
        if self._sink is None or self._signing_key is None:
            raise CheckpointError("checkpoints need a sink and an audit signing key")
        checkpoint = sign_checkpoint(
            self._signing_key, seq=seq, head_hash=head_hash, time=canonical_time(self._clock())
        )
        await self._sink.write(checkpoint)
        self._last_seq = seq
        return checkpoint

    async def due(self, *, seq: int, every: int) -> bool:
        """Whether ``every`` records were appended since the last checkpoint."""
        if every < 1:
            raise ValueError("every must be ≥ 1")
        if not self.enabled:
            return False
        if self._last_seq is None:
            self._last_seq = max((cp.seq for cp in await self.read_all()), default=0)
        return seq - self._last_seq >= every

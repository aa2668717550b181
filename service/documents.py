"""Reviewed results: the encrypted draft (caption, alt text, provenance inputs) and its write-back state."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.crypto import Keyring, aad_for
from service.db.models import Document

_TABLE = "documents"


@dataclass
class DocumentView:
    id: str
    job_id: str
    status: str
    ehr_name: str
    content: dict[str, Any]
    fhir_document_id: str | None
    identifier: str | None
    version: int


def _aad(document_id: str) -> bytes:
    return aad_for(_TABLE, document_id, "content")


async def create_draft(
    db: AsyncSession, *, keyring: Keyring, job_id: str, ehr_name: str, content: dict[str, Any]
) -> str:
    document_id = str(uuid.uuid4())
    db.add(
        Document(
            id=document_id,
            job_id=job_id,
            status="draft",
            ehr_name=ehr_name,
            content=keyring.encrypt(json.dumps(content).encode(), aad=_aad(document_id)),
            version=1,
        )
    )
    await db.flush()
    return document_id


async def load_document(db: AsyncSession, *, keyring: Keyring, job_id: str) -> DocumentView | None:
    row = (await db.execute(select(Document).where(Document.job_id == job_id))).scalar_one_or_none()
    if row is None:
        return None
    return DocumentView(
        id=row.id,
        job_id=row.job_id,
        status=row.status,
        ehr_name=row.ehr_name or "",
        content=json.loads(keyring.decrypt(row.content, aad=_aad(row.id))),
        fhir_document_id=row.fhir_document_id,
        identifier=row.identifier,
        version=row.version,
    )


async def save_content(
    db: AsyncSession, *, keyring: Keyring, document: DocumentView, content: dict[str, Any]
) -> None:
    await db.execute(
        update(Document)
        .where(Document.id == document.id)
        .values(content=keyring.encrypt(json.dumps(content).encode(), aad=_aad(document.id)))
    )
    document.content = content


async def transition(
    db: AsyncSession,
    *,
    document: DocumentView,
    to_status: str,
    from_statuses: tuple[str, ...],
    **values: Any,
) -> bool:
    """Optimistic compare-and-set on status and version: two approvals at once, only one proceeds."""
    stamp = datetime.now(UTC)
    extra: dict[str, Any] = dict(values)
    if to_status == "approved":
        extra.setdefault("approved_at", stamp)
    if to_status == "written":
        extra.setdefault("written_at", stamp)
    result = await db.execute(
        update(Document)
        .where(
            Document.id == document.id,
            Document.version == document.version,
            Document.status.in_(from_statuses),
        )
        .values(status=to_status, version=document.version + 1, **extra)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    document.status = to_status
    document.version += 1
    return True

"""Reviewed results: the encrypted draft (caption, alt text, provenance inputs) and its write-back state."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import clean_text
from service.crypto import Keyring, aad_for
from service.db.models import Document
from service.jobs import JobKind

_TABLE = "documents"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replaces(_Frozen):
    """The chart document a new version replaces, and the job that made it."""

    fhir_document_id: str
    job_id: str


class SafetyCheck(_Frozen):
    """The worker's safety verdict on the image (service.generation.safety.safety_result)."""

    checked: bool = False
    flagged: bool = False
    reason: str | None = None
    classifier: str | None = None


class DraftContent(_Frozen):
    """What a draft holds, encrypted at rest. Drafts stored before a field existed load with its default."""

    kind: JobKind = JobKind.ILLUSTRATION
    title: str = ""
    caption: str = ""
    alt_text: str = ""
    # The caption and alt text as generated, so an approval can tell whether the clinician edited them.
    generated_caption: str | None = None
    generated_alt_text: str | None = None
    caption_grade: float | None = None
    language: str = "en"
    topic_id: str | None = None
    # The clinician chose the topic (the condition matched none); a new version keeps that choice.
    topic_chosen_by_clinician: bool = False
    style: str | None = None
    condition_id: str | None = None
    condition_text: str | None = None
    patient_id: str | None = None
    encounter_id: str | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    model: str = ""
    seed: int | None = None
    symbolic: bool | None = None
    story_id: str | None = None
    variant: int | None = None
    variants: int | None = None
    replaces: Replaces | None = None
    included_image: bool = True
    write_notes: tuple[str, ...] = ()
    safety: SafetyCheck | None = None

    @property
    def source_reference(self) -> str:
        """Education pictures come from a Condition; portraits from the patient's story."""
        if self.condition_id:
            return f"Condition/{self.condition_id}"
        return f"QuestionnaireResponse/{self.story_id}"

    @property
    def original_caption(self) -> str:
        return self.caption if self.generated_caption is None else self.generated_caption

    @property
    def original_alt_text(self) -> str:
        return self.alt_text if self.generated_alt_text is None else self.generated_alt_text

    @classmethod
    def generated(cls, **fields: Any) -> DraftContent:
        """A new draft: what was generated is remembered next to what the clinician will edit."""
        draft = cls(**fields)
        return draft.model_copy(
            update={"generated_caption": draft.caption, "generated_alt_text": draft.alt_text}
        )

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


@dataclass
class DocumentView:
    id: str
    job_id: str
    status: str
    ehr_name: str
    content: DraftContent
    fhir_document_id: str | None
    identifier: str | None
    version: int
    approved_at: datetime | None = None
    error: str | None = None
    created_at: datetime | None = None


def _aad(document_id: str) -> bytes:
    return aad_for(_TABLE, document_id, "content")


async def create_draft(
    db: AsyncSession, *, keyring: Keyring, job_id: str, ehr_name: str, content: DraftContent
) -> str:
    document_id = add_draft(db, keyring=keyring, job_id=job_id, ehr_name=ehr_name, content=content)
    await db.flush()
    return document_id


def add_draft(
    db: AsyncSession, *, keyring: Keyring, job_id: str, ehr_name: str, content: DraftContent
) -> str:
    """`create_draft` without the flush (many drafts go out in one INSERT at the caller's next flush)."""
    document_id = str(uuid.uuid4())
    db.add(
        Document(
            id=document_id,
            job_id=job_id,
            status="draft",
            ehr_name=ehr_name,
            content=keyring.encrypt(content.encode(), aad=_aad(document_id)),
            version=1,
        )
    )
    return document_id


async def load_document(db: AsyncSession, *, keyring: Keyring, job_id: str) -> DocumentView | None:
    # populate_existing: a caller that polls for another request's write must see the fresh row.
    statement = select(Document).where(Document.job_id == job_id).execution_options(populate_existing=True)
    row = (await db.execute(statement)).scalar_one_or_none()
    if row is None:
        return None
    return _view(row, keyring)


async def documents_by_identifier(
    db: AsyncSession, *, keyring: Keyring, ehr_name: str, identifiers: list[str]
) -> dict[str, DocumentView]:
    """The local rows for FHIR documents we wrote to this EHR, keyed by their FHIR identifier value."""
    if not identifiers:
        return {}
    statement = select(Document).where(Document.identifier.in_(identifiers), Document.ehr_name == ehr_name)
    rows = (await db.execute(statement.execution_options(populate_existing=True))).scalars()
    return {row.identifier: _view(row, keyring) for row in rows if row.identifier}


async def recent_documents(
    db: AsyncSession, *, keyring: Keyring, ehr_name: str, statuses: tuple[str, ...], limit: int = 50
) -> list[DocumentView]:
    """This EHR's newest documents in these statuses (the caller filters by patient: that is encrypted)."""
    statement = (
        select(Document)
        .where(Document.ehr_name == ehr_name, Document.status.in_(statuses))
        .order_by(Document.created_at.desc())
        .limit(limit)
    )
    rows = (await db.execute(statement.execution_options(populate_existing=True))).scalars()
    return [_view(row, keyring) for row in rows]


async def delete_draft(db: AsyncSession, *, document: DocumentView, from_statuses: tuple[str, ...]) -> bool:
    """Remove a never-approved draft (compare-and-set on status and version, like transition)."""
    result = await db.execute(
        delete(Document).where(
            Document.id == document.id,
            Document.version == document.version,
            Document.status.in_(from_statuses),
        )
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def _view(row: Document, keyring: Keyring) -> DocumentView:
    return DocumentView(
        id=row.id,
        job_id=row.job_id,
        status=row.status,
        ehr_name=row.ehr_name or "",
        content=DraftContent.model_validate_json(keyring.decrypt(row.content, aad=_aad(row.id))),
        fhir_document_id=row.fhir_document_id,
        identifier=row.identifier,
        version=row.version,
        approved_at=row.approved_at,
        error=row.error,
        created_at=row.created_at,
    )


async def save_content(
    db: AsyncSession, *, keyring: Keyring, document: DocumentView, content: DraftContent
) -> None:
    await db.execute(
        update(Document)
        .where(Document.id == document.id)
        .values(content=keyring.encrypt(content.encode(), aad=_aad(document.id)))
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


@dataclass(frozen=True)
class HistoryEntry:
    """One DocumentReference CareCanvas wrote to the chart earlier, as the workspace lists it."""

    fhir_document_id: str
    identifier: str
    status: str  # the EHR's: current | superseded | entered-in-error
    date: str
    description: str
    replaces: str | None
    job_id: str | None  # set when this CareCanvas knows the document (so it can replace or withdraw it)
    local_status: str | None
    time: str = ""  # HH:MM of `date`, as the EHR wrote it
    approver: str | None = None  # the author reference (Practitioner/…): who approved it


STATUS_LABELS = {
    "current": "In the chart",
    "superseded": "Replaced by a newer version",
    "entered-in-error": "Withdrawn (entered in error)",
}


def history_from_search(
    resources: list[dict[str, Any]], *, identifier_system: str, local: dict[str, DocumentView]
) -> list[HistoryEntry]:
    """Our documents among the search results (checked again: a server may ignore the identifier filter)."""
    dated: list[tuple[datetime, HistoryEntry]] = []
    for resource in resources:
        identifier = next(
            (
                item.get("value")
                for item in resource.get("identifier") or []
                if isinstance(item, dict) and item.get("system") == identifier_system and item.get("value")
            ),
            None,
        )
        if not isinstance(identifier, str) or not isinstance(resource.get("id"), str):
            continue
        replaces = next(
            (
                str((item.get("target") or {}).get("reference", "")).removeprefix("DocumentReference/")
                for item in resource.get("relatesTo") or []
                if isinstance(item, dict) and item.get("code") == "replaces"
            ),
            None,
        )
        known = local.get(identifier)
        written = clean_text(resource.get("date"), max_length=40)
        approver = next(
            (
                str(item.get("reference"))
                for item in resource.get("author") or []
                if isinstance(item, dict) and str(item.get("reference", "")).startswith("Practitioner/")
            ),
            None,
        )
        entry = HistoryEntry(
            fhir_document_id=resource["id"],
            identifier=identifier,
            status=str(resource.get("status") or "unknown"),
            date=written[:10],
            description=clean_text(resource.get("description")) or "Education picture",
            replaces=replaces or None,
            job_id=known.job_id if known else None,
            local_status=known.status if known else None,
            time=written[11:16] if len(written) >= 16 and written[10] == "T" else "",
            approver=approver,
        )
        dated.append((_written_instant(resource.get("date")), entry))
    # Newest first by the full instant the EHR wrote: two documents saved in the same minute (the shown
    # HH:MM) kept the search's order, oldest first, and the clinician's newest one was not on top.
    dated.sort(key=lambda pair: pair[0], reverse=True)
    return [entry for _, entry in dated]


def _written_instant(value: object) -> datetime:
    """A DocumentReference.date as an aware instant; anything unreadable sorts last."""
    try:
        instant = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return instant if instant.tzinfo else instant.replace(tzinfo=UTC)

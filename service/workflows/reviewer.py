"""The portrait reviewer (artist or clinician): drafts across patients, notes, send back, approve."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from service.audit import AuditAction, AuditEntity, CareCanvasObject, canonical_actor, carecanvas_ref
from service.crypto import Keyring, aad_for
from service.db.models import PortraitNote, PortraitReview
from service.documents import DocumentView, load_document
from service.jobs import JobKind
from service.settings import Settings
from service.staff_auth import STAFF_ACTOR_PREFIX
from service.workflows.context import WorkflowContext
from service.workflows.errors import (
    JobNotOwnedError,
    NotAllowedError,
    NotReadyError,
    PortraitNotReviewedError,
)

NOTE_MAX = 1000


class ReviewStatus(StrEnum):
    WAITING = "waiting"
    SENT_BACK = "sent_back"
    APPROVED = "approved"


class NoteKind(StrEnum):
    NOTE = "note"
    SENT = "sent"  # the clinician put the draft in the queue
    SEND_BACK = "send_back"
    APPROVE = "approve"
    LIKENESS = "likeness"  # why people are shown other than the story says


@dataclass(frozen=True)
class Reviewer:
    """A signed-in portrait reviewer: their canonical reference, role and (where known) name.

    `reference` is a fhirUser (`Practitioner/prac-3`) for a launch, or the staff actor
    (`urn:carecanvas:staff:<sub>`) for a staff sign-in.
    """

    reference: str
    role: str
    display: str | None = None

    @property
    def is_staff(self) -> bool:
        return self.reference.startswith(STAFF_ACTOR_PREFIX)

    @property
    def shown(self) -> str:
        """How pages name them: the name for staff (their URN means nothing to a clinician)."""
        return self.display or self.reference if self.is_staff else self.reference


@dataclass(frozen=True)
class ReviewNote:
    kind: NoteKind
    author: str | None
    author_role: str | None
    text: str
    created_at: datetime

    @property
    def author_shown(self) -> str:
        """The note's author as pages name them: a staff user by their sign-in name (subject)."""
        if self.author and self.author.startswith(STAFF_ACTOR_PREFIX):
            return f"staff reviewer {self.author.removeprefix(STAFF_ACTOR_PREFIX)}"
        return self.author or "CareCanvas"


@dataclass(frozen=True)
class QueueItem:
    """One portrait draft in the queue (what the reviewer sees before opening it)."""

    job_id: str
    status: ReviewStatus
    patient_id: str
    patient_name: str
    requested_by: str | None
    decided_by: str | None
    decided_role: str | None
    updated_at: datetime
    decided_display: str | None = None  # a staff reviewer's name (kept encrypted with the details)
    ehr_name: str = ""

    @property
    def decided_shown(self) -> str | None:
        """Who decided, as pages name them (a staff reviewer by name)."""
        return self.decided_display or self.decided_by


@dataclass(frozen=True)
class ReviewDetail:
    item: QueueItem
    title: str
    caption: str
    alt_text: str
    style: str
    seed: int | None
    notes: tuple[ReviewNote, ...]
    document_status: str | None = None  # draft, approved, written, failed, retracted (clinician pages)
    fhir_document_id: str | None = None
    language: str = "en"


def reviewer_for(settings: Settings, fhir_user: str | None) -> Reviewer | None:
    """The reviewer this launch's fhirUser is, from the configured list (None when not a reviewer)."""
    reference = canonical_actor(fhir_user)
    if reference is None:
        return None
    wanted = {canonical_actor(key) or key: role for key, role in settings.portrait_reviewers.items()}
    role = wanted.get(reference)
    return Reviewer(reference=reference, role=role) if role else None


def _checked_note(text: str, *, required: bool) -> str:
    cleaned = " ".join(text.split())
    if required and not cleaned:
        raise NotAllowedError("Please write a note: it tells the clinician what to change.")
    if len(cleaned) > NOTE_MAX:
        raise NotAllowedError(f"A note can be at most {NOTE_MAX} characters.")
    return cleaned


async def add_note_row(
    db: AsyncSession,
    *,
    keyring: Keyring,
    job_id: str,
    kind: NoteKind,
    text: str,
    author: str | None,
    author_role: str | None,
) -> None:
    """One encrypted note on a portrait draft (the caller commits)."""
    note_id = str(uuid.uuid4())
    body = keyring.encrypt(text.encode("utf-8"), aad=aad_for("portrait_notes", note_id, "body"))
    db.add(
        PortraitNote(
            id=note_id,
            job_id=job_id,
            kind=kind.value,
            author=canonical_actor(author),
            author_role=author_role,
            body=body,
        )
    )


async def notes_for(db: AsyncSession, *, keyring: Keyring, job_id: str) -> tuple[ReviewNote, ...]:
    rows = (
        await db.execute(
            select(PortraitNote)
            .where(PortraitNote.job_id == job_id)
            .order_by(PortraitNote.created_at, PortraitNote.id)
        )
    ).scalars()
    return tuple(
        ReviewNote(
            kind=NoteKind(row.kind),
            author=row.author,
            author_role=row.author_role,
            text=keyring.decrypt(row.body, aad=aad_for("portrait_notes", row.id, "body")).decode("utf-8"),
            created_at=row.created_at,
        )
        for row in rows
    )


def _details(row: PortraitReview, keyring: Keyring) -> dict[str, object]:
    details: dict[str, object] = json.loads(
        keyring.decrypt(row.details, aad=aad_for("portrait_reviews", row.job_id, "details"))
    )
    return details


def _item(row: PortraitReview, keyring: Keyring) -> QueueItem:
    details = _details(row, keyring)
    decided_display = details.get("decided_display") if row.decided_by else None
    return QueueItem(
        job_id=row.job_id,
        status=ReviewStatus(row.status),
        patient_id=str(details.get("patient_id", "")),
        patient_name=str(details.get("patient_name", "")),
        requested_by=row.requested_by,
        decided_by=row.decided_by,
        decided_role=row.decided_role,
        updated_at=row.updated_at,
        decided_display=decided_display if isinstance(decided_display, str) else None,
        ehr_name=row.ehr_name,
    )


async def draft_ehr(db: AsyncSession, job_id: str) -> str | None:
    """The EHR a draft in the queue came from (a staff reviewer works at every EHR)."""
    statement = select(PortraitReview.ehr_name).where(PortraitReview.job_id == job_id)
    return (await db.execute(statement)).scalar_one_or_none()


async def _row(db: AsyncSession, job_id: str, ehr_name: str) -> PortraitReview | None:
    statement = (
        select(PortraitReview)
        .where(PortraitReview.job_id == job_id, PortraitReview.ehr_name == ehr_name)
        .execution_options(populate_existing=True)
    )
    return (await db.execute(statement)).scalar_one_or_none()


async def review_item(ctx: WorkflowContext, job_id: str) -> QueueItem | None:
    """The queue entry of this draft at this EHR, if it was ever sent for review."""
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    return _item(row, ctx.services.keyring) if row else None


async def send_for_review(ctx: WorkflowContext, *, job_id: str, patient_name: str, note: str) -> None:
    """The clinician puts a finished portrait draft in the reviewer's queue (again, after a send-back)."""
    # The queue reads on a connection of its own: before this transaction takes one (SQLite has one).
    progress = await ctx.services.queue.get(job_id)
    if progress is None or progress.status != "succeeded":
        raise NotReadyError("The portrait is not finished yet.")
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if document is None or document.content.kind != JobKind.PORTRAIT:
        raise JobNotOwnedError("No such portrait.")
    if document.content.patient_id != ctx.patient_id:
        raise JobNotOwnedError("No such portrait.")
    text = _checked_note(note, required=False)
    keyring = ctx.services.keyring
    details = json.dumps({"patient_id": ctx.patient_id, "patient_name": patient_name}).encode("utf-8")
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    if row is None:
        ctx.db.add(
            PortraitReview(
                job_id=job_id,
                ehr_name=ctx.ehr.name,
                status=ReviewStatus.WAITING.value,
                details=keyring.encrypt(details, aad=aad_for("portrait_reviews", job_id, "details")),
                requested_by=canonical_actor(ctx.actor),
            )
        )
    elif row.status == ReviewStatus.APPROVED:
        raise NotAllowedError("The reviewer has already approved this portrait.")
    else:
        row.status = ReviewStatus.WAITING.value
        row.requested_by = canonical_actor(ctx.actor)
        row.decided_by = row.decided_role = row.decided_at = None
    await add_note_row(
        ctx.db,
        keyring=keyring,
        job_id=job_id,
        kind=NoteKind.SENT,
        text=text,
        author=ctx.actor,
        author_role=ctx.role,
    )
    await ctx.audit(
        AuditAction.PORTRAIT_SEND,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, job_id))],
        detail={"job_id": job_id, "with_note": bool(text)},
    )


async def _ehr_rows(ctx: WorkflowContext, *, limit: int) -> Sequence[PortraitReview]:
    """The portrait drafts sent for review at this launch's EHR, newest change first."""
    rows = await ctx.db.execute(
        select(PortraitReview)
        .where(PortraitReview.ehr_name == ctx.ehr.name)
        .order_by(PortraitReview.updated_at.desc())
        .limit(limit)
    )
    return rows.scalars().all()


async def _draft_detail(
    ctx: WorkflowContext, item: QueueItem, document: DocumentView, job_id: str
) -> ReviewDetail:
    """A draft's words and notes as the reviewer reads them (the clinician's page adds the chart status)."""
    content = document.content
    return ReviewDetail(
        item=item,
        title=content.title,
        caption=content.caption,
        alt_text=content.alt_text,
        style=content.style or "",
        seed=content.seed,
        notes=await notes_for(ctx.db, keyring=ctx.services.keyring, job_id=job_id),
    )


async def review_queue(ctx: WorkflowContext, reviewer: Reviewer) -> list[QueueItem]:
    """Every portrait draft sent for review at this EHR, across patients, newest change first."""
    del reviewer  # every reviewer of this EHR sees one shared queue
    items = [_item(row, ctx.services.keyring) for row in await _ehr_rows(ctx, limit=200)]
    await ctx.audit(AuditAction.VIEW, resource="portrait review queue", detail={"count": len(items)})
    return items


async def review_detail(ctx: WorkflowContext, reviewer: Reviewer, job_id: str) -> ReviewDetail:
    """One draft in the queue with its words and notes; viewing it is audited for its patient."""
    del reviewer
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if row is None or document is None:
        raise JobNotOwnedError("No such portrait in the queue.")
    item = _item(row, ctx.services.keyring)
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, job_id))],
        patient=item.patient_id,
        detail={"queue": True},
    )
    return await _draft_detail(ctx, item, document, job_id)


async def decide(
    ctx: WorkflowContext, reviewer: Reviewer, *, job_id: str, kind: NoteKind, note: str
) -> ReviewStatus:
    """A reviewer's note, send-back (a note is required) or approval, audited for the draft's patient."""
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    if row is None:
        raise JobNotOwnedError("No such portrait in the queue.")
    text = _checked_note(note, required=kind in (NoteKind.SEND_BACK, NoteKind.NOTE))
    item = _item(row, ctx.services.keyring)
    action = AuditAction.PORTRAIT_NOTE
    if kind in (NoteKind.SEND_BACK, NoteKind.APPROVE):
        if row.status != ReviewStatus.WAITING:
            raise NotAllowedError("Only a portrait that is waiting for review can be sent back or approved.")
        status = ReviewStatus.SENT_BACK if kind is NoteKind.SEND_BACK else ReviewStatus.APPROVED
        keyring = ctx.services.keyring
        # A staff reviewer's name, for the pages and the Provenance (a launch reviewer is named by fhirUser).
        details = {
            **_details(row, keyring),
            "decided_display": reviewer.display if reviewer.is_staff else None,
        }
        sealed = keyring.encrypt(
            json.dumps(details).encode("utf-8"), aad=aad_for("portrait_reviews", job_id, "details")
        )
        await ctx.db.execute(
            update(PortraitReview)
            .where(PortraitReview.job_id == job_id)
            .values(
                status=status.value,
                decided_by=reviewer.reference,
                decided_role=reviewer.role,
                decided_at=datetime.now(UTC),
                details=sealed,
            )
        )
        action = (
            AuditAction.PORTRAIT_SEND_BACK if kind is NoteKind.SEND_BACK else AuditAction.PORTRAIT_APPROVE
        )
    elif kind is not NoteKind.NOTE:
        raise NotAllowedError("A reviewer can add a note, send back or approve.")
    await add_note_row(
        ctx.db,
        keyring=ctx.services.keyring,
        job_id=job_id,
        kind=kind,
        text=text,
        author=reviewer.reference,
        author_role=reviewer.role,
    )
    await ctx.audit(
        action,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, job_id))],
        patient=item.patient_id,
        description=f"{reviewer.reference} ({reviewer.role}) {kind.value.replace('_', ' ')} {job_id}",
        detail={"job_id": job_id, "reviewer_role": reviewer.role, "with_note": bool(text)},
    )
    refreshed = await _row(ctx.db, job_id, ctx.ehr.name)
    return ReviewStatus(refreshed.status if refreshed else row.status)


async def approving_reviewer(
    db: AsyncSession, job_id: str, *, keyring: Keyring | None = None
) -> Reviewer | None:
    """Who approved this portrait as its reviewer (for the Provenance), if anyone did (with a keyring: and
    their name, where the approval kept one)."""
    row = (
        await db.execute(select(PortraitReview).where(PortraitReview.job_id == job_id))
    ).scalar_one_or_none()
    if row is None or row.status != ReviewStatus.APPROVED or not row.decided_by:
        return None
    display = _item(row, keyring).decided_display if keyring is not None else None
    return Reviewer(reference=row.decided_by, role=row.decided_role or "reviewer", display=display)


def reviewers_configured(settings: Settings) -> bool:
    """Reviewers on the fhirUser list or staff reviewer roles: then a portrait needs a reviewer's approval."""
    staff = settings.staff_oidc
    return bool(settings.portrait_reviewers) or bool(staff is not None and staff.reviewer_roles)


async def review_status(db: AsyncSession, job_id: str) -> ReviewStatus | None:
    """Where this draft stands with the reviewers (None: never sent to them)."""
    statement = select(PortraitReview.status).where(PortraitReview.job_id == job_id)
    status = (await db.execute(statement)).scalar_one_or_none()
    return ReviewStatus(status) if status else None


WORDS_LOCKED = (
    "A reviewer approved these words, so they stay as they are. "
    "To change them, make new variants and send one to the reviewer."
)


async def words_locked(db: AsyncSession, job_id: str, kind: JobKind) -> bool:
    """A portrait a reviewer approved keeps the words they approved: no edit, and approval writes those.

    So the reviewer the Provenance names as verifier saw exactly what goes to the chart (from any launch).
    """
    return kind == JobKind.PORTRAIT and await review_status(db, job_id) is ReviewStatus.APPROVED


_NOT_REVIEWED = {
    None: "A reviewer has to approve this portrait before it goes to the chart. "
    "Send it to the reviewer first.",
    ReviewStatus.WAITING: "This portrait is waiting for the reviewer. "
    "It can go to the chart once they approve it.",
    ReviewStatus.SENT_BACK: "The reviewer sent this portrait back. "
    "Read their note, change it, and send it again.",
}


async def review_hold(db: AsyncSession, settings: Settings, job_id: str, kind: JobKind) -> str | None:
    """Why this draft cannot go to the chart yet (a portrait no reviewer approved), in words; None: it can."""
    try:
        if kind == JobKind.PORTRAIT:
            await require_review(db, settings, job_id)
    except PortraitNotReviewedError as held:
        return held.message
    return None


async def require_review(db: AsyncSession, settings: Settings, job_id: str) -> None:
    """Raise PortraitNotReviewedError unless reviewers are off or one approved this portrait."""
    if not reviewers_configured(settings):
        return
    status = await review_status(db, job_id)
    if status is not ReviewStatus.APPROVED:
        raise PortraitNotReviewedError(_NOT_REVIEWED[status], status=status.value if status else "not_sent")


async def review_image(ctx: WorkflowContext, reviewer: Reviewer, job_id: str) -> bytes:
    """The picture of a draft in the queue, for its reviewer (audited as viewed for its patient)."""
    # Read before this transaction takes its connection (the queue uses one of its own); shown only if queued.
    try:
        png = await ctx.services.queue.read_artifact(job_id, "png")
    except LookupError:
        raise JobNotOwnedError("No such portrait in the queue.") from None
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    if row is None:
        raise JobNotOwnedError("No such portrait in the queue.")
    item = _item(row, ctx.services.keyring)
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.IMAGE, job_id))],
        patient=item.patient_id,
        description=f"{reviewer.reference} viewed the image of job {job_id} in the review queue",
        detail={"job_id": job_id, "queue": True},
    )
    return png


@dataclass(frozen=True)
class PatientReview:
    """One of this patient's portrait drafts as a clinician sees it in any session: status, who, note."""

    item: QueueItem
    send_back_note: str | None  # the reviewer's latest send-back note, while it is sent back
    written: bool = False  # approved and already saved to the chart


async def _patient_rows(ctx: WorkflowContext) -> list[PortraitReview]:
    rows = await _ehr_rows(ctx, limit=500)
    # The patient is in the encrypted details (never a plaintext column): read and keep this patient's.
    keyring = ctx.services.keyring
    return [row for row in rows if _item(row, keyring).patient_id == ctx.patient_id]


async def patient_reviews(ctx: WorkflowContext) -> list[PatientReview]:
    """This patient's portrait drafts sent to the reviewers at this EHR, from the database (any session)."""
    if not ctx.patient_id:
        return []
    keyring = ctx.services.keyring
    shown: list[PatientReview] = []
    for row in await _patient_rows(ctx):
        item = _item(row, keyring)
        note, written = None, False
        if item.status is ReviewStatus.SENT_BACK:
            notes = await notes_for(ctx.db, keyring=keyring, job_id=row.job_id)
            note = next((n.text for n in reversed(notes) if n.kind is NoteKind.SEND_BACK), None)
        if item.status is ReviewStatus.APPROVED:
            document = await load_document(ctx.db, keyring=keyring, job_id=row.job_id)
            written = document is not None and document.status == "written"
        shown.append(PatientReview(item=item, send_back_note=note, written=written))
    if shown:
        await ctx.audit(
            AuditAction.VIEW, resource="portrait reviews of the patient", detail={"count": len(shown)}
        )
    return shown


async def _patient_row(ctx: WorkflowContext, job_id: str) -> PortraitReview:
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    if row is None or not ctx.patient_id or _item(row, ctx.services.keyring).patient_id != ctx.patient_id:
        raise JobNotOwnedError("No such portrait for this patient.")
    return row


async def patient_draft(ctx: WorkflowContext, job_id: str) -> ReviewDetail:
    """One of this patient's reviewed portrait drafts with its notes, for the clinician (audited)."""
    row = await _patient_row(ctx, job_id)
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if document is None:
        raise JobNotOwnedError("No such portrait for this patient.")
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, job_id))],
        detail={"job_id": job_id, "reviews": True},
    )
    detail = await _draft_detail(ctx, _item(row, ctx.services.keyring), document, job_id)
    return replace(
        detail,
        document_status=document.status,
        fhir_document_id=document.fhir_document_id,
        language=document.content.language,
    )


async def approved_patient_portrait(ctx: WorkflowContext, job_id: str) -> DocumentView:
    """A portrait draft of this launch's patient at this launch's EHR that a reviewer approved.

    Such a draft may be written back to the chart from any clinician launch for that patient and EHR, not
    only from the session that made it. Anything else is "no such portrait" (a 404 on the page): another
    patient's draft, another EHR's, one that is no portrait, and one no reviewer approved yet (waiting, sent
    back, never sent) - those stay with the session that made them, see `web.routes_portrait`.
    """
    missing = JobNotOwnedError("No such portrait for this patient.")
    row = await _row(ctx.db, job_id, ctx.ehr.name)
    if row is None or row.status != ReviewStatus.APPROVED or not ctx.patient_id:
        raise missing
    if _item(row, ctx.services.keyring).patient_id != ctx.patient_id:
        raise missing
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if (
        document is None
        or document.content.kind != JobKind.PORTRAIT
        or document.content.patient_id != ctx.patient_id
        or document.ehr_name != ctx.ehr.name
    ):
        raise missing
    return document


async def patient_draft_image(ctx: WorkflowContext, job_id: str) -> bytes:
    """The picture of one of this patient's reviewed portrait drafts, for the clinician (audited)."""
    try:
        png = await ctx.services.queue.read_artifact(job_id, "png")  # before this transaction's connection
    except LookupError:
        raise JobNotOwnedError("No such portrait for this patient.") from None
    await _patient_row(ctx, job_id)
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(CareCanvasObject.IMAGE, job_id))],
        detail={"job_id": job_id, "reviews": True},
    )
    return png


def provenance_agent(reviewer: Reviewer, on_behalf_of: dict[str, object] | None) -> dict[str, object]:
    """The reviewer as a Provenance agent: who shaped the portrait, with their role (artist or clinician)."""
    agent: dict[str, object] = {
        "type": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                    "code": "verifier",
                }
            ]
        },
        "role": [{"text": f"portrait reviewer ({reviewer.role})"}],
        "who": _who(reviewer),
    }
    if on_behalf_of:
        agent["onBehalfOf"] = on_behalf_of
    return agent


STAFF_REVIEWER_ID = "staff-reviewer"  # the contained Practitioner a staff reviewer is in the Provenance


def _who(reviewer: Reviewer) -> dict[str, object]:
    """A launch reviewer by their fhirUser reference; a staff reviewer (no FHIR id) by a contained one."""
    if not reviewer.is_staff:
        return {"reference": reviewer.reference}
    return {"reference": f"#{STAFF_REVIEWER_ID}", "display": reviewer.display or reviewer.shown}


def contained_reviewer(reviewer: Reviewer) -> dict[str, object] | None:
    """A staff reviewer as a contained Practitioner (identifier: the staff actor; name: sign-in name)."""
    if not reviewer.is_staff:
        return None
    subject = reviewer.reference.removeprefix(STAFF_ACTOR_PREFIX)
    return {
        "resourceType": "Practitioner",
        "id": STAFF_REVIEWER_ID,
        "identifier": [{"system": STAFF_ACTOR_PREFIX.rstrip(":"), "value": subject}],
        "name": [{"text": reviewer.display or subject}],
    }

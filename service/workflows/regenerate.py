"""Make a new version of a picture already in the chart; its approval replaces (supersedes) the old one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, FhirError, PreconditionFailedError, validate_resource
from service.crypto import Keyring
from service.documents import DocumentView, Replaces, load_document, save_content
from service.generation.prompts import Depiction
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotReplaceableError, TopicAlreadyMatchedError
from service.workflows.illustrate import IllustrationChoice, prepare_illustration

log = structlog.get_logger("carecanvas.regenerate")

# What happened to the replaced document on the EHR:
#   superseded       its status is now superseded
#   not-current      it was no longer current (e.g. withdrawn), so it was left as it is
#   not-allowed      this launch may not update DocumentReferences: left current (the new one says `replaces`)
#   not-supported    the server's CapabilityStatement offers no DocumentReference update: left current
#   refused          the server refused the update: left current
SupersedeOutcome = Literal["superseded", "not-current", "not-allowed", "not-supported", "refused"]


async def supersede_document(
    fhir: FhirClient, document_id: str, *, may_update: bool, server_updates: bool
) -> SupersedeOutcome:
    """Mark the replaced document superseded where the launch and the server allow it; never raises FhirError.

    The new document's `relatesTo replaces` already records the replacement, so a refusal here leaves the
    chart correct, only less tidy; the caller tells the user.
    """
    if not may_update:
        return "not-allowed"
    if not server_updates:  # the EHR profile: its CapabilityStatement offers no DocumentReference update
        return "not-supported"
    try:
        for _ in range(2):
            current = await fhir.read("DocumentReference", document_id)
            if current.get("status") != "current":
                return "not-current"
            version = (current.get("meta") or {}).get("versionId")
            current["status"] = "superseded"
            validate_resource(current)
            try:
                await fhir.update(current, if_match=f'W/"{version}"' if version else None)
            except PreconditionFailedError:
                continue  # changed between our read and write: read again once
            return "superseded"
    except FhirError as error:
        log.warning("could not mark the replaced document superseded", status=error.status)
        return "refused"
    return "refused"


@dataclass(frozen=True)
class RegenerationChoice:
    """What may change in a new version; None keeps the old document's value."""

    previous_job_id: str
    style: str | None
    language: str | None
    depiction: Depiction


async def start_regeneration(ctx: WorkflowContext, fhir: FhirClient, choice: RegenerationChoice) -> str:
    """A new job for the same condition whose draft remembers the document it will replace; returns its id.

    The previous document is read and the transaction closed before the EHR is asked for the Condition,
    so no database writer lock is held across the EHR call.
    """
    db, keyring = ctx.db, ctx.services.keyring
    previous = await load_replaceable(
        db, keyring=keyring, job_id=choice.previous_job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await db.commit()
    again = IllustrationChoice(
        condition_id=previous.content.condition_id or "",
        style=choice.style or previous.content.style or "",
        language=choice.language or previous.content.language,
        depiction=choice.depiction,
        # A topic the clinician chose for the old version stays chosen.
        topic_override=previous.content.topic_id if previous.content.topic_chosen_by_clinician else None,
    )
    try:
        prepared = await prepare_illustration(ctx, fhir, again)
    except TopicAlreadyMatchedError:
        # The condition was coded since: its own topic now wins (refused before anything was written).
        prepared = await prepare_illustration(ctx, fhir, dataclasses.replace(again, topic_override=None))
    # In this request's own transaction (not the group commit): the job and the draft's `replaces` commit
    # together or not at all.
    job_id = await prepared.write(ctx)
    draft = await load_document(db, keyring=keyring, job_id=job_id)
    if draft is None:  # start_illustration always creates one; a missing draft is a bug
        raise RuntimeError("the new draft was not created")
    replaces = Replaces(fhir_document_id=previous.fhir_document_id or "", job_id=choice.previous_job_id)
    update: dict[str, object] = {"replaces": replaces}
    if previous.content.language == draft.content.language:
        # The new version starts from the text the clinician approved last time (edits included), not
        # from a fresh template; the generated text stays remembered, so approval can tell it was edited.
        update |= {"caption": previous.content.caption, "alt_text": previous.content.alt_text}
    content = draft.content.model_copy(update=update)
    await save_content(db, keyring=keyring, document=draft, content=content)
    return job_id


async def load_replaceable(
    db: AsyncSession, *, keyring: Keyring, job_id: str, patient_id: str | None, ehr_name: str
) -> DocumentView:
    """A document this EHR and patient have in the chart (written or withdrawn), else NotReplaceableError."""
    document = await load_document(db, keyring=keyring, job_id=job_id)
    if (
        document is None
        or document.ehr_name != ehr_name
        or patient_id is None
        or document.content.patient_id != patient_id
        or document.status not in ("written", "retracted")
        or not document.fhir_document_id
    ):
        raise NotReplaceableError("There is no saved picture with that id for this patient.")
    return document

"""Withdraw a picture from the chart with a coded reason (entered-in-error), and restore what it replaced."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import structlog

from fhir_adapters import (
    FatalFhirError,
    FhirClient,
    FhirError,
    PreconditionFailedError,
    mark_entered_in_error,
    validate_resource,
)
from service.audit import AuditAction, AuditEntity, AuditOutcome, EntityRole
from service.documents import DocumentView, load_document, transition
from service.workflows.approve import draft_entity, practitioner_id_from
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotAllowedError
from service.workflows.regenerate import load_replaceable

log = structlog.get_logger("carecanvas.retract")

# R4 DocumentReference has no status reason; the coded reason travels in an extension of our own.
WITHDRAWAL_REASON_EXTENSION = "urn:carecanvas:withdrawal-reason"
WITHDRAWAL_REASON_SYSTEM = "urn:carecanvas:withdrawal-reason-code"


class WithdrawReason(StrEnum):
    WRONG_PATIENT = "wrong-patient"
    WRONG_CONDITION = "wrong-condition"
    CONTENT_ERROR = "content-error"
    PATIENT_REQUEST = "patient-request"
    DUPLICATE = "duplicate"

    @property
    def label(self) -> str:
        return WITHDRAW_REASON_LABELS[self]


WITHDRAW_REASON_LABELS: dict[WithdrawReason, str] = {
    WithdrawReason.WRONG_PATIENT: "Saved to the wrong patient",
    WithdrawReason.WRONG_CONDITION: "About the wrong condition",
    WithdrawReason.CONTENT_ERROR: "The picture or the words are wrong",
    WithdrawReason.PATIENT_REQUEST: "The patient asked for it to be removed",
    WithdrawReason.DUPLICATE: "Saved twice",
}

# What happened to the version this one replaced, when the clinician asked to make it current again:
#   restored       it is current again
#   not-replaced   it was not marked replaced (withdrawn, or never superseded), so it was left as it is
#   refused        the EHR refused the update (or this launch/EHR cannot update documents)
RestoreOutcome = Literal["restored", "not-replaced", "refused"]


@dataclass(frozen=True)
class Withdrawal:
    job_id: str
    reason: WithdrawReason | None  # None: the JSON API's withdrawal, which takes no reason yet
    restore_previous: bool = False


@dataclass(frozen=True)
class RetractResult:
    fhir_document_id: str
    already_retracted: bool
    reason: WithdrawReason | None = None
    reason_recorded: bool = False
    previous_document_id: str | None = None
    restored: RestoreOutcome | None = None


@dataclass(frozen=True)
class WithdrawalPreview:
    """What the confirmation page names: the document, and the version it replaced (if any)."""

    job_id: str
    fhir_document_id: str
    title: str
    previous_document_id: str | None


async def withdrawal_preview(ctx: WorkflowContext, job_id: str) -> WithdrawalPreview:
    """The document about to be withdrawn (this patient's, in the chart); the caller commits."""
    document = await load_replaceable(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    content = document.content
    await ctx.audit(
        AuditAction.VIEW,
        entities=[draft_entity(document), AuditEntity(f"DocumentReference/{document.fhir_document_id}")],
        detail={"job_id": job_id, "page": "withdraw"},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} opened the withdrawal of "
        f"DocumentReference/{document.fhir_document_id}",
    )
    return WithdrawalPreview(
        job_id=job_id,
        fhir_document_id=document.fhir_document_id or "",
        title=content.title,
        previous_document_id=content.replaces.fhir_document_id if content.replaces else None,
    )


def _with_reason(resource: dict[str, Any], reason: WithdrawReason) -> dict[str, Any]:
    extensions = [
        item
        for item in resource.get("extension") or []
        if not (isinstance(item, dict) and item.get("url") == WITHDRAWAL_REASON_EXTENSION)
    ]
    extensions.append(
        {
            "url": WITHDRAWAL_REASON_EXTENSION,
            "valueCoding": {
                "system": WITHDRAWAL_REASON_SYSTEM,
                "code": reason.value,
                "display": reason.label,
            },
        }
    )
    return {**resource, "status": "entered-in-error", "extension": extensions}


async def _mark_withdrawn(
    fhir: FhirClient, document_id: str, reason: WithdrawReason | None
) -> tuple[bool, bool]:
    """(changed, reason_recorded): entered-in-error with the reason, or without it where refused."""
    if reason is None:
        return await mark_entered_in_error(fhir, document_id) is not None, False
    for _ in range(2):
        current = await fhir.read("DocumentReference", document_id)
        if current.get("status") == "entered-in-error":
            return False, False
        version = (current.get("meta") or {}).get("versionId")
        updated = _with_reason(current, reason)
        validate_resource(updated)
        try:
            await fhir.update(updated, if_match=f'W/"{version}"' if version else None)
        except PreconditionFailedError:
            continue  # changed between our read and write: read again once
        except FatalFhirError as error:
            if error.status not in (400, 422):
                raise
            # The server does not take our extension: withdraw without it (the audit record keeps the reason).
            log.info("the EHR refused the withdrawal reason; withdrawing without it", status=error.status)
            return await mark_entered_in_error(fhir, document_id) is not None, False
        return True, True
    raise PreconditionFailedError("the document kept changing while it was being withdrawn", status=412)


async def _restore(fhir: FhirClient, document_id: str) -> RestoreOutcome:
    """Make a superseded document current again (If-Match); never raises FhirError."""
    try:
        for _ in range(2):
            current = await fhir.read("DocumentReference", document_id)
            if current.get("status") != "superseded":
                return "not-replaced"
            version = (current.get("meta") or {}).get("versionId")
            current["status"] = "current"
            validate_resource(current)
            try:
                await fhir.update(current, if_match=f'W/"{version}"' if version else None)
            except PreconditionFailedError:
                continue
            return "restored"
    except FhirError as error:
        log.warning("could not make the replaced document current again", status=error.status)
    return "refused"


async def retract_document(
    ctx: WorkflowContext, fhir: FhirClient, withdrawal: Withdrawal | str
) -> RetractResult:
    """Mark the written document entered-in-error (with its reason) on the EHR, then the local row retracted.

    Safe to repeat: a document already entered-in-error is left alone. The local row is read and its
    transaction closed before the EHR is called (no writer lock held across the EHR call). With
    `restore_previous`, the version this one replaced is made current again, so the patient is not left
    with nothing current.
    """
    if isinstance(withdrawal, str):
        withdrawal = Withdrawal(job_id=withdrawal, reason=None)
    if practitioner_id_from(ctx.actor) is None:
        raise NotAllowedError("Withdrawing needs a practitioner's launch.")
    reason = withdrawal.reason.value if withdrawal.reason else None
    db, keyring, job_id = ctx.db, ctx.services.keyring, withdrawal.job_id
    document = await load_replaceable(
        db, keyring=keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await db.commit()
    fhir_document_id = document.fhir_document_id or ""
    resource = f"DocumentReference/{fhir_document_id}"
    try:
        changed, reason_recorded = await _mark_withdrawn(fhir, fhir_document_id, withdrawal.reason)
    except FhirError as error:
        await ctx.audit(
            AuditAction.RETRACT,
            AuditOutcome.FAILURE,
            entities=[AuditEntity(resource)],
            detail={"job_id": job_id, "status": error.status, "reason": reason},
            description=f"{ctx.actor_reference} could not withdraw {resource} (EHR answered {error.status})",
        )
        await db.commit()
        raise
    fresh = await load_document(db, keyring=keyring, job_id=job_id)
    if fresh is not None and fresh.status != "retracted":
        await transition(db, document=fresh, to_status="retracted", from_statuses=("written",))
    await ctx.audit(
        AuditAction.RETRACT,
        entities=[AuditEntity(resource)],
        detail={
            "job_id": job_id,
            "already": not changed,
            "reason": reason,
            "reason_in_chart": reason_recorded,
        },
        description=f"{ctx.actor_reference} withdrew {resource} from the chart (entered in error"
        + (f", reason {reason})" if reason else ")")
        + (", which already was" if not changed else ""),
    )
    await db.commit()
    previous = document.content.replaces.fhir_document_id if document.content.replaces else None
    restored = None
    if withdrawal.restore_previous and previous:
        restored = await _restore_previous(ctx, fhir, document, previous)
    return RetractResult(
        fhir_document_id=fhir_document_id,
        already_retracted=not changed,
        reason=withdrawal.reason,
        reason_recorded=reason_recorded,
        previous_document_id=previous,
        restored=restored,
    )


async def _restore_previous(
    ctx: WorkflowContext, fhir: FhirClient, document: DocumentView, previous: str
) -> RestoreOutcome:
    profile = await ctx.profile(fhir)
    if not (ctx.scopes.allows("DocumentReference", "update") and profile.updates_documents):
        outcome: RestoreOutcome = "refused"
    else:
        outcome = await _restore(fhir, previous)
    previous_reference = f"DocumentReference/{previous}"
    await ctx.audit(
        AuditAction.RESTORE,
        AuditOutcome.SUCCESS if outcome != "refused" else AuditOutcome.FAILURE,
        entities=[
            AuditEntity(previous_reference),
            AuditEntity(f"DocumentReference/{document.fhir_document_id}", EntityRole.SOURCE),
        ],
        patient=document.content.patient_id,
        detail={"job_id": document.job_id, "outcome": outcome},
        description=f"{ctx.actor_reference} asked to make {previous_reference} current again ({outcome})",
    )
    await ctx.db.commit()
    return outcome

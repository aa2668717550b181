"""Withdraw a picture from the chart: its DocumentReference becomes entered-in-error, audited."""

from __future__ import annotations

from dataclasses import dataclass

from fhir_adapters import FhirClient, FhirError, mark_entered_in_error
from service.audit import AuditAction, AuditEntity, AuditOutcome
from service.documents import load_document, transition
from service.workflows.approve import practitioner_id_from
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotAllowedError
from service.workflows.regenerate import load_replaceable


@dataclass(frozen=True)
class RetractResult:
    fhir_document_id: str
    already_retracted: bool


async def retract_document(ctx: WorkflowContext, fhir: FhirClient, job_id: str) -> RetractResult:
    """Mark the written document entered-in-error on the EHR, then the local row retracted.

    Safe to repeat: a document already entered-in-error is left alone. The local row is read and its
    transaction closed before the EHR is called (no writer lock held across the EHR call).
    """
    if practitioner_id_from(ctx.actor) is None:
        raise NotAllowedError("Withdrawing needs a practitioner's launch.")
    db, keyring = ctx.db, ctx.services.keyring
    document = await load_replaceable(
        db, keyring=keyring, job_id=job_id, patient_id=ctx.patient_id, ehr_name=ctx.ehr.name
    )
    await db.commit()
    fhir_document_id = document.fhir_document_id or ""
    resource = f"DocumentReference/{fhir_document_id}"
    try:
        changed = await mark_entered_in_error(fhir, fhir_document_id)
    except FhirError as error:
        await ctx.audit(
            AuditAction.RETRACT,
            AuditOutcome.FAILURE,
            entities=[AuditEntity(resource)],
            detail={"job_id": job_id, "status": error.status},
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
        detail={"job_id": job_id, "already": changed is None},
        description=f"{ctx.actor_reference} withdrew {resource} from the chart (entered in error)"
        + (", which already was" if changed is None else ""),
    )
    await db.commit()
    return RetractResult(fhir_document_id=fhir_document_id, already_retracted=changed is None)

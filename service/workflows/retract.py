"""Withdraw a picture from the chart: its DocumentReference becomes entered-in-error, audited."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, FhirError, mark_entered_in_error
from service.audit import AuditAction, AuditLog
from service.crypto import Keyring
from service.documents import load_document, transition
from service.workflows.regenerate import load_replaceable


@dataclass(frozen=True)
class RetractResult:
    fhir_document_id: str
    already_retracted: bool


async def retract_document(
    *,
    db: AsyncSession,
    fhir: FhirClient,
    audit: AuditLog,
    keyring: Keyring,
    job_id: str,
    patient_id: str,
    actor: str | None,
    ehr_name: str,
    request_id: str | None,
) -> RetractResult:
    """Mark the written document entered-in-error on the EHR, then the local row retracted.

    Safe to repeat: a document already entered-in-error is left alone. The local row is read and its
    transaction closed before the EHR is called (no writer lock held across the EHR call).
    """
    document = await load_replaceable(
        db, keyring=keyring, job_id=job_id, patient_id=patient_id, ehr_name=ehr_name
    )
    await db.commit()
    fhir_document_id = document.fhir_document_id or ""
    try:
        changed = await mark_entered_in_error(fhir, fhir_document_id)
    except FhirError as error:
        await audit.append(
            db,
            action=AuditAction.RETRACT,
            outcome="failure",
            actor=actor,
            patient=patient_id,
            ehr=ehr_name,
            resource=f"DocumentReference/{fhir_document_id}",
            request_id=request_id,
            detail={"job_id": job_id, "status": error.status},
        )
        await db.commit()
        raise
    fresh = await load_document(db, keyring=keyring, job_id=job_id)
    if fresh is not None and fresh.status != "retracted":
        await transition(db, document=fresh, to_status="retracted", from_statuses=("written",))
    await audit.append(
        db,
        action=AuditAction.RETRACT,
        outcome="success",
        actor=actor,
        patient=patient_id,
        ehr=ehr_name,
        resource=f"DocumentReference/{fhir_document_id}",
        request_id=request_id,
        detail={"job_id": job_id, "already": changed is None},
    )
    await db.commit()
    return RetractResult(fhir_document_id=fhir_document_id, already_retracted=changed is None)

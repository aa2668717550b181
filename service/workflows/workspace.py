"""What the clinician's workspace shows: banner, visit, active conditions and earlier documents, audited."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from fhir_adapters import (
    ConditionSummary,
    EncounterSummary,
    FhirClient,
    FhirError,
    ForbiddenError,
    NotFoundError,
    PatientBanner,
    person_name,
    summarize_condition,
    summarize_encounter,
    summarize_patient,
)
from service.audit import AuditAction, AuditOutcome, canonical_actor
from service.documents import HistoryEntry, documents_by_identifier, history_from_search
from service.generation.languages import LanguagePreference, preferred_language
from service.workflows.approve import IDENTIFIER_SYSTEM
from service.workflows.context import WorkflowContext

CONDITIONS_PAGE_SIZE = "100"


@dataclass
class Workspace:
    banner: PatientBanner | None
    encounter: EncounterSummary | None
    conditions: list[ConditionSummary]
    history: list[HistoryEntry] = field(default_factory=list)
    history_unavailable: bool = False
    # From Patient.communication, when the Patient was read (the banner); None otherwise.
    preferred_language: LanguagePreference | None = None
    # The signed-in practitioner's name, when their fhirUser resource was read (with the banner).
    user_display: str | None = None


@dataclass
class _Reads:
    patient: dict[str, Any] | None = None
    encounter: dict[str, Any] | None = None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] | None = None
    history_error: FhirError | None = None
    user: dict[str, Any] | None = None


async def active_conditions(fhir: FhirClient, patient_id: str) -> list[dict[str, Any]]:
    return await fhir.search(
        "Condition", {"patient": patient_id, "clinical-status": "active", "_count": CONDITIONS_PAGE_SIZE}
    )


async def _read_encounter(fhir: FhirClient, encounter_id: str | None) -> dict[str, Any] | None:
    if not encounter_id:
        return None
    # The visit from the launch, shown beside the banner; a missing one costs nothing else.
    with contextlib.suppress(NotFoundError, ForbiddenError):
        return await fhir.read("Encounter", encounter_id)
    return None


async def _read_history(fhir: FhirClient, patient_id: str, reads: _Reads) -> None:
    # A failed history search must not cost the clinician the workspace: say so instead.
    try:
        reads.history = await fhir.search(
            "DocumentReference",
            {"patient": patient_id, "identifier": f"{IDENTIFIER_SYSTEM}|", "_count": "50"},
        )
    except FhirError as error:
        reads.history_error = error


async def _read_user(fhir: FhirClient, actor: str | None) -> dict[str, Any] | None:
    """The practitioner's own resource, for their name; a user the EHR will not show costs nothing else."""
    reference = canonical_actor(actor) or ""
    kind, _, user_id = reference.partition("/")
    if kind != "Practitioner" or not user_id:
        return None
    with contextlib.suppress(NotFoundError, ForbiddenError):
        return await fhir.read("Practitioner", user_id)
    return None


class Part(StrEnum):
    """One of the workspace's EHR reads; a caller asks only for the parts it shows."""

    PATIENT = "patient"
    ENCOUNTER = "encounter"
    CONDITIONS = "conditions"
    HISTORY = "history"
    USER = "user"  # the signed-in practitioner (fhirUser), for their name


async def _read_all(
    ctx: WorkflowContext, fhir: FhirClient, patient_id: str, parts: frozenset[Part]
) -> _Reads:
    """The EHR reads run side by side: the page waits for the slowest, not for their sum."""
    reads = _Reads()

    async def patient() -> None:
        reads.patient = await fhir.read("Patient", patient_id)

    async def conditions() -> None:
        reads.conditions = await active_conditions(fhir, patient_id)

    async def encounter() -> None:
        reads.encounter = await _read_encounter(fhir, ctx.encounter_id)

    async def history() -> None:
        if ctx.scopes.allows("DocumentReference", "search"):
            await _read_history(fhir, patient_id, reads)

    async def user() -> None:
        reads.user = await _read_user(fhir, ctx.actor)

    steps = {
        Part.PATIENT: patient,
        Part.CONDITIONS: conditions,
        Part.ENCOUNTER: encounter,
        Part.HISTORY: history,
        Part.USER: user,
    }
    try:
        async with asyncio.TaskGroup() as group:
            for part in sorted(parts):
                group.create_task(steps[part]())
    except ExceptionGroup as failed:
        # The first failure stands for the page (an ended session, the EHR's error): callers and the
        # error pages handle plain exceptions, not groups.
        raise failed.exceptions[0] from None
    return reads


async def load_workspace(ctx: WorkflowContext, fhir: FhirClient, *, banner: bool) -> Workspace:
    """Reads the EHR (no database transaction open), then audits each read before anything is shown."""
    parts = {Part.ENCOUNTER, Part.CONDITIONS, Part.HISTORY} | ({Part.PATIENT, Part.USER} if banner else set())
    return await _load(ctx, fhir, frozenset(parts))


async def load_conditions(ctx: WorkflowContext, fhir: FhirClient) -> list[ConditionSummary]:
    """Only the active conditions (one search, one audit record): what the API's condition list needs."""
    return (await _load(ctx, fhir, frozenset({Part.CONDITIONS}))).conditions


async def load_history(ctx: WorkflowContext, fhir: FhirClient) -> Workspace:
    """Only the documents CareCanvas wrote (one search, one audit record); conditions stay empty."""
    return await _load(ctx, fhir, frozenset({Part.HISTORY}))


async def _load(ctx: WorkflowContext, fhir: FhirClient, parts: frozenset[Part]) -> Workspace:
    patient_id = ctx.patient_id or ""
    try:
        reads = await _read_all(ctx, fhir, patient_id, parts)
    except FhirError as error:
        await ctx.db.rollback()
        await ctx.audit(
            AuditAction.FHIR_SEARCH,
            AuditOutcome.FAILURE,
            resource="Condition" if Part.CONDITIONS in parts else "DocumentReference",
            detail={"status": error.status},
        )
        await ctx.db.commit()
        raise
    await _audit_reads(ctx, reads, parts)
    return Workspace(
        banner=summarize_patient(reads.patient) if reads.patient is not None else None,
        encounter=summarize_encounter(reads.encounter) if reads.encounter is not None else None,
        conditions=[c for c in (summarize_condition(r) for r in reads.conditions) if c.is_active],
        history=await _history(ctx, reads),
        history_unavailable=reads.history_error is not None,
        preferred_language=preferred_language(reads.patient) if reads.patient is not None else None,
        user_display=person_name(reads.user) if reads.user is not None else None,
    )


async def _audit_reads(ctx: WorkflowContext, reads: _Reads, parts: frozenset[Part]) -> None:
    if reads.patient is not None:
        await ctx.audit(AuditAction.FHIR_READ, resource=f"Patient/{ctx.patient_id}")
    if reads.encounter is not None:
        await ctx.audit(AuditAction.FHIR_READ, resource=f"Encounter/{ctx.encounter_id}")
    if reads.user is not None:
        await ctx.audit(
            AuditAction.FHIR_READ,
            resource=canonical_actor(ctx.actor),
            about_patient=False,
            description=f"{ctx.actor_reference} read their own Practitioner record (for their name)",
        )
    if Part.CONDITIONS in parts:
        await ctx.audit(
            AuditAction.READ_CONDITIONS,
            resource="Condition",
            detail={"count": len(reads.conditions)},
            description=f"{ctx.actor_reference} read the patient's conditions ({len(reads.conditions)})",
        )
    if reads.history is not None:
        await ctx.audit(
            AuditAction.FHIR_SEARCH, resource="DocumentReference", detail={"count": len(reads.history)}
        )
    elif reads.history_error is not None:
        await ctx.audit(
            AuditAction.FHIR_SEARCH,
            AuditOutcome.FAILURE,
            resource="DocumentReference",
            detail={"status": reads.history_error.status},
        )


async def _history(ctx: WorkflowContext, reads: _Reads) -> list[HistoryEntry]:
    if reads.history is None:
        return []
    identifiers = [
        str(item.get("value"))
        for resource in reads.history
        for item in resource.get("identifier") or []
        if isinstance(item, dict) and item.get("system") == IDENTIFIER_SYSTEM
    ]
    local = await documents_by_identifier(
        ctx.db, keyring=ctx.services.keyring, ehr_name=ctx.ehr.name, identifiers=identifiers
    )
    return history_from_search(reads.history, identifier_system=IDENTIFIER_SYSTEM, local=local)

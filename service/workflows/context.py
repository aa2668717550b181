"""The context every workflow runs in: the app's services, the caller's transaction, who acts, for whom."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, GrantedScopes
from service.audit import AuditAction, AuditAppend, AuditEntity, AuditOutcome, canonical_actor
from service.db.group_commit import BatchWriter
from service.ehr_profile import EhrProfile
from service.services import Services
from service.settings import EhrSettings
from service.workflows.job_caps import JobOwner


@dataclass
class WorkflowContext:
    """Built by a face (pages, JSON API) per request; workflows never see FastAPI or the browser."""

    services: Services
    db: AsyncSession
    ehr: EhrSettings
    actor: str | None
    patient_id: str | None
    encounter_id: str | None
    session_id_hash: str
    request_id: str | None
    scopes: GrantedScopes
    role: str | None = None  # the launch's role (clinician, patient), named in every audit record
    actor_display: str | None = None  # the user's name as their fhirUser resource gives it
    patient_display: str | None = None  # the patient's name from the banner, for the handout

    @property
    def actor_reference(self) -> str:
        """Who acts, as audit descriptions name them (`Practitioner/prac-2`; never a name)."""
        return canonical_actor(self.actor) or "CareCanvas"

    def job_owner(self) -> JobOwner:
        """Whose jobs these are, with the caps that apply (per session, and per user at this EHR)."""
        settings = self.services.settings
        user = canonical_actor(self.actor)
        owner_key = (
            self.services.keyring.keyed_digest(f"job-owner\x00{self.ehr.name}\x00{user}") if user else None
        )
        return JobOwner(
            session_id_hash=self.session_id_hash,
            owner_key=owner_key,
            per_session=settings.max_queued_jobs_per_session,
            per_user=settings.max_queued_jobs_per_user,
        )

    async def grouped(self, item: Any, writer: BatchWriter) -> Any:
        """Hand `item` to the app's group commit, written by `writer` with the others of its transaction.

        What this request's own session holds is committed first: on SQLite it may hold the one writer
        connection the group needs.
        """
        await self.db.commit()
        return await self.services.group_commit.submit(item, writer)

    async def profile(self, fhir: FhirClient) -> EhrProfile:
        """This EHR's quirks (attachments, transactions, updates), from the app's one capabilities fetch."""
        return await self.services.profiles.profile(self.ehr, fhir)

    async def audit(
        self,
        action: AuditAction,
        outcome: AuditOutcome = AuditOutcome.SUCCESS,
        *,
        resource: str | None = None,
        detail: Mapping[str, Any] | None = None,
        patient: str | None = None,
        entities: Sequence[AuditEntity] = (),
        description: str | None = None,
        about_patient: bool = True,
    ) -> None:
        """An audit record for this actor at this EHR, in the caller's transaction (fail closed).

        `about_patient=False`: the touch is not of the patient's record (the clinician's own Practitioner).
        """
        entry = self.audit_entry(
            action,
            outcome,
            resource=resource,
            detail=detail,
            patient=patient,
            entities=entities,
            description=description,
            about_patient=about_patient,
        )
        await self.services.audit.append_entry(self.db, entry)

    def audit_entry(
        self,
        action: AuditAction,
        outcome: AuditOutcome = AuditOutcome.SUCCESS,
        *,
        resource: str | None = None,
        detail: Mapping[str, Any] | None = None,
        patient: str | None = None,
        entities: Sequence[AuditEntity] = (),
        description: str | None = None,
        about_patient: bool = True,
    ) -> AuditAppend:
        """The record `audit` would append, as a value (for `AuditLog.append_many`)."""
        return AuditAppend(
            action=action,
            outcome=outcome,
            actor=self.actor,
            patient=(patient or self.patient_id) if about_patient else None,
            ehr=self.ehr.name,
            resource=resource,
            request_id=self.request_id,
            detail=detail,
            entities=tuple(entities),
            description=description,
            actor_display=self.actor_display,
            role=self.role,
        )

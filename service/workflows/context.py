"""The context every workflow runs in: the app's services, the caller's transaction, who acts, for whom."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import GrantedScopes
from service.audit import AuditAction, AuditOutcome
from service.services import Services
from service.settings import EhrSettings


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

    async def audit(
        self,
        action: AuditAction,
        outcome: AuditOutcome = AuditOutcome.SUCCESS,
        *,
        resource: str | None = None,
        detail: Mapping[str, Any] | None = None,
        patient: str | None = None,
    ) -> None:
        """An audit record for this actor at this EHR, in the caller's transaction (fail closed)."""
        await self.services.audit.append(
            self.db,
            action=action,
            outcome=outcome,
            actor=self.actor,
            patient=patient or self.patient_id,
            ehr=self.ehr.name,
            resource=resource,
            request_id=self.request_id,
            detail=detail,
        )

"""Start an education illustration for one of the patient's conditions: a durable job plus a draft."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, NotFoundError, summarize_condition
from service.audit import AuditAction, AuditLog
from service.crypto import Keyring
from service.documents import create_draft
from service.generation.models import ModelSpec
from service.generation.prompts import Depiction, PromptLibrary, build_education_prompt
from service.jobs import JobQueue
from service.workflows.image_jobs import enqueue_image_job


class ConditionNotFoundError(LookupError):
    """The condition id is unknown to the EHR (or not visible with this launch)."""


class WrongPatientError(PermissionError):
    """The request names a resource that belongs to another patient than the launch's."""


@dataclass(frozen=True)
class IllustrationChoice:
    condition_id: str
    style: str
    language: str
    depiction: Depiction


def subject_patient_id(resource: dict[str, Any]) -> str | None:
    reference = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    return reference.removeprefix("Patient/") if reference.startswith("Patient/") else None


async def start_illustration(
    *,
    db: AsyncSession,
    fhir: FhirClient,
    queue: JobQueue,
    audit: AuditLog,
    keyring: Keyring,
    library: PromptLibrary,
    model: ModelSpec,
    choice: IllustrationChoice,
    patient_id: str,
    encounter_id: str | None,
    actor: str | None,
    ehr_name: str,
    session_id_hash: str,
    request_id: str | None,
) -> str:
    """Read the condition, build the prompt from its concept only, enqueue; returns the job id."""
    try:
        condition = await fhir.read("Condition", choice.condition_id)
    except NotFoundError as error:
        raise ConditionNotFoundError("That condition was not found in the patient's record.") from error
    if subject_patient_id(condition) != patient_id:
        raise WrongPatientError("That condition belongs to another patient than the one you launched with.")
    summary = summarize_condition(condition)
    prompt = build_education_prompt(
        library=library,
        condition_text=summary.text,
        codes=[(coding.system, coding.code) for coding in summary.codes if coding.system and coding.code],
        style=choice.style,
        language=choice.language,
        depiction=choice.depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
    )
    request = await enqueue_image_job(
        db,
        queue=queue,
        model=model,
        kind="illustration",
        prompt=prompt.positive,
        negative_prompt=prompt.negative,
        seed=secrets.randbelow(2**31),
        session_id_hash=session_id_hash,
    )
    job_id = request.job_id
    await create_draft(
        db,
        keyring=keyring,
        job_id=job_id,
        ehr_name=ehr_name,
        content={
            "title": prompt.title,
            "caption": prompt.caption,
            "alt_text": prompt.alt_text,
            "caption_grade": prompt.caption_grade,
            "language": prompt.language,
            "topic_id": prompt.topic_id,
            "style": choice.style,
            "condition_id": choice.condition_id,
            "condition_text": summary.text,
            "patient_id": patient_id,
            "encounter_id": encounter_id,
            "prompt": prompt.positive,
            "negative_prompt": prompt.negative,
            "model": model.name,
            "seed": request.seed,
        },
    )
    await audit.append(
        db,
        action=AuditAction.GENERATE,
        outcome="success",
        actor=actor,
        patient=patient_id,
        ehr=ehr_name,
        resource=f"Condition/{choice.condition_id}",
        request_id=request_id,
        detail={"job_id": job_id, "topic": prompt.topic_id, "style": choice.style},
    )
    return job_id

"""Start an education illustration for one of the patient's conditions: a durable job plus a draft."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from fhir_adapters import FhirClient, NotFoundError, summarize_condition
from service.audit import AuditAction, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DraftContent, create_draft
from service.generation.prompts import Depiction, build_education_prompt
from service.jobs import JobKind
from service.workflows.context import WorkflowContext
from service.workflows.errors import ConditionNotFoundError, WrongPatientError
from service.workflows.image_jobs import enqueue_image_job


@dataclass(frozen=True)
class IllustrationChoice:
    condition_id: str
    style: str
    language: str
    depiction: Depiction


def subject_patient_id(resource: dict[str, Any]) -> str | None:
    reference = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    return reference.removeprefix("Patient/") if reference.startswith("Patient/") else None


async def start_illustration(ctx: WorkflowContext, fhir: FhirClient, choice: IllustrationChoice) -> str:
    """Read the condition, build the prompt from its concept only, enqueue; returns the job id."""
    db, keyring, patient_id = ctx.db, ctx.services.keyring, ctx.patient_id
    model = ctx.services.models.get(ctx.services.settings.default_model)
    try:
        condition = await fhir.read("Condition", choice.condition_id)
    except NotFoundError as error:
        raise ConditionNotFoundError("That condition was not found in the patient's record.") from error
    if subject_patient_id(condition) != patient_id:
        raise WrongPatientError("That condition belongs to another patient than the one you launched with.")
    summary = summarize_condition(condition)
    prompt = build_education_prompt(
        library=ctx.services.prompts,
        condition_text=summary.text,
        codes=[(coding.system, coding.code) for coding in summary.codes if coding.system and coding.code],
        style=choice.style,
        language=choice.language,
        depiction=choice.depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
    )
    seed = secrets.randbelow(2**31)
    job_id = await enqueue_image_job(
        db,
        queue=ctx.services.queue,
        model=model,
        kind=JobKind.ILLUSTRATION,
        prompt=prompt.positive,
        negative_prompt=prompt.negative,
        seed=seed,
        session_id_hash=ctx.session_id_hash,
    )
    await create_draft(
        db,
        keyring=keyring,
        job_id=job_id,
        ehr_name=ctx.ehr.name,
        content=DraftContent.generated(
            kind=JobKind.ILLUSTRATION,
            title=prompt.title,
            caption=prompt.caption,
            alt_text=prompt.alt_text,
            caption_grade=prompt.caption_grade,
            language=prompt.language,
            topic_id=prompt.topic_id,
            style=choice.style,
            condition_id=choice.condition_id,
            condition_text=summary.text,
            patient_id=patient_id,
            encounter_id=ctx.encounter_id,
            prompt=prompt.positive,
            negative_prompt=prompt.negative,
            model=model.name,
            seed=seed,
        ),
    )
    condition_ref = f"Condition/{choice.condition_id}"
    await ctx.audit(
        AuditAction.GENERATE,
        entities=[
            AuditEntity(carecanvas_ref(CareCanvasObject.JOB, job_id)),
            AuditEntity(condition_ref, EntityRole.SOURCE),
        ],
        detail={
            "job_id": job_id,
            "kind": JobKind.ILLUSTRATION.value,
            "topic": prompt.topic_id,
            "style": choice.style,
        },
        description=f"{ctx.actor_reference} asked for an education picture about {condition_ref}",
    )
    return job_id

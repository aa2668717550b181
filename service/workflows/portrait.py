"""Therapeutic portrait from the patient's own story: read it over FHIR, enqueue N variants for review."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import FhirClient, summarize_story
from service.audit import AuditAction, AuditLog
from service.crypto import Keyring
from service.documents import create_draft
from service.generation.models import ModelSpec
from service.generation.prompts import (
    Depiction,
    PortraitStoryFields,
    PromptLibrary,
    build_portrait_prompt,
)
from service.jobs import JobQueue
from service.workflows.illustrate import subject_patient_id
from service.workflows.image_jobs import enqueue_image_job

MAX_VARIANTS = 8
_STORY_STATUSES = frozenset({"completed", "amended"})


class NoStoryError(LookupError):
    """The patient has no completed portrait story (QuestionnaireResponse) in the record."""


@dataclass(frozen=True)
class PatientStory:
    """The newest completed story of the launch's patient, with the id of the resource it came from."""

    resource_id: str
    story: PortraitStoryFields


@dataclass(frozen=True)
class PortraitChoice:
    style: str
    language: str
    depiction: Depiction
    variants: int

    def __post_init__(self) -> None:
        if not 1 <= self.variants <= MAX_VARIANTS:
            raise ValueError(f"variants must be between 1 and {MAX_VARIANTS}, got {self.variants}")


async def read_patient_story(*, fhir: FhirClient, patient_id: str) -> PatientStory:
    """The newest completed QuestionnaireResponse of this patient that carries a portrait story."""
    responses = await fhir.search("QuestionnaireResponse", {"patient": patient_id, "_count": "20"})
    candidates = [
        resource
        for resource in responses
        if resource.get("status") in _STORY_STATUSES and subject_patient_id(resource) == patient_id
    ]
    # ISO 8601 instants sort as text; responses without a date come last.
    candidates.sort(key=lambda resource: str(resource.get("authored") or ""), reverse=True)
    for resource in candidates:
        story = summarize_story(resource)
        if story.story or story.places or story.symbols or story.colours:
            return PatientStory(resource_id=str(resource.get("id", "")), story=story)
    raise NoStoryError("This patient has no completed portrait story in the record yet.")


async def start_portrait_variants(
    *,
    db: AsyncSession,
    queue: JobQueue,
    audit: AuditLog,
    keyring: Keyring,
    library: PromptLibrary,
    model: ModelSpec,
    story: PatientStory,
    choice: PortraitChoice,
    patient_id: str,
    encounter_id: str | None,
    actor: str | None,
    ehr_name: str,
    session_id_hash: str,
    request_id: str | None,
) -> list[str]:
    """Build one prompt from the story, enqueue `choice.variants` seeds in one bucket; returns the job ids.

    The caller commits: jobs, drafts and the audit record land in one transaction or not at all.
    """
    prompt = build_portrait_prompt(
        library=library,
        story=story.story,
        style=choice.style,
        depiction=choice.depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
        language=choice.language,
    )
    first_seed = secrets.randbelow(2**31)
    job_ids: list[str] = []
    for index in range(choice.variants):
        request = await enqueue_image_job(
            db,
            queue=queue,
            model=model,
            kind="portrait",
            prompt=prompt.positive,
            negative_prompt=prompt.negative,
            seed=first_seed + index,  # distinct seeds, one bucket: the worker runs the variants as one batch
            session_id_hash=session_id_hash,
        )
        job_id = request.job_id
        await create_draft(
            db,
            keyring=keyring,
            job_id=job_id,
            ehr_name=ehr_name,
            content={
                "kind": "portrait",
                "title": prompt.title,
                "caption": prompt.alt_text,
                "alt_text": prompt.alt_text,
                "language": prompt.language,
                "style": prompt.style,
                "symbolic": prompt.symbolic,
                "story_id": story.resource_id,
                "variant": index + 1,
                "variants": choice.variants,
                # Portraits have no condition; write-back must cite the story as the source instead.
                "condition_id": None,
                "condition_text": "portrait from the patient's story",
                "patient_id": patient_id,
                "encounter_id": encounter_id,
                "prompt": prompt.positive,
                "negative_prompt": prompt.negative,
                "model": model.name,
                "seed": request.seed,
            },
        )
        job_ids.append(job_id)
    await audit.append(
        db,
        action=AuditAction.GENERATE,
        outcome="success",
        actor=actor,
        patient=patient_id,
        ehr=ehr_name,
        resource=f"QuestionnaireResponse/{story.resource_id}",
        request_id=request_id,
        detail={
            "kind": "portrait",
            "job_ids": job_ids,
            "style": prompt.style,
            "symbolic": prompt.symbolic,
            "variants": choice.variants,
        },
    )
    return job_ids

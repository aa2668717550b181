"""Therapeutic portrait from the patient's own story: read it over FHIR, enqueue N variants for review."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fhir_adapters import FhirClient, FhirError, summarize_story
from service.audit import AuditAction, AuditEntity, AuditOutcome, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DraftContent, create_draft
from service.generation.models import ModelSpec
from service.generation.prompts import (
    Depiction,
    PortraitPrompt,
    PortraitStoryFields,
    build_portrait_prompt,
)
from service.jobs import JobKind
from service.workflows.context import WorkflowContext
from service.workflows.errors import NoStoryError
from service.workflows.illustrate import subject_patient_id
from service.workflows.image_jobs import enqueue_image_job

MAX_VARIANTS = 8
_STORY_STATUSES = frozenset({"completed", "amended"})


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


async def read_story_audited(ctx: WorkflowContext, fhir: FhirClient) -> PatientStory | None:
    """The patient's story (None when there is none), read over FHIR first and then audited."""
    try:
        story: PatientStory | None = await read_patient_story(fhir=fhir, patient_id=ctx.patient_id or "")
    except NoStoryError:
        story = None
    except FhirError as error:
        await ctx.db.rollback()
        await ctx.audit(
            AuditAction.FHIR_SEARCH,
            AuditOutcome.FAILURE,
            resource="QuestionnaireResponse",
            detail={"status": error.status},
        )
        await ctx.db.commit()
        raise
    await ctx.audit(
        AuditAction.FHIR_SEARCH, resource="QuestionnaireResponse", detail={"found": story is not None}
    )
    return story


async def start_portraits_from_story(
    ctx: WorkflowContext, fhir: FhirClient, choice: PortraitChoice
) -> list[str]:
    """Read the story again from the EHR (no form ever carries the patient's words), then queue variants."""
    story = await read_story_audited(ctx, fhir)
    if story is None:
        raise NoStoryError("This patient has no completed portrait story yet.")
    return await start_portrait_variants(ctx, story, choice)


async def start_portrait_variants(
    ctx: WorkflowContext, story: PatientStory, choice: PortraitChoice
) -> list[str]:
    """Build one prompt from the story, enqueue `choice.variants` seeds in one bucket; returns the job ids.

    The caller commits: jobs, drafts and the audit record land in one transaction or not at all.
    """
    prompt = build_portrait_prompt(
        library=ctx.services.prompts,
        story=story.story,
        style=choice.style,
        depiction=choice.depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
        language=choice.language,
    )
    model = ctx.services.models.get(ctx.services.settings.default_model)
    first_seed = secrets.randbelow(2**31)
    # Distinct seeds, one bucket: the worker runs the variants as one batch.
    job_ids = [
        await _enqueue_variant(ctx, story, choice, prompt, model, index=index, seed=first_seed + index)
        for index in range(choice.variants)
    ]
    source = f"QuestionnaireResponse/{story.resource_id}"
    await ctx.audit(
        AuditAction.GENERATE,
        entities=[
            *(AuditEntity(carecanvas_ref(CareCanvasObject.JOB, job_id)) for job_id in job_ids),
            AuditEntity(source, EntityRole.SOURCE),
        ],
        description=f"{ctx.actor_reference} asked for {choice.variants} portrait variant(s) from {source}",
        detail={
            "kind": "portrait",
            "job_ids": job_ids,
            "style": prompt.style,
            "symbolic": prompt.symbolic,
            "variants": choice.variants,
        },
    )
    return job_ids


async def _enqueue_variant(
    ctx: WorkflowContext,
    story: PatientStory,
    choice: PortraitChoice,
    prompt: PortraitPrompt,
    model: ModelSpec,
    *,
    index: int,
    seed: int,
) -> str:
    job_id = await enqueue_image_job(
        ctx.db,
        queue=ctx.services.queue,
        model=model,
        kind=JobKind.PORTRAIT,
        prompt=prompt.positive,
        negative_prompt=prompt.negative,
        seed=seed,
        session_id_hash=ctx.session_id_hash,
    )
    content = _variant_content(ctx, story, choice, prompt, model, index=index, seed=seed)
    await create_draft(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, ehr_name=ctx.ehr.name, content=content
    )
    return job_id


def _variant_content(
    ctx: WorkflowContext,
    story: PatientStory,
    choice: PortraitChoice,
    prompt: PortraitPrompt,
    model: ModelSpec,
    *,
    index: int,
    seed: int,
) -> DraftContent:
    return DraftContent.generated(
        kind=JobKind.PORTRAIT,
        title=prompt.title,
        caption=prompt.alt_text,
        alt_text=prompt.alt_text,
        language=prompt.language,
        style=prompt.style,
        symbolic=prompt.symbolic,
        story_id=story.resource_id,
        variant=index + 1,
        variants=choice.variants,
        # Portraits have no condition; write-back must cite the story as the source instead.
        condition_id=None,
        condition_text="portrait from the patient's story",
        patient_id=ctx.patient_id,
        encounter_id=ctx.encounter_id,
        prompt=prompt.positive,
        negative_prompt=prompt.negative,
        model=model.name,
        seed=seed,
    )

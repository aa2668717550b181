"""Start an education illustration for one of the patient's conditions: a durable job plus a draft."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from fhir_adapters import ConditionSummary, FhirClient, NotFoundError, summarize_condition
from service.audit import AuditAction, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DraftContent, create_draft
from service.generation.models import ModelSpec
from service.generation.prompts import Depiction, EducationPrompt, build_education_prompt
from service.jobs import JobKind
from service.workflows.context import WorkflowContext
from service.workflows.errors import ConditionNotFoundError, TopicAlreadyMatchedError, WrongPatientError
from service.workflows.image_jobs import enqueue_image_job


@dataclass(frozen=True)
class IllustrationChoice:
    condition_id: str
    style: str
    language: str
    depiction: Depiction
    # A topic the clinician chose (checked to be a real topic's id) for a condition on the generic fallback.
    topic_override: str | None = None


def subject_patient_id(resource: dict[str, Any]) -> str | None:
    reference = (resource.get("subject") or resource.get("patient") or {}).get("reference", "")
    return reference.removeprefix("Patient/") if reference.startswith("Patient/") else None


@dataclass(frozen=True)
class PreparedIllustration:
    """What a new illustration job needs, read and built before any database write."""

    choice: IllustrationChoice
    summary: ConditionSummary
    prompt: EducationPrompt
    model: ModelSpec
    seed: int

    async def write(self, ctx: WorkflowContext) -> str:
        """The job, its draft and the audit record, in `ctx.db`'s transaction; returns the job id."""
        job_id = await enqueue_image_job(
            ctx.db,
            queue=ctx.services.queue,
            model=self.model,
            kind=JobKind.ILLUSTRATION,
            prompt=self.prompt.positive,
            negative_prompt=self.prompt.negative,
            seed=self.seed,
            owner=ctx.job_owner(),
        )
        content = _draft_content(
            ctx, self.choice, self.summary, self.prompt, model_name=self.model.name, seed=self.seed
        )
        await create_draft(
            ctx.db, keyring=ctx.services.keyring, job_id=job_id, ehr_name=ctx.ehr.name, content=content
        )
        await _audit_request(ctx, job_id, content)
        return job_id


async def start_illustration(ctx: WorkflowContext, fhir: FhirClient, choice: IllustrationChoice) -> str:
    """Read the condition, build the prompt from its concept only, enqueue; returns the committed job's id.

    The writes go through the app's group commit: a burst of clinicians' requests shares transactions
    instead of queueing one by one for the writer (docs/decisions/0005).
    """
    prepared = await prepare_illustration(ctx, fhir, choice)
    return await ctx.write_grouped(prepared.write)


async def prepare_illustration(
    ctx: WorkflowContext, fhir: FhirClient, choice: IllustrationChoice
) -> PreparedIllustration:
    """The EHR read and the prompt, nothing written (ConditionNotFoundError, TopicAlreadyMatchedError...)."""
    summary = await _patients_condition(ctx, fhir, choice.condition_id)
    codes = [(coding.system, coding.code) for coding in summary.codes if coding.system and coding.code]
    if choice.topic_override is not None:
        matched = ctx.services.prompts.match_topic(codes, summary.text, with_closest=False)
        if not matched.is_fallback:
            raise TopicAlreadyMatchedError(
                f"This condition already has its own handout topic ({matched.topic.text['en'].title}). "
                "A topic can only be chosen for a condition that gets the general handout."
            )
    prompt = build_education_prompt(
        library=ctx.services.prompts,
        condition_text=summary.text,
        codes=codes,
        style=choice.style,
        language=choice.language,
        depiction=choice.depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
        topic_override=choice.topic_override,
    )
    return PreparedIllustration(
        choice=choice,
        summary=summary,
        prompt=prompt,
        model=ctx.services.models.get(ctx.services.settings.default_model),
        seed=secrets.randbelow(2**31),
    )


def _draft_content(
    ctx: WorkflowContext,
    choice: IllustrationChoice,
    summary: ConditionSummary,
    prompt: EducationPrompt,
    *,
    model_name: str,
    seed: int,
) -> DraftContent:
    return DraftContent.generated(
        kind=JobKind.ILLUSTRATION,
        title=prompt.title,
        caption=prompt.caption,
        alt_text=prompt.alt_text,
        caption_grade=prompt.caption_grade,
        language=prompt.language,
        topic_id=prompt.topic_id,
        topic_chosen_by_clinician=choice.topic_override is not None,
        style=choice.style,
        condition_id=choice.condition_id,
        condition_text=summary.text,
        patient_id=ctx.patient_id,
        encounter_id=ctx.encounter_id,
        prompt=prompt.positive,
        negative_prompt=prompt.negative,
        model=model_name,
        seed=seed,
    )


async def _patients_condition(ctx: WorkflowContext, fhir: FhirClient, condition_id: str) -> ConditionSummary:
    try:
        condition = await fhir.read("Condition", condition_id)
    except NotFoundError as error:
        raise ConditionNotFoundError("That condition was not found in the patient's record.") from error
    if subject_patient_id(condition) != ctx.patient_id:
        raise WrongPatientError("That condition belongs to another patient than the one you launched with.")
    return summarize_condition(condition)


async def _audit_request(ctx: WorkflowContext, job_id: str, content: DraftContent) -> None:
    """A request for OUR job, made from the Condition (which is read, never created or changed)."""
    await ctx.audit(
        AuditAction.GENERATE,
        entities=[
            AuditEntity(carecanvas_ref(CareCanvasObject.JOB, job_id)),
            AuditEntity(content.source_reference, EntityRole.SOURCE),
        ],
        detail={
            "job_id": job_id,
            "kind": JobKind.ILLUSTRATION.value,
            "topic": content.topic_id,
            # "clinician": picked on the page (or the API) for a condition on the generic fallback.
            "topic_chosen_by": "clinician" if content.topic_chosen_by_clinician else "match",
            "style": content.style,
        },
        description=f"{ctx.actor_reference} asked for an education picture about {content.source_reference}",
    )

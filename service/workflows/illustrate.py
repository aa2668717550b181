"""Start an education illustration for one of the patient's conditions: a durable job plus a draft."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from fhir_adapters import ConditionSummary, FhirClient, NotFoundError, summarize_condition
from service.audit import AuditAction, AuditAppend, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DraftContent, add_draft, create_draft
from service.generation.models import ModelSpec
from service.generation.prompts import Depiction, EducationPrompt, build_education_prompt
from service.jobs import JobKind
from service.workflows.context import WorkflowContext
from service.workflows.errors import ConditionNotFoundError, TopicAlreadyMatchedError, WrongPatientError
from service.workflows.image_jobs import enqueue_image_job, image_job_spec
from service.workflows.job_caps import TooManyJobsError, count_rooms


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
        content = self.content(ctx)
        await create_draft(
            ctx.db, keyring=ctx.services.keyring, job_id=job_id, ehr_name=ctx.ehr.name, content=content
        )
        await ctx.services.audit.append_entry(ctx.db, _request_audit(ctx, job_id, content))
        return job_id

    def content(self, ctx: WorkflowContext) -> DraftContent:
        """The draft the reviewer will see."""
        return _draft_content(
            ctx, self.choice, self.summary, self.prompt, model_name=self.model.name, seed=self.seed
        )


@dataclass(frozen=True)
class _Intake:
    """One request's prepared illustration, handed to the group commit with the context it came from."""

    ctx: WorkflowContext
    prepared: PreparedIllustration


async def start_illustration(ctx: WorkflowContext, fhir: FhirClient, choice: IllustrationChoice) -> str:
    """Read the condition, build the prompt from its concept only, enqueue; returns the committed job's id.

    The writes go through the app's group commit: the illustrations of a burst of requests are written
    together, a few statements for all of them (docs/decisions/0005).
    """
    prepared = await prepare_illustration(ctx, fhir, choice)
    job_id: str = await ctx.grouped(_Intake(ctx, prepared), write_illustrations)
    return job_id


async def write_illustrations(db: AsyncSession, intakes: Sequence[_Intake]) -> list[str | TooManyJobsError]:
    """Jobs, drafts and audit records of many requests: one cap count, one flush, one audit INSERT.

    A request over its job cap gets its TooManyJobsError and nothing of it is written; the caps count
    the jobs admitted before it in this group, as they would count committed ones.
    """
    if not intakes:
        return []
    services = intakes[0].ctx.services
    owners = [intake.ctx.job_owner() for intake in intakes]
    rooms = await count_rooms(db, owners)
    outcomes: list[str | TooManyJobsError] = []
    admitted: list[tuple[_Intake, str]] = []
    for intake, owner in zip(intakes, owners, strict=True):
        refused = rooms.admit(owner)
        if refused is not None:
            outcomes.append(refused)
            continue
        prompt, prepared = intake.prepared.prompt, intake.prepared
        spec = image_job_spec(
            prepared.model, prompt=prompt.positive, negative_prompt=prompt.negative, seed=prepared.seed
        )
        job_id = services.queue.add_job(
            db,
            kind=JobKind.ILLUSTRATION,
            bucket=spec.bucket,
            spec=spec.to_dict(),
            session_id_hash=owner.session_id_hash,
            owner_key=owner.owner_key,
        )
        admitted.append((intake, job_id))
        outcomes.append(job_id)
    await db.flush()  # the jobs first: the drafts refer to them (no ORM relationship orders the two)
    audits: list[AuditAppend] = []
    for intake, job_id in admitted:
        content = intake.prepared.content(intake.ctx)
        add_draft(db, keyring=services.keyring, job_id=job_id, ehr_name=intake.ctx.ehr.name, content=content)
        audits.append(_request_audit(intake.ctx, job_id, content))
    await db.flush()
    await services.audit.append_many(db, audits)
    return outcomes


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


def _request_audit(ctx: WorkflowContext, job_id: str, content: DraftContent) -> AuditAppend:
    """A request for OUR job, made from the Condition (which is read, never created or changed)."""
    return ctx.audit_entry(
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

"""Therapeutic portrait from the patient's own story: read it over FHIR, enqueue N variants for review."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fhir_adapters import FhirClient, FhirError, summarize_story
from service.audit import AuditAction, AuditEntity, AuditOutcome, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DraftContent, create_draft, load_document
from service.generation.models import ModelSpec
from service.generation.portrait_words import PortraitWords, portrait_words
from service.generation.prompts import (
    Depiction,
    PortraitPrompt,
    PortraitStory,
    PortraitStoryFields,
    build_portrait_prompt,
)
from service.jobs import JobKind
from service.workflows.context import WorkflowContext
from service.workflows.errors import JobNotOwnedError, NoStoryError, NotAllowedError
from service.workflows.illustrate import subject_patient_id
from service.workflows.image_jobs import enqueue_image_job
from service.workflows.jobs import owned_progress
from service.workflows.reviewer import NOTE_MAX, NoteKind, add_note_row

MAX_VARIANTS = 8
_STORY_STATUSES = frozenset({"completed", "amended"})
# A variant's seed family: seeds a fixed stride apart from it, so "more like this one" stays near it while
# never repeating a sibling's seed (siblings are consecutive seeds).
SEED_FAMILY_STRIDE = 1 << 20


class LikenessConsent(StrEnum):
    """What the story says about showing the patient: agreed, refused, or not answered (as refused)."""

    GIVEN = "given"
    REFUSED = "refused"
    MISSING = "missing"


@dataclass(frozen=True)
class PatientStory:
    """The newest completed story of the launch's patient, with the id of the resource it came from."""

    resource_id: str
    story: PortraitStoryFields
    likeness: LikenessConsent = LikenessConsent.MISSING

    @property
    def people_allowed(self) -> bool:
        """People appear in the picture only when the patient agreed."""
        return self.likeness is LikenessConsent.GIVEN


@dataclass(frozen=True)
class PortraitChoice:
    style: str
    language: str
    depiction: Depiction
    variants: int
    # None: as the story says. Anything else than the story says needs `likeness_note` (why).
    people: bool | None = None
    likeness_note: str = ""

    def __post_init__(self) -> None:
        if not 1 <= self.variants <= MAX_VARIANTS:
            raise ValueError(f"variants must be between 1 and {MAX_VARIANTS}, got {self.variants}")
        if len(self.likeness_note) > NOTE_MAX:
            raise ValueError(f"the note can be at most {NOTE_MAX} characters")


def likeness_of(questionnaire_response: Mapping[str, Any]) -> LikenessConsent:
    """The likeness-consent answer of a story (nested groups allowed): given, refused, or missing."""
    pending: list[Any] = list(questionnaire_response.get("item") or [])
    while pending:
        item = pending.pop()
        if not isinstance(item, Mapping):
            continue
        if item.get("linkId") == "likeness-consent":
            answers = [a.get("valueBoolean") for a in item.get("answer") or [] if isinstance(a, Mapping)]
            if True in answers:
                return LikenessConsent.GIVEN
            if False in answers:
                return LikenessConsent.REFUSED
        pending.extend(item.get("item") or [])
    return LikenessConsent.MISSING


def people_for(story: PatientStory, choice: PortraitChoice) -> bool:
    """Whether people are shown: as the story says, unless the clinician changed it and said why."""
    wanted = story.people_allowed if choice.people is None else choice.people
    if wanted != story.people_allowed and not choice.likeness_note.strip():
        raise NotAllowedError(
            "The patient's story says how people are shown. To change it, write a note that says why."
        )
    return wanted


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
            return PatientStory(
                resource_id=str(resource.get("id", "")), story=story, likeness=likeness_of(resource)
            )
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

    People are shown only as the story's likeness answer allows, unless the clinician changed it with a
    note (kept, encrypted, with each draft for the reviewer, and audited). The caller commits: jobs,
    drafts, notes and the audit records land in one transaction or not at all.
    """
    people = people_for(story, choice)
    # The prompt follows the effective choice: symbolic, with no people, unless people are shown.
    fields = PortraitStory(
        places=tuple(story.story.places),
        colours=tuple(story.story.colours),
        symbols=tuple(story.story.symbols),
        avoid=tuple(story.story.avoid),
        likeness_consent=people,
        story=story.story.story,
    )
    depiction = choice.depiction if people else Depiction(show_people=False)
    library = ctx.services.prompts
    prompt = build_portrait_prompt(
        library=library,
        story=fields,
        style=choice.style,
        depiction=depiction,
        tokenizer=None,  # the worker fits the prompt to its own pipeline's tokenizer before the call
        language=choice.language,
    )
    words = portrait_words(
        library=library, story=fields, style=choice.style, language=choice.language, people=people
    )
    model = ctx.services.models.get(ctx.services.settings.default_model)
    first_seed = secrets.randbelow(2**31 - MAX_VARIANTS * SEED_FAMILY_STRIDE)
    job_ids = [
        await _enqueue_variant(
            ctx,
            _variant_content(ctx, story.resource_id, prompt, words, model, seed=first_seed + index),
            index=index,
            variants=choice.variants,
        )
        for index in range(choice.variants)
    ]
    changed = people != story.people_allowed
    if changed:
        await _record_likeness_change(ctx, job_ids, story, people, choice.likeness_note)
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
            "likeness": story.likeness.value,
            "people": people,
            "likeness_changed": changed,
        },
    )
    return job_ids


async def _record_likeness_change(
    ctx: WorkflowContext, job_ids: Sequence[str], story: PatientStory, people: bool, note: str
) -> None:
    for job_id in job_ids:
        await add_note_row(
            ctx.db,
            keyring=ctx.services.keyring,
            job_id=job_id,
            kind=NoteKind.LIKENESS,
            text=" ".join(note.split()),
            author=ctx.actor,
            author_role=ctx.role,
        )
    await ctx.audit(
        AuditAction.LIKENESS_CHANGE,
        entities=[
            *(AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, job_id)) for job_id in job_ids),
            AuditEntity(f"QuestionnaireResponse/{story.resource_id}", EntityRole.SOURCE),
        ],
        # The note itself may carry the patient's words: it is kept encrypted with the drafts, not here.
        detail={"story_says": story.likeness.value, "people": people, "with_note": True},
    )


def seed_family(seed: int, count: int) -> list[int]:
    """Seeds near one variant's seed: its family, a stride apart, never a sibling's seed."""
    return [(seed + k * SEED_FAMILY_STRIDE) % 2**31 for k in range(1, count + 1)]


async def more_like_this(ctx: WorkflowContext, *, job_id: str, count: int) -> list[str]:
    """Variations of one variant: its prompt and words again, with seeds from its seed family."""
    if not 1 <= count <= MAX_VARIANTS:
        raise NotAllowedError(f"Ask for between 1 and {MAX_VARIANTS} variations.")
    await owned_progress(ctx.services.queue, session_id_hash=ctx.session_id_hash, job_id=job_id)
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if document is None or document.content.kind != JobKind.PORTRAIT:
        raise JobNotOwnedError("No such portrait.")
    parent = document.content
    parent_seed = parent.seed
    if parent_seed is None:
        raise JobNotOwnedError("No such portrait.")
    model = ctx.services.models.get(parent.model)
    job_ids = []
    for index, seed in enumerate(seed_family(parent_seed, count)):
        # The variant's words as they stand now (the clinician may have edited them) are the new start.
        content = parent.model_copy(
            update={
                "seed": seed,
                "generated_caption": parent.caption,
                "generated_alt_text": parent.alt_text,
                "replaces": None,
                "safety": None,
                "write_notes": (),
                "included_image": True,
            }
        )
        job_ids.append(await _enqueue_variant(ctx, content, index=index, variants=count, model=model))
    await ctx.audit(
        AuditAction.GENERATE,
        entities=[
            *(AuditEntity(carecanvas_ref(CareCanvasObject.JOB, new_id)) for new_id in job_ids),
            AuditEntity(carecanvas_ref(CareCanvasObject.JOB, job_id), EntityRole.SOURCE),
        ],
        description=f"{ctx.actor_reference} asked for {count} variation(s) of {job_id}",
        detail={"kind": "portrait", "job_ids": job_ids, "like": job_id, "variants": count},
    )
    return job_ids


async def _enqueue_variant(
    ctx: WorkflowContext,
    content: DraftContent,
    *,
    index: int,
    variants: int,
    model: ModelSpec | None = None,
) -> str:
    spec = model or ctx.services.models.get(content.model)
    job_id = await enqueue_image_job(
        ctx.db,
        queue=ctx.services.queue,
        model=spec,
        kind=JobKind.PORTRAIT,
        prompt=content.prompt,
        negative_prompt=content.negative_prompt,
        seed=content.seed or 0,
        owner=ctx.job_owner(),
    )
    content = content.model_copy(update={"variant": index + 1, "variants": variants})
    await create_draft(
        ctx.db, keyring=ctx.services.keyring, job_id=job_id, ehr_name=ctx.ehr.name, content=content
    )
    return job_id


def _variant_content(
    ctx: WorkflowContext,
    story_id: str,
    prompt: PortraitPrompt,
    words: PortraitWords,
    model: ModelSpec,
    *,
    seed: int,
) -> DraftContent:
    return DraftContent.generated(
        kind=JobKind.PORTRAIT,
        title=prompt.title,
        caption=words.caption,
        caption_grade=words.caption_grade,
        alt_text=words.alt_text,
        language=prompt.language,
        style=prompt.style,
        symbolic=prompt.symbolic,
        story_id=story_id,
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

"""The JSON API's operations under /api/v1: parse the body, call one workflow, answer its schema."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path
from fastapi.responses import Response
from fastapi.sse import EventSourceResponse

from fhir_adapters import ConditionSummary
from fhir_adapters.conditions import UNSPECIFIED_CONDITION
from fhir_adapters.scopes import Interaction
from service.api.auth import ApiContext
from service.api.schemas import (
    JOB_ID_PATTERN,
    ApprovalOut,
    ApproveRequest,
    CodingOut,
    ConditionOut,
    ConditionsOut,
    DocumentOut,
    DocumentsOut,
    DraftEdit,
    DraftOut,
    ErrorOut,
    IllustrationRequest,
    JobCreated,
    JobOut,
    PortraitJobsCreated,
    PortraitRequest,
    RegenerateRequest,
    TopicOut,
    TopicsOut,
    WithdrawOut,
)
from service.documents import DocumentView, load_document
from service.generation.prompts import Depiction, Topic
from service.web.choices import (
    checked_depiction,
    checked_illustration_choice,
    checked_language,
    checked_portrait_language,
    checked_portrait_style,
    checked_style,
)
from service.web.context import RequestContext
from service.web.errors import AppError, ErrorCode
from service.web.workflow_errors import workflow_errors
from service.workflows.approve import Approval, approve_and_write_back
from service.workflows.drafts import DraftChange, edit_draft, handout_preview
from service.workflows.illustrate import start_illustration
from service.workflows.jobs import JobProgress, follow
from service.workflows.portrait import PortraitChoice, start_portraits_from_story
from service.workflows.regenerate import RegenerationChoice, start_regeneration
from service.workflows.retract import retract_document
from service.workflows.review import ArtifactKind, read_owned_artifact, review_draft
from service.workflows.topics import condition_topics, topic_titles
from service.workflows.workspace import load_conditions, load_history

API_BASE = "/api/v1"
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description}
    for status, description in (
        (400, "Not a valid choice"),
        (401, "No session, or the token was not accepted"),
        (403, "Not allowed (CSRF, scope, another patient's record)"),
        (404, "Not found, or another caller's"),
        (409, "Not ready, or being saved right now"),
        (413, "Request body too large"),
        (422, "The body or a parameter does not match its schema"),
        (429, "Too many requests from this client (Retry-After), or too many of the caller's jobs waiting"),
        (502, "The EHR answered with an error"),
        (503, "The EHR is not answering right now"),
    )
}

router = APIRouter(prefix=API_BASE, responses=ERRORS)

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="A job id from a create operation.")]


async def api_job(job_id: JobId, ctx: ApiContext) -> JobProgress:
    """The caller's own job (404 for anyone else's), resolved before any answer starts."""
    return await ctx.owned_job(job_id)


OwnedJob = Annotated[JobProgress, Depends(api_job)]


def require(ctx: RequestContext, resource_type: str, interaction: Interaction) -> None:
    if not ctx.allows(resource_type, interaction):
        raise AppError(
            403,
            "Not allowed for this launch",
            f"The EHR did not grant CareCanvas {resource_type} {interaction}.",
            code=ErrorCode.NOT_ALLOWED,
        )


def job_out(job: JobProgress) -> JobOut:
    return JobOut(job_id=job.job_id, status=job.status, step=job.step, total=job.total, error=job.error)


@router.get("/conditions", operation_id="list_conditions")
async def conditions(ctx: ApiContext) -> ConditionsOut:
    """The launched patient's active conditions (audited as a search)."""
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        found = await load_conditions(ctx.workflow(), fhir)
    await ctx.db.commit()
    topics = condition_topics(ctx.services.prompts, found, unspecified=UNSPECIFIED_CONDITION)

    def out(item: ConditionSummary) -> ConditionOut:
        topic = topics[item.id or ""]
        return ConditionOut(
            id=item.id,
            text=item.text,
            clinical_status=item.clinical_status,
            onset=item.onset,
            codes=[CodingOut(system=c.system, code=c.code, display=c.display) for c in item.codes],
            topic=topic.match.topic.id,
            topic_fallback=topic.is_fallback,
            closest_topics=[topic_out(t) for t in topic.match.closest],
        )

    return ConditionsOut(conditions=[out(item) for item in found])


def topic_out(topic: Topic) -> TopicOut:
    return TopicOut(id=topic.id, title=topic.text["en"].title, titles=topic_titles(topic))


@router.get("/topics", operation_id="list_topics")
async def topics(ctx: ApiContext) -> TopicsOut:
    """Every handout topic a condition on the generic fallback may take as `topic_override` (not only its
    closest ones), by English title; nothing about the patient, so nothing is audited."""
    library = ctx.services.prompts
    return TopicsOut(
        topics=[topic_out(t) for t in sorted(library.topics, key=lambda t: t.text["en"].title.casefold())]
    )


@router.get("/documents", operation_id="list_documents")
async def documents(ctx: ApiContext) -> DocumentsOut:
    """The documents CareCanvas wrote to this patient's chart, as the EHR lists them."""
    ctx.patient_id()
    require(ctx, "DocumentReference", "search")
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        view = await load_history(ctx.workflow(), fhir)
    await ctx.db.commit()
    return DocumentsOut(
        documents=[
            DocumentOut(
                fhir_document_id=entry.fhir_document_id,
                status=entry.status,
                date=entry.date,
                description=entry.description,
                replaces=entry.replaces,
                job_id=entry.job_id,
                local_status=entry.local_status,
            )
            for entry in view.history
        ],
        unavailable=view.history_unavailable,
    )


@router.post("/illustrations", status_code=201, operation_id="create_illustration")
async def create_illustration(body: IllustrationRequest, ctx: ApiContext) -> JobCreated:
    """Queue an education illustration for one of the patient's conditions."""
    choice = checked_illustration_choice(
        ctx.services.prompts,
        condition_id=body.condition_id,
        style=body.style,
        language=body.language,
        depiction=body.depiction,
        topic_override=body.topic_override,
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        job_id = await start_illustration(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return JobCreated(job_id=job_id)


def portrait_choice(ctx: RequestContext, body: PortraitRequest) -> PortraitChoice:
    try:
        depiction = Depiction(
            skin_tone=body.skin_tone,
            age_group=body.age_group,
            body_type=body.body_type,
            dress=body.dress,
            setting=body.setting,
            show_people=body.show_people is not False,
        )
    except ValueError as error:
        raise AppError(400, "Not a valid choice", str(error), code=ErrorCode.INVALID_INPUT) from error
    return PortraitChoice(
        style=checked_portrait_style(ctx.services.prompts, body.style),
        language=checked_portrait_language(body.language),
        depiction=depiction,
        variants=body.variants,
        people=body.show_people,
        likeness_note=body.likeness_note,
    )


@router.post("/portraits", status_code=201, operation_id="create_portraits")
async def create_portraits(body: PortraitRequest, ctx: ApiContext) -> PortraitJobsCreated:
    """Queue portrait variants from the patient's own story (read again from the EHR, never sent here)."""
    choice = portrait_choice(ctx, body)
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        job_ids = await start_portraits_from_story(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return PortraitJobsCreated(job_ids=job_ids)


@router.get("/jobs/{job_id}", operation_id="get_job")
async def get_job(job: OwnedJob) -> JobOut:
    """Status and progress (step k of n) of one of the caller's jobs."""
    return job_out(job)


@router.get(
    "/jobs/{job_id}/events",
    response_class=EventSourceResponse,
    operation_id="follow_job",
    responses={200: {"description": "Server-Sent Events: one JobOut per change, until the job is final"}},
)
async def job_events(job: OwnedJob, ctx: ApiContext) -> AsyncIterator[JobOut]:
    async for progress in follow(ctx.services.queue, session_id_hash=ctx.session.id_hash, first=job):
        yield job_out(progress)


def draft_out(document: DocumentView, grade: float | None, too_hard: bool) -> DraftOut:
    content = document.content
    base = f"{API_BASE}/jobs/{document.job_id}"
    return DraftOut(
        job_id=document.job_id,
        status=document.status,
        title=content.title,
        caption=content.caption,
        alt_text=content.alt_text,
        language=content.language,
        reading_grade=grade,
        caption_too_hard=too_hard,
        image_url=f"{base}/image",
        preview_url=f"{base}/preview",
        handout_url=f"{base}/handout",
        fhir_document_id=document.fhir_document_id,
    )


async def _draft(ctx: RequestContext, job_id: str) -> DraftOut:
    async with workflow_errors(ctx.db):
        draft = await review_draft(ctx.workflow(), job_id)
    return draft_out(draft.document, draft.caption_grade, draft.caption_too_hard)


@router.get("/jobs/{job_id}/draft", operation_id="get_draft")
async def get_draft(job: OwnedJob, ctx: ApiContext) -> DraftOut:
    """The draft: caption, alt text, its measured reading grade, and where its image and handout are."""
    out = await _draft(ctx, job.job_id)
    await ctx.db.commit()
    return out


@router.patch("/jobs/{job_id}/draft", operation_id="edit_draft")
async def patch_draft(job: OwnedJob, body: DraftEdit, ctx: ApiContext) -> DraftOut:
    """Change the caption and/or alt text before approval."""
    async with workflow_errors(ctx.db):
        await edit_draft(
            ctx.workflow(), job.job_id, DraftChange(caption=body.caption, alt_text=body.alt_text)
        )
    out = await _draft(ctx, job.job_id)
    await ctx.db.commit()
    return out


_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}
}
_PDF: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/pdf": {"schema": {"type": "string", "format": "binary"}}}}
}


async def _artifact(ctx: RequestContext, job: JobProgress, kind: ArtifactKind) -> Response:
    async with workflow_errors(ctx.db):
        png = await read_owned_artifact(ctx.workflow(), job, kind)
    await ctx.db.commit()
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})


@router.get("/jobs/{job_id}/image", response_class=Response, responses=_PNG, operation_id="get_image")
async def image(job: OwnedJob, ctx: ApiContext) -> Response:
    """The finished picture (PNG)."""
    return await _artifact(ctx, job, ArtifactKind.PNG)


@router.get("/jobs/{job_id}/preview", response_class=Response, responses=_PNG, operation_id="get_preview")
async def preview(job: OwnedJob, ctx: ApiContext) -> Response:
    """The running job's latest progress preview (PNG)."""
    return await _artifact(ctx, job, ArtifactKind.PREVIEW)


@router.get("/jobs/{job_id}/handout", response_class=Response, responses=_PDF, operation_id="get_handout")
async def handout(job: OwnedJob, ctx: ApiContext) -> Response:
    """The printable handout (PDF) as approving the draft now would write it."""
    async with workflow_errors(ctx.db):
        pdf = await handout_preview(ctx.workflow(), job)
    await ctx.db.commit()
    return Response(pdf, media_type="application/pdf", headers={"Cache-Control": "private, no-store"})


async def _approval(ctx: RequestContext, job_id: str, body: ApproveRequest | None) -> Approval:
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    await ctx.db.commit()
    if document is None:
        raise AppError(404, "No such illustration", "There is no draft for this picture.")
    content = document.content
    caption = body.caption if body and body.caption is not None else content.caption
    alt_text = body.alt_text if body and body.alt_text is not None else content.alt_text
    return Approval(
        job_id=job_id,
        caption=caption,
        alt_text=alt_text,
        reading_target=True,  # the same plain-language rule as the review page
        above_target=body.above_target_reason if body else None,
    )


@router.post("/jobs/{job_id}/approve", operation_id="approve")
async def approve(
    job: OwnedJob, ctx: ApiContext, body: Annotated[ApproveRequest | None, Body()] = None
) -> ApprovalOut:
    """Approve and write back to the chart exactly once; repeating it answers the same FHIR ids."""
    require(ctx, "DocumentReference", "create")
    approval = await _approval(ctx, job.job_id, body)
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await approve_and_write_back(ctx.workflow(), fhir, approval)
    return ApprovalOut(
        job_id=job.job_id,
        fhir_document_id=result.fhir_document_id,
        already_written=result.already_written,
        included_image=result.included_image,
        notes=list(result.notes),
        replaced_document_id=result.replaced_document_id,
        superseded=result.superseded,
    )


@router.post("/documents/{job_id}/regenerate", status_code=201, operation_id="regenerate")
async def regenerate(
    job_id: JobId, ctx: ApiContext, body: Annotated[RegenerateRequest | None, Body()] = None
) -> JobCreated:
    """A new version of a picture in the chart; approving it replaces the old document."""
    wanted = body or RegenerateRequest()
    choice = RegenerationChoice(
        previous_job_id=job_id,
        style=checked_style(ctx.services.prompts, wanted.style) if wanted.style else None,
        language=checked_language(wanted.language) if wanted.language else None,
        depiction=checked_depiction(wanted.depiction),
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        new_job_id = await start_regeneration(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return JobCreated(job_id=new_job_id)


@router.post("/documents/{job_id}/withdraw", operation_id="withdraw")
async def withdraw(job_id: JobId, ctx: ApiContext) -> WithdrawOut:
    """Withdraw a picture from the chart: its DocumentReference becomes entered-in-error."""
    require(ctx, "DocumentReference", "update")
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        result = await retract_document(ctx.workflow(), fhir, job_id)
    return WithdrawOut(
        job_id=job_id, fhir_document_id=result.fhir_document_id, already_withdrawn=result.already_retracted
    )

"""What the reviewer sees of a finished job: the draft with its measured reading grade, and the image."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from service.audit import AuditAction, AuditEntity, CareCanvasObject, EntityRole, carecanvas_ref
from service.documents import DocumentView, load_document
from service.generation.languages import LanguagePack, language_pack
from service.generation.models import ModelSpec
from service.generation.readability import FORMULAS, reading_grade
from service.jobs import JobNotFoundError, JobStatus
from service.workflows.context import WorkflowContext
from service.workflows.errors import ArtifactNotReadyError, JobNotOwnedError
from service.workflows.jobs import JobProgress

# Plain language for patients: captions above this grade are flagged to the reviewer.
MAX_CAPTION_GRADE = 6.0


class ArtifactKind(StrEnum):
    PNG = "png"
    PREVIEW = "preview"


def measured_grade(text: str, language: str) -> float | None:
    """The reading grade of `text` with its language's formula; None where no formula exists (or no text)."""
    return reading_grade(text, language).grade


@dataclass(frozen=True)
class GradedCaption:
    """A caption's measured reading grade (None: no measure for its language) and whether it is too hard."""

    grade: float | None
    language: str = "en"

    @property
    def formula(self) -> str | None:
        return FORMULAS.get(self.language.split("-")[0].lower())

    @property
    def measured(self) -> bool:
        return self.grade is not None

    @property
    def too_hard(self) -> bool:
        return self.grade is not None and self.grade > MAX_CAPTION_GRADE

    @property
    def target(self) -> float:
        return MAX_CAPTION_GRADE

    @classmethod
    def of(cls, caption: str, language: str) -> GradedCaption:
        return cls(measured_grade(caption, language), language)


@dataclass(frozen=True)
class ReviewDraft:
    document: DocumentView
    caption_grade: float | None
    model: ModelSpec

    @property
    def caption_too_hard(self) -> bool:
        return self.caption_grade is not None and self.caption_grade > MAX_CAPTION_GRADE

    @property
    def language(self) -> LanguagePack:
        """The handout language's template: its name, direction and translation review status."""
        return language_pack(self.document.content.language)

    @property
    def graded(self) -> GradedCaption:
        return GradedCaption(self.caption_grade, self.document.content.language)


async def review_draft(ctx: WorkflowContext, job_id: str) -> ReviewDraft:
    """The draft of this session's job, audited as viewed (in the caller's transaction)."""
    document = await load_document(ctx.db, keyring=ctx.services.keyring, job_id=job_id)
    if document is None:
        raise JobNotOwnedError("There is no draft for this picture. Start again from the workspace.")
    content = document.content
    await ctx.audit(
        AuditAction.VIEW,
        entities=[
            AuditEntity(carecanvas_ref(CareCanvasObject.DRAFT, document.id)),
            AuditEntity(content.source_reference, EntityRole.SOURCE),
        ],
        detail={"job_id": job_id},
        patient=content.patient_id,
        description=f"{ctx.actor_reference} viewed the draft of the picture about {content.source_reference}",
    )
    return ReviewDraft(
        document=document,
        caption_grade=measured_grade(content.caption, content.language),
        model=ctx.services.models.get(content.model),
    )


async def read_owned_artifact(ctx: WorkflowContext, job: JobProgress, kind: ArtifactKind) -> bytes:
    """The finished image (or the running job's preview) of a job the caller owns, audited as viewed."""
    if kind is ArtifactKind.PNG and job.status is not JobStatus.SUCCEEDED:
        raise ArtifactNotReadyError("The image is not finished yet.")
    try:
        png = await ctx.services.queue.read_artifact(job.job_id, kind.value)
    except JobNotFoundError:
        raise ArtifactNotReadyError("There is no preview yet.") from None
    object_kind = CareCanvasObject.IMAGE if kind is ArtifactKind.PNG else CareCanvasObject.PREVIEW
    await ctx.audit(
        AuditAction.VIEW,
        entities=[AuditEntity(carecanvas_ref(object_kind, job.job_id))],
        detail={"job_id": job.job_id},
        description=f"{ctx.actor_reference} viewed the {object_kind.value} of job {job.job_id}",
    )
    return png

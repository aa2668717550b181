"""The JSON API's bodies: one pydantic model per direction; inputs refuse unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.jobs import JobStatus
from service.workflows.approve import AboveTargetReason

FHIR_ID_PATTERN = r"^[A-Za-z0-9\-.]{1,64}$"
JOB_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
CAPTION_MAX = 2000
ALT_TEXT_MAX = 1000


class Input(BaseModel):
    """Request bodies: unknown fields and wrong types are refused (422), never ignored or coerced."""

    model_config = ConfigDict(extra="forbid", strict=True)


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests ----------------------------------------------------------------------------------------


class IllustrationRequest(Input):
    condition_id: str = Field(pattern=FHIR_ID_PATTERN, description="One of the patient's active Conditions.")
    style: str = Field(min_length=1, max_length=40, description="A style name from the prompt library.")
    language: str = Field(min_length=2, max_length=16, description="An offered BCP-47 code.")
    depiction: str = Field(
        default="varied",
        min_length=1,
        max_length=200,
        description='"varied", "none" (no people) or "skin_tone=dark;age_group=older_adult".',
    )
    topic_override: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description=(
            "A handout topic id for a condition on the generic fallback (see `closest_topics` in "
            "GET /conditions): 400 `unknown_topic` for an id that is no topic, 422 `topic_already_matched` "
            "for a condition that matched a topic of its own; nothing is queued then."
        ),
    )


class PortraitRequest(Input):
    style: str = Field(min_length=1, max_length=40)
    language: str = Field(min_length=2, max_length=16)
    variants: int = Field(default=4, ge=1, le=8)
    # None: as the patient's story says (people only with their likeness consent); else with likeness_note.
    show_people: bool | None = None
    likeness_note: str = Field(default="", max_length=1000)
    skin_tone: str = Field(default="varied", min_length=1, max_length=20)
    age_group: str = Field(default="varied", min_length=1, max_length=20)
    body_type: str = Field(default="varied", min_length=1, max_length=20)
    dress: str = Field(default="varied", min_length=1, max_length=20)
    setting: str = Field(default="varied", min_length=1, max_length=20)


class DraftEdit(Input):
    """A new caption and/or alt text for the draft; at least one of them."""

    caption: str | None = Field(default=None, min_length=1, max_length=CAPTION_MAX)
    alt_text: str | None = Field(default=None, min_length=1, max_length=ALT_TEXT_MAX)

    @model_validator(mode="after")
    def _something(self) -> DraftEdit:
        if self.caption is None and self.alt_text is None:
            raise ValueError("give a caption, an alt_text or both")
        return self


class ApproveRequest(Input):
    """Optional last edits; without them the draft's caption and alt text are approved as they stand."""

    caption: str | None = Field(default=None, min_length=1, max_length=CAPTION_MAX)
    alt_text: str | None = Field(default=None, min_length=1, max_length=ALT_TEXT_MAX)
    # A caption above the plain-language target (grade 6) is approved only with one of these reasons
    # (422 `above_reading_target` otherwise), as on the review page; it goes into the audit record.
    above_target_reason: AboveTargetReason | None = Field(default=None, strict=False)


class RegenerateRequest(Input):
    """What may change in a new version; omitted fields keep the old document's values."""

    style: str | None = Field(default=None, min_length=1, max_length=40)
    language: str | None = Field(default=None, min_length=2, max_length=16)
    depiction: str = Field(default="varied", min_length=1, max_length=200)


# ---- responses ---------------------------------------------------------------------------------------


class ErrorOut(Output):
    code: str = Field(description="Stable reason (service.web.errors.ErrorCode); branch on this.")
    title: str
    detail: str


class CodingOut(Output):
    system: str | None
    code: str | None
    display: str | None


class TopicOut(Output):
    id: str
    title: str  # English
    # The title the handout carries in each language its template has one for (English included).
    titles: dict[str, str] = Field(default_factory=dict)


class TopicsOut(Output):
    topics: list[TopicOut]


class ConditionOut(Output):
    id: str | None
    text: str
    clinical_status: str | None
    onset: str | None
    codes: list[CodingOut]
    # The handout topic the condition matched (the generic one: topic_fallback) and, on the fallback, the
    # closest real topics a clinician may choose as `topic_override`.
    topic: str | None = None
    topic_fallback: bool = False
    closest_topics: list[TopicOut] = Field(default_factory=list)


class ConditionsOut(Output):
    conditions: list[ConditionOut]


class JobCreated(Output):
    job_id: str


class PortraitJobsCreated(Output):
    job_ids: list[str]


class JobOut(Output):
    job_id: str
    status: JobStatus
    step: int
    total: int
    error: str | None


class DraftOut(Output):
    job_id: str
    status: str = Field(description="draft | approved | written | retracted | failed")
    title: str
    caption: str
    alt_text: str
    language: str
    reading_grade: float | None  # None: no readability formula for this language
    caption_too_hard: bool
    image_url: str
    preview_url: str
    handout_url: str
    fhir_document_id: str | None


class ApprovalOut(Output):
    job_id: str
    fhir_document_id: str
    already_written: bool
    included_image: bool
    notes: list[str]
    replaced_document_id: str | None
    superseded: str | None


class WithdrawOut(Output):
    job_id: str
    fhir_document_id: str
    already_withdrawn: bool


class DocumentOut(Output):
    fhir_document_id: str
    status: str = Field(description="The EHR's: current | superseded | entered-in-error")
    date: str
    description: str
    replaces: str | None
    job_id: str | None
    local_status: str | None


class DocumentsOut(Output):
    documents: list[DocumentOut]
    unavailable: bool = Field(description="True when the EHR's document search failed (the list is empty).")

"""Gathering a story: an intake form filled in with the patient, written back as a QuestionnaireResponse."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

from fhir_adapters import FhirClient, FhirError
from service.audit import AuditAction, AuditEntity, AuditOutcome, EntityRole, canonical_actor
from service.generation.text import normalise_free_text
from service.workflows.context import WorkflowContext
from service.workflows.errors import NotAllowedError

QUESTIONNAIRE_FILE = (
    Path(__file__).resolve().parents[2] / "templates" / "fhir" / "questionnaire-portrait-story.json"
)
MAX_ITEMS = 8
MAX_ITEM_CHARS = 80
MAX_STORY_CHARS = 2000
_SPLIT = re.compile(r"[,;\n]+")
LIST_FIELDS = ("places", "colours", "symbols", "avoid")


class IntakeError(ValueError):
    """What is wrong with the form, in words for the clinician (the form is shown again, as typed)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@cache
def questionnaire() -> dict[str, Any]:
    """The Questionnaire CareCanvas ships (templates/fhir), which every intake answers."""
    document: dict[str, Any] = json.loads(QUESTIONNAIRE_FILE.read_text(encoding="utf-8"))
    return document


def questionnaire_canonical() -> str:
    document = questionnaire()
    return f"{document['url']}|{document['version']}"


def _items(field: str, text: str) -> tuple[str, ...]:
    parts = [normalise_free_text(part, max_chars=500).strip() for part in _SPLIT.split(text)]
    items = tuple(dict.fromkeys(part for part in parts if part))
    if len(items) > MAX_ITEMS:
        raise IntakeError(field, f"Please write at most {MAX_ITEMS} things here.")
    if any(len(item) > MAX_ITEM_CHARS for item in items):
        raise IntakeError(field, f"Please keep each thing under {MAX_ITEM_CHARS} letters.")
    return items


@dataclass(frozen=True)
class StoryIntake:
    """The answers of one intake form, checked."""

    places: tuple[str, ...]
    colours: tuple[str, ...]
    symbols: tuple[str, ...]
    avoid: tuple[str, ...]
    likeness_consent: bool
    story: str

    @classmethod
    def parse(cls, form: dict[str, str]) -> StoryIntake:
        """From the form's fields: lists separated by commas, semicolons or new lines; consent yes or no."""
        lists = {field: _items(field, form.get(field, "")) for field in LIST_FIELDS}
        story = normalise_free_text(form.get("story", ""), max_chars=MAX_STORY_CHARS + 1).strip()
        if len(story) > MAX_STORY_CHARS:
            raise IntakeError("story", f"Please keep the story under {MAX_STORY_CHARS} letters.")
        consent = form.get("likeness_consent", "")
        if consent not in ("yes", "no"):
            raise IntakeError("likeness_consent", "Please ask the patient whether the picture may show them.")
        if not (story or lists["places"] or lists["colours"] or lists["symbols"]):
            raise IntakeError("places", "Please write at least a place, a colour, a symbol or the story.")
        return cls(**lists, likeness_consent=consent == "yes", story=story)


def _question(link_id: str) -> str:
    return next(str(item["text"]) for item in questionnaire()["item"] if item["linkId"] == link_id)


def build_story_response(
    intake: StoryIntake, *, patient_id: str, author: str | None, now: datetime
) -> dict[str, Any]:
    """The R4 QuestionnaireResponse to the shipped Questionnaire: the patient told it, the author wrote it."""
    items: list[dict[str, Any]] = [
        {"linkId": field, "text": _question(field), "answer": [{"valueString": value} for value in values]}
        for field, values in (
            ("places", intake.places),
            ("colours", intake.colours),
            ("symbols", intake.symbols),
            ("avoid", intake.avoid),
        )
        if values
    ]
    items.append(
        {
            "linkId": "likeness-consent",
            "text": _question("likeness-consent"),
            "answer": [{"valueBoolean": intake.likeness_consent}],
        }
    )
    if intake.story:
        items.append(
            {"linkId": "story", "text": _question("story"), "answer": [{"valueString": intake.story}]}
        )
    response: dict[str, Any] = {
        "resourceType": "QuestionnaireResponse",
        "questionnaire": questionnaire_canonical(),
        "status": "completed",
        "subject": {"reference": f"Patient/{patient_id}"},
        "authored": now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"reference": f"Patient/{patient_id}"},
        "item": items,
    }
    practitioner = canonical_actor(author)
    if practitioner and practitioner.startswith(("Practitioner/", "PractitionerRole/")):
        response["author"] = {"reference": practitioner}
    return response


async def write_story(ctx: WorkflowContext, fhir: FhirClient, intake: StoryIntake) -> str:
    """Create the QuestionnaireResponse at the EHR and audit it; returns its id. The caller commits."""
    if not ctx.scopes.allows("QuestionnaireResponse", "create"):
        raise NotAllowedError("This launch may not write a story to the record. Ask for the story scope.")
    patient_id = ctx.patient_id or ""
    resource = build_story_response(intake, patient_id=patient_id, author=ctx.actor, now=datetime.now(UTC))
    try:
        result = await fhir.create(resource)
    except FhirError as error:
        await ctx.db.rollback()
        await ctx.audit(
            AuditAction.STORY_WRITE,
            AuditOutcome.FAILURE,
            resource="QuestionnaireResponse",
            detail={"status": error.status},
        )
        await ctx.db.commit()
        raise
    response_id = str(result.id or "")
    await ctx.audit(
        AuditAction.STORY_WRITE,
        resource="QuestionnaireResponse",
        entities=[
            AuditEntity(f"QuestionnaireResponse/{response_id}"),
            AuditEntity(f"Patient/{patient_id}", EntityRole.SOURCE),
        ],
        detail={"likeness_consent": intake.likeness_consent},
    )
    return response_id

"""The clinician's workspace: patient banner, active conditions, the generate form and earlier documents."""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from fhir_adapters.conditions import UNSPECIFIED_CONDITION
from service.documents import STATUS_LABELS
from service.generation.languages import LanguagePreference
from service.web.choices import LANGUAGES, checked_illustration_choice
from service.web.context import ClinicianContext
from service.web.workflow_errors import workflow_errors
from service.workflows.drafts import pending_drafts
from service.workflows.illustrate import start_illustration
from service.workflows.topics import condition_topics, topic_label, topic_titles
from service.workflows.workspace import load_workspace

router = APIRouter()


def language_note(preference: LanguagePreference | None) -> str | None:
    """What the page says about the patient's preferred language (None: nothing to say)."""
    if preference is None or preference.requested is None:
        return None
    wanted = preference.requested_display or preference.requested
    if preference.language is None:
        return (
            f"This patient prefers {wanted}, and CareCanvas has no handouts in that language yet. "
            "Choose the language the patient reads best, or ask for a medical interpreter."
        )
    return f"Language set to the patient's preferred language ({LANGUAGES[preference.language]})."


ANOTHER_TOPIC = "*"  # a fallback condition's "Another topic": the page's list of every topic says which


def chosen_topic(topic_choices: list[str], condition_id: str, other_topic: str | None = None) -> str | None:
    """The topic picked for the chosen condition. Each fallback condition on the page has its own topic
    list, whose values are "<condition id>:<topic id>" ("<condition id>:" keeps the general handout,
    "<condition id>:*" takes the topic picked in the one list of every topic, `other_topic`); the lists of
    the conditions not chosen are ignored. "*" with no topic picked stays "*": refused as unknown."""
    for value in topic_choices:
        condition, separator, topic = value.partition(":")
        if separator and condition == condition_id:
            if topic == ANOTHER_TOPIC:
                return other_topic or ANOTHER_TOPIC
            return topic or None
    return None


@router.get("/app", response_class=HTMLResponse)
async def workspace(request: Request, ctx: ClinicianContext) -> Response:
    ctx.patient_id()
    async with ctx.fhir() as fhir:
        view = await load_workspace(ctx.workflow(), fhir, banner=ctx.session.data.need_patient_banner)
    if view.banner is not None:
        # Kept (encrypted, in the server-side session) so every clinician page shows the same banner and
        # visit line without reading the Patient again.
        ctx.session.data.banner = dataclasses.asdict(view.banner)
        ctx.session.data.visit = dataclasses.asdict(view.encounter) if view.encounter else None
        preference = view.preferred_language
        ctx.session.data.preferred_language = preference.language if preference else None
        ctx.session.data.language_note = language_note(preference)
        ctx.session.data.user_display = view.user_display
        await ctx.services.sessions.save(ctx.db, ctx.session)
    await ctx.db.commit()
    drafts = await pending_drafts(ctx.workflow())
    await ctx.db.commit()
    services = ctx.services
    return services.templates.TemplateResponse(
        request,
        "workspace.html",
        {
            "banner": view.banner,
            "encounter": view.encounter,
            "conditions": view.conditions,
            "styles": services.prompts.styles,
            "languages": LANGUAGES,
            "csrf_token": ctx.csrf_token,
            "can_write": ctx.allows("DocumentReference", "create"),
            "model": services.models.get(services.settings.default_model),
            "history": view.history,
            "history_unavailable": view.history_unavailable,
            "status_labels": STATUS_LABELS,
            "can_update": ctx.allows("DocumentReference", "update"),
            "unspecified_text": UNSPECIFIED_CONDITION,
            "topics": condition_topics(services.prompts, view.conditions, unspecified=UNSPECIFIED_CONDITION),
            # A fallback condition may take any topic (the clinician may know better than the closest three).
            "all_topics": sorted(
                services.prompts.topics, key=lambda topic: topic.text["en"].title.casefold()
            ),
            "topic_label": topic_label,
            "topic_titles": topic_titles,
            "drafts": drafts,
            "default_language": ctx.session.data.preferred_language or "en",
            "language_note": ctx.session.data.language_note,
            "current_user": ctx.fhir_user,
        },
    )


@router.post("/illustrations")
async def create_illustration(
    ctx: ClinicianContext,
    condition_id: Annotated[str, Form(max_length=64)],
    style: Annotated[str, Form(max_length=40)],
    language: Annotated[str, Form(max_length=16)],
    csrf_token: Annotated[str, Form(max_length=100)],
    depiction: Annotated[str, Form(max_length=40)] = "varied",
    topic_choice: Annotated[list[str] | None, Form()] = None,
    topic_other: Annotated[str | None, Form(max_length=100)] = None,
) -> Response:
    choice = checked_illustration_choice(
        ctx.services.prompts,
        condition_id=condition_id,
        style=style,
        language=language,
        depiction=depiction,
        topic_override=chosen_topic(topic_choice or [], condition_id, topic_other),
    )
    ctx.patient_id()
    async with workflow_errors(ctx.db), ctx.fhir() as fhir:
        job_id = await start_illustration(ctx.workflow(), fhir, choice)
    await ctx.db.commit()
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)

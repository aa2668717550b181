"""The choices a clinician may send (condition, style, language, depiction), checked once for both faces."""

from __future__ import annotations

import re

from service.generation.languages import available_languages
from service.generation.portrait_words import PORTRAIT_LANGUAGES
from service.generation.prompts import Depiction, PromptLibrary
from service.web.errors import AppError, ErrorCode
from service.workflows.illustrate import IllustrationChoice

# Every language a handout can be made in (the language templates), named in the language itself.
LANGUAGES = {pack.code: pack.name for pack in available_languages()}
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def _invalid(title: str, message: str) -> AppError:
    return AppError(400, title, message, code=ErrorCode.INVALID_INPUT)


def checked_fhir_id(value: str, what: str = "condition") -> str:
    if not FHIR_ID.fullmatch(value):
        raise _invalid(f"Not a valid {what} id", f"Pick a {what} from the list on the page.")
    return value


def checked_language(language: str) -> str:
    if language not in LANGUAGES:
        raise _invalid("Unknown language", f"Choose one of: {', '.join(LANGUAGES.values())}.")
    return language


def checked_portrait_language(language: str) -> str:
    """Portrait captions exist in fewer languages than handouts: refuse the others clearly."""
    checked_language(language)
    if language not in PORTRAIT_LANGUAGES:
        names = ", ".join(LANGUAGES[code] for code in PORTRAIT_LANGUAGES)
        raise _invalid("Portraits are not written in this language yet", f"Choose one of: {names}.")
    return language


def checked_style(library: PromptLibrary, style: str) -> str:
    if style not in {preset.name for preset in library.styles}:
        raise _invalid("Unknown style", "Choose one of the styles offered on the page.")
    return style


def checked_portrait_style(library: PromptLibrary, style: str) -> str:
    """A portrait style (portrait_styles.yaml): portraits have their own set, apart from education styles."""
    if style not in {preset.name for preset in library.portrait_styles}:
        raise _invalid("Unknown style", "Choose one of the portrait styles offered on the page.")
    return style


def checked_depiction(depiction: str) -> Depiction:
    try:
        return Depiction.from_choice(depiction)
    except ValueError as error:
        raise _invalid("Unknown depiction", str(error)) from error


def checked_topic_override(library: PromptLibrary, topic_id: str | None) -> str | None:
    """A handout topic the clinician chose for a condition on the generic fallback (None or "": keep the
    match). Only a real topic's id: the generic topic is what "keep general" already means."""
    if not topic_id:
        return None
    if topic_id not in {topic.id for topic in library.topics}:
        raise AppError(
            400,
            "Unknown handout topic",
            "Pick one of the topics offered on the page, or keep the general handout.",
            code=ErrorCode.UNKNOWN_TOPIC,
        )
    return topic_id


def checked_illustration_choice(
    library: PromptLibrary,
    *,
    condition_id: str,
    style: str,
    language: str,
    depiction: str,
    topic_override: str | None = None,
) -> IllustrationChoice:
    return IllustrationChoice(
        condition_id=checked_fhir_id(condition_id),
        style=checked_style(library, style),
        language=checked_language(language),
        depiction=checked_depiction(depiction),
        topic_override=checked_topic_override(library, topic_override),
    )

"""A portrait's patient-facing words: a caption in one voice addressed to the patient, and alt text apart."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from service.generation.prompts import AvoidTerms, PortraitStoryFields, PromptLibrary
from service.generation.readability import PLAIN_LANGUAGE_MAX_GRADE, caption_grade
from service.generation.text import normalise_free_text

# Anything that looks like an identifier never reaches a caption (the story is typed by people).
_IDENTIFIER_LIKE = re.compile(r"\S+@\S+|https?://|www\.|\d")
_MAX_ITEMS = 3


@dataclass(frozen=True)
class _Words:
    """One language's sentences. The caption talks to the patient; the alt text describes the picture."""

    caption_lead: str
    caption_places: str
    caption_symbols: str
    caption_colours: str
    alt_lead: str
    alt_places: str
    alt_symbols: str
    alt_colours: str
    alt_people: str
    alt_no_people: str
    conjunction: str
    # The story is written in the patient's own voice ("my garden"); the caption speaks to them.
    to_patient: tuple[tuple[str, str], ...]
    # The alt text describes what is shown, so nobody's possessive stays in it.
    neutral: tuple[tuple[str, str], ...]


_WORDS: dict[str, _Words] = {
    "en": _Words(
        caption_lead="This picture was made from your story.",
        caption_places="It shows {items}.",
        caption_symbols="You can see {items}.",
        caption_colours="The colours are {items}.",
        alt_lead="A {style} picture",
        alt_places="of {items}",
        alt_symbols="with {items}",
        alt_colours="in {items}",
        alt_people="One person is in the scene.",
        alt_no_people="No people are shown.",
        conjunction="and",
        to_patient=(
            ("i am", "you are"),
            ("i'm", "you're"),
            ("myself", "yourself"),
            ("mine", "yours"),
            ("my", "your"),
            ("our", "your"),
            ("me", "you"),
            ("us", "you"),
            ("we", "you"),
            ("i", "you"),
        ),
        neutral=(("my", "a"), ("our", "a"), ("your", "a")),
    ),
    "es": _Words(
        caption_lead="Esta imagen se hizo con su historia.",
        caption_places="Muestra {items}.",
        caption_symbols="Se ve {items}.",
        caption_colours="Los colores son {items}.",
        alt_lead="Una imagen en {style}",
        alt_places="de {items}",
        alt_symbols="con {items}",
        alt_colours="en {items}",
        alt_people="Hay una persona en la escena.",
        alt_no_people="No se ve a ninguna persona.",
        conjunction="y",
        to_patient=(
            ("mis", "sus"),
            ("mi", "su"),
            ("nuestros", "sus"),
            ("nuestras", "sus"),
            ("nuestro", "su"),
            ("nuestra", "su"),
        ),
        neutral=(("mis", "unos"), ("mi", "un"), ("sus", "unos"), ("su", "un")),
    ),
}


@dataclass(frozen=True)
class PortraitWords:
    """The suggested caption (with its measured grade) and the alt text of one portrait."""

    caption: str
    caption_grade: float
    alt_text: str


def _swap(text: str, pairs: Sequence[tuple[str, str]]) -> str:
    def replace(match: re.Match[str]) -> str:
        word = match.group(0)
        for old, new in pairs:
            if word.lower() == old:
                return new.capitalize() if word[0].isupper() and old != "i" else new
        return word

    alternatives = "|".join(re.escape(old) for old, _ in pairs)
    return re.sub(rf"(?<![\w'])(?:{alternatives})(?![\w'])", replace, text, flags=re.IGNORECASE)


def _items(values: Sequence[str], keep_out: AvoidTerms) -> list[str]:
    """The story's list answers that may be shown: no avoided term, nothing identifier-like, short."""
    cleaned = (normalise_free_text(value, max_chars=60).strip(" .;,") for value in values[:8])
    usable = [
        value
        for value in cleaned
        if value and not keep_out.found_in(value) and not _IDENTIFIER_LIKE.search(value)
    ]
    return list(dict.fromkeys(usable))


def _listed(items: Sequence[str], conjunction: str) -> str:
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


def _caption(words: _Words, places: list[str], symbols: list[str], colours: list[str], limit: int) -> str:
    sentences = [words.caption_lead]
    for pattern, items in (
        (words.caption_places, places),
        (words.caption_symbols, symbols),
        (words.caption_colours, colours),
    ):
        if items[:limit]:
            listed = _listed([_swap(item, words.to_patient) for item in items[:limit]], words.conjunction)
            sentences.append(pattern.replace("{items}", listed))
    return " ".join(sentences)


# The languages portrait captions and alt text are written in (the handout has more).
PORTRAIT_LANGUAGES: tuple[str, ...] = tuple(_WORDS)


def portrait_words(
    *,
    library: PromptLibrary,
    story: PortraitStoryFields,
    style: str,
    language: str,
    people: bool,
) -> PortraitWords:
    """Caption and alt text for a portrait, from the same cleaned story lists as the prompt.

    The caption speaks to the patient in one voice and is kept at or below grade 6 (measured): lists are
    shortened until it is. The alt text is written separately: it says what the picture shows.
    """
    if language not in _WORDS:
        raise ValueError(f"portrait words exist in {', '.join(PORTRAIT_LANGUAGES)}, not in {language!r}")
    words = _WORDS[language]
    keep_out = AvoidTerms.of([*story.avoid, *library.avoid_terms.terms])
    places, symbols, colours = (_items(v, keep_out) for v in (story.places, story.symbols, story.colours))
    caption = words.caption_lead
    for limit in range(_MAX_ITEMS, 0, -1):
        candidate = _caption(words, places, symbols, colours, limit)
        if caption_grade(candidate, language) <= PLAIN_LANGUAGE_MAX_GRADE:
            caption = candidate
            break
    style_label = library.portrait_style(style).labels[language].lower()
    parts = [words.alt_lead.replace("{style}", style_label)]
    for pattern, items in (
        (words.alt_places, places),
        (words.alt_symbols, symbols),
        (words.alt_colours, colours),
    ):
        if items:
            listed = _listed([_swap(item, words.neutral) for item in items[:_MAX_ITEMS]], words.conjunction)
            parts.append(pattern.replace("{items}", listed))
    alt_text = " ".join(parts) + ". " + (words.alt_people if people else words.alt_no_people)
    return PortraitWords(caption=caption, caption_grade=caption_grade(caption, language), alt_text=alt_text)

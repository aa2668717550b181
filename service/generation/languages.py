"""Handout languages: one template per language (words, topic sections, review status) and BCP-47 matching."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml

# The order the pages list them in. Codes are BCP-47 tags; Chinese is Simplified script only.
LANGUAGE_CODES: tuple[str, ...] = ("en", "es", "zh-Hans", "vi", "tl", "ar", "ko", "ru")
DEFAULT_LANGUAGES_DIR = Path(__file__).resolve().parents[2] / "templates" / "prompts" / "languages"
MACHINE_DRAFTED_NOTE = "machine-drafted, not yet reviewed by a medical translator"
Direction = Literal["ltr", "rtl"]
# Script each language is written in (ISO 15924), used by tests and by the PDF to pick a font.
Script = Literal["Latn", "Hans", "Arab", "Hang", "Cyrl"]
_SCRIPTS: tuple[str, ...] = ("Latn", "Hans", "Arab", "Hang", "Cyrl")
_BCP47_SYSTEM = "urn:ietf:bcp:47"
# libyaml's safe loader when PyYAML has it (the same safe subset, ~20x faster on these large files).
SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Tags that mean one of our languages although their primary subtag differs ("fil" is Filipino, the
# standard form of Tagalog) and Chinese tags that mean the Traditional script (not available).
_ALIASES = {"fil": "tl", "tgl": "tl", "cmn": "zh", "zho": "zh", "chi": "zh"}
_TRADITIONAL_CHINESE = frozenset({"hant", "tw", "hk", "mo"})


class LanguageTemplateError(ValueError):
    """A language template is missing or malformed; the message names the file and the key."""


class ReviewState(StrEnum):
    """Where a language's words stand with a medical translator."""

    SOURCE = "source"  # the language the content is written in (English)
    MACHINE_DRAFTED = "machine-drafted"
    REVIEWED = "reviewed"


@dataclass(frozen=True)
class ReviewStatus:
    """A language template's translation review: shown on the review page next to the language."""

    state: ReviewState
    note: str
    reviewer: str | None = None
    reviewed_on: date | None = None

    @property
    def needs_review(self) -> bool:
        return self.state is ReviewState.MACHINE_DRAFTED


@dataclass(frozen=True)
class HandoutChrome:
    """The fixed words of a handout in one language (headings, labels, notices)."""

    disclosure: str
    date_label: str
    language_label: str
    description_label: str
    what_heading: str
    do_heading: str
    call_heading: str
    now_heading: str
    patient_label: str
    given_by_label: str
    phone_label: str
    test_model_notice: str


@dataclass(frozen=True)
class TopicSections:
    """A handout's sections on one topic: what it is, what you can do, when to call, when to get help now."""

    what_it_is: str
    can_do: tuple[str, ...]
    when_to_call: str
    get_help_now: str

    def texts(self) -> dict[str, str]:
        """Each section as one text (bullets as sentences), keyed by section name: what gets graded."""
        return {
            "what_it_is": self.what_it_is,
            "can_do": " ".join(_as_sentence(item) for item in self.can_do),
            "when_to_call": self.when_to_call,
            "get_help_now": self.get_help_now,
        }


@dataclass(frozen=True)
class LanguageTopic:
    """One topic's words in one language; title/caption/alt text live here for languages added later
    (English and Spanish keep theirs in the topic files)."""

    sections: TopicSections
    synonyms: tuple[str, ...] = ()
    title: str | None = None
    caption: str | None = None
    alt_text: str | None = None


@dataclass(frozen=True)
class LanguagePack:
    """Everything CareCanvas says in one language, from templates/prompts/languages/<code>.yaml."""

    code: str
    name: str  # in the language itself ("Tiếng Việt")
    english_name: str
    direction: Direction
    script: Script
    review: ReviewStatus
    chrome: HandoutChrome
    topics: Mapping[str, LanguageTopic]


@dataclass(frozen=True)
class LanguagePreference:
    """The patient's preferred language from Patient.communication and whether we have it."""

    requested: str | None  # the tag (or text) the record gives, None when it gives none
    requested_display: str | None
    language: str | None  # our matching language code, None when not available

    @property
    def available(self) -> bool:
        return self.language is not None


def _as_sentence(text: str) -> str:
    text = text.strip()
    return text if text[-1:] in ".!?。？！" else f"{text}."


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.document = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)  # noqa: S506
        except FileNotFoundError:
            raise LanguageTemplateError(f"{path}: file is missing") from None
        except yaml.YAMLError as error:
            raise LanguageTemplateError(f"{path}: not valid YAML ({error.__class__.__name__})") from None

    def fail(self, key: str, problem: str) -> LanguageTemplateError:
        return LanguageTemplateError(f"{self.path}: {key}: {problem}")

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def text(self, parent: Mapping[str, Any], name: str, key: str) -> str:
        full_key = f"{key}.{name}" if key else name
        if name not in parent:
            raise self.fail(full_key, "missing")
        value = parent[name]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(full_key, "expected a non-empty string")
        return value.strip()

    def optional_text(self, parent: Mapping[str, Any], name: str, key: str) -> str | None:
        return self.text(parent, name, key) if parent.get(name) is not None else None

    def texts(self, parent: Mapping[str, Any], name: str, key: str, *, sizes: range) -> tuple[str, ...]:
        value = parent.get(name, [] if sizes.start == 0 else None)
        full_key = f"{key}.{name}"
        if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
            raise self.fail(full_key, "expected a list of non-empty strings")
        if len(value) not in sizes:
            raise self.fail(full_key, f"expected {sizes.start} to {sizes.stop - 1} items, got {len(value)}")
        return tuple(item.strip() for item in value)


def _review(reader: _Reader, root: Mapping[str, Any]) -> ReviewStatus:
    review = reader.mapping(root.get("review"), "review")
    raw_state = reader.text(review, "status", "review")
    try:
        state = ReviewState(raw_state)
    except ValueError:
        allowed = ", ".join(state.value for state in ReviewState)
        raise reader.fail("review.status", f"{raw_state!r} is not one of: {allowed}") from None
    reviewer = reader.optional_text(review, "reviewer", "review")
    reviewed_on = review.get("reviewed_on")
    if state is ReviewState.REVIEWED and (not reviewer or not isinstance(reviewed_on, date)):
        raise reader.fail(
            "review", "a reviewed language needs a reviewer and a reviewed_on date (YYYY-MM-DD)"
        )
    if state is ReviewState.MACHINE_DRAFTED:
        # The note is fixed: a template cannot soften what the review page tells the clinician.
        note = MACHINE_DRAFTED_NOTE
    else:
        note = reader.text(review, "note", "review")
    return ReviewStatus(
        state=state,
        note=note,
        reviewer=reviewer,
        reviewed_on=reviewed_on if isinstance(reviewed_on, date) else None,
    )


def _sections(reader: _Reader, entry: Mapping[str, Any], key: str) -> TopicSections:
    return TopicSections(
        what_it_is=reader.text(entry, "what", key),
        can_do=reader.texts(entry, "do", key, sizes=range(2, 5)),
        when_to_call=reader.text(entry, "call", key),
        get_help_now=reader.text(entry, "now", key),
    )


def load_language_pack(path: Path) -> LanguagePack:
    """Load and check one language template (templates/prompts/languages/<code>.yaml)."""
    reader = _Reader(path)
    root = reader.mapping(reader.document, "(top level)")
    code = reader.text(root, "code", "")
    if code != path.stem:
        raise reader.fail("code", f"{code!r} must equal the file name {path.stem!r}")
    direction = reader.text(root, "direction", "")
    if direction not in ("ltr", "rtl"):
        raise reader.fail("direction", "must be ltr or rtl")
    script = reader.text(root, "script", "")
    if script not in _SCRIPTS:
        raise reader.fail("script", f"must be one of: {', '.join(_SCRIPTS)}")
    chrome_entry = reader.mapping(root.get("chrome"), "chrome")
    chrome = HandoutChrome(
        **{name: reader.text(chrome_entry, name, "chrome") for name in HandoutChrome.__dataclass_fields__}
    )
    topics: dict[str, LanguageTopic] = {}
    for topic_id, entry in reader.mapping(root.get("topics"), "topics").items():
        key = f"topics.{topic_id}"
        entry = reader.mapping(entry, key)
        topics[str(topic_id)] = LanguageTopic(
            sections=_sections(reader, entry, key),
            synonyms=reader.texts(entry, "synonyms", key, sizes=range(0, 40)),
            title=reader.optional_text(entry, "title", key),
            caption=reader.optional_text(entry, "caption", key),
            alt_text=reader.optional_text(entry, "alt_text", key),
        )
    return LanguagePack(
        code=code,
        name=reader.text(root, "name", ""),
        english_name=reader.text(root, "english_name", ""),
        direction=direction,  # type: ignore[arg-type]  # checked above
        script=script,  # type: ignore[arg-type]  # checked above
        review=_review(reader, root),
        chrome=chrome,
        topics=topics,
    )


def load_language_packs(languages_dir: Path) -> dict[str, LanguagePack]:
    """Every language in LANGUAGE_CODES, in that order; a missing one is an error naming its file."""
    if not languages_dir.is_dir():
        raise LanguageTemplateError(f"{languages_dir}: language template folder is missing")
    return {code: load_language_pack(languages_dir / f"{code}.yaml") for code in LANGUAGE_CODES}


@functools.cache
def default_language_packs() -> Mapping[str, LanguagePack]:
    """The language templates shipped in templates/prompts/languages (loaded once per process)."""
    return load_language_packs(DEFAULT_LANGUAGES_DIR)


def available_languages() -> tuple[LanguagePack, ...]:
    """The languages a handout can be made in, in display order."""
    return tuple(default_language_packs().values())


def language_pack(code: str) -> LanguagePack:
    """The language template for ``code`` (exact code, e.g. "zh-Hans")."""
    packs = default_language_packs()
    if code not in packs:
        raise ValueError(f"unsupported language {code!r}; allowed: {', '.join(packs)}")
    return packs[code]


def language_review_status(code: str) -> ReviewStatus:
    """Whether a medical translator has signed off this language's template."""
    return language_pack(code).review


def match_language_tag(tag: str, codes: Sequence[str] = LANGUAGE_CODES) -> str | None:
    """Our language for a BCP-47 tag: "es-MX" → es, "zh"/"zh-CN"/"zh-Hans-SG" → zh-Hans, "fil" → tl,
    "zh-TW"/"zh-Hant" → None (Traditional script is not available), "de" → None."""
    subtags = [part.lower() for part in re.split(r"[-_]", tag.strip()) if part]
    if not subtags:
        return None
    primary = _ALIASES.get(subtags[0], subtags[0])
    if primary == "zh":
        if "hans" in subtags[1:]:
            return "zh-Hans" if "zh-Hans" in codes else None
        if _TRADITIONAL_CHINESE & set(subtags[1:]):
            return None
        return "zh-Hans" if "zh-Hans" in codes else None
    by_primary = {code.split("-")[0].lower(): code for code in codes}
    return by_primary.get(primary)


def _as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _communication_tags(entry: Mapping[str, Any]) -> tuple[str | None, str | None]:
    concept = _as_mapping(entry.get("language"))
    codings = [_as_mapping(c) for c in concept.get("coding", []) if isinstance(c, Mapping)]
    coding = next((c for c in codings if c.get("system") == _BCP47_SYSTEM and c.get("code")), None)
    coding = coding or next((c for c in codings if isinstance(c.get("code"), str)), None)
    text = concept.get("text") if isinstance(concept.get("text"), str) else None
    display = (coding or {}).get("display") if isinstance((coding or {}).get("display"), str) else None
    code = coding.get("code") if coding and isinstance(coding.get("code"), str) else None
    return code, display or text


def preferred_language(patient: Mapping[str, Any]) -> LanguagePreference:
    """The patient's preferred language (Patient.communication with preferred=true, else the first one),
    matched to ours by BCP-47 tag; a communication with only text is matched by English name."""
    entries = [_as_mapping(e) for e in patient.get("communication", []) if isinstance(e, Mapping)]
    if not entries:
        return LanguagePreference(requested=None, requested_display=None, language=None)
    chosen = next((e for e in entries if e.get("preferred") is True), entries[0])
    code, display = _communication_tags(chosen)
    if code:
        return LanguagePreference(
            requested=code, requested_display=display, language=match_language_tag(code)
        )
    if display:
        by_name = {pack.english_name.lower(): pack.code for pack in available_languages()}
        return LanguagePreference(
            requested=display, requested_display=display, language=by_name.get(display.strip().lower())
        )
    return LanguagePreference(requested=None, requested_display=None, language=None)

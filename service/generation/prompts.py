"""Prompt library (topics, styles, portrait template) and building education and portrait prompts."""

from __future__ import annotations

import difflib
import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Protocol

import yaml

from service.generation.languages import (
    LANGUAGE_CODES,
    SAFE_LOADER,
    LanguagePack,
    LanguageTemplateError,
    TopicSections,
    load_language_packs,
)
from service.generation.readability import GRADED_LANGUAGES, caption_grade
from service.generation.text import (
    TextTokenizer,
    fit_to_token_budget,
    longest_fitting_prefix,
    normalise_free_text,
    token_budget,
    token_count,
)

LANGUAGES = LANGUAGE_CODES
# Topic files carry title, caption and alt text in these languages; the others have theirs in their
# language template (templates/prompts/languages/<code>.yaml), with every language's sections.
TOPIC_FILE_LANGUAGES = ("en", "es")
SNOMED_SYSTEMS = frozenset({"http://snomed.info/sct", "urn:oid:2.16.840.1.113883.6.96"})
ICD10_SYSTEMS = frozenset(
    {
        "http://hl7.org/fhir/sid/icd-10-cm",
        "http://hl7.org/fhir/sid/icd-10",
        "urn:oid:2.16.840.1.113883.6.90",
        "urn:oid:2.16.840.1.113883.6.3",
    }
)
SEPARATOR = ", "
NO_PEOPLE_PROMPT = "no people, objects and simple anatomy only"
NO_PEOPLE_NEGATIVE = "people, person, human figure, face, crowd"
_ICD10_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")
_ICD10_PREFIX = re.compile(r"^[A-Z][0-9][0-9A-Z](\.?[0-9A-Z]{0,3})?$")
# Things that look like identifiers (e-mail, web address, phone/record numbers, dates) are removed from
# free text before it can reach a prompt: the story and condition text are typed by people.
_IDENTIFIER_LIKE = re.compile(
    r"\S+@\S+|\bhttps?://\S+|\bwww\.\S+|\b\d{1,4}[/.-]\d{1,2}[/.-]\d{1,4}\b|[+#]?\d[\d\s().-]{3,}\d|\d{2,}"
)


class PromptLibraryError(ValueError):
    """A template file is missing or malformed; the message names the file and the key."""


@dataclass(frozen=True)
class TopicText:
    """Patient-facing words for one topic in one language: picture words and the handout's sections."""

    title: str
    caption: str
    alt_text: str
    sections: TopicSections | None = None


@dataclass(frozen=True)
class Topic:
    """An education topic: which codes select it, what the picture shows, and its patient-facing text."""

    id: str
    snomed: tuple[str, ...]
    icd10: tuple[str, ...]
    illustration: str
    anatomy: tuple[str, ...]
    avoid_wording: tuple[str, ...]
    negative: str
    text: Mapping[str, TopicText]
    is_fallback: bool = False
    # More specific SNOMED CT concepts (is-a descendants of `snomed`) listed in the topic file: no
    # terminology server is consulted, so the hierarchy the topic covers is written down.
    snomed_descendants: tuple[str, ...] = ()
    # Findings that often lead to this topic (a symptom such as shortness of breath): never a match of
    # their own, only a suggestion among the closest topics when a condition falls back.
    snomed_related: tuple[str, ...] = ()
    # Words an EHR may use for the condition, per language (from the language templates).
    synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class StylePreset:
    """A visual style: prompt suffix, negative prompt, and its label (English; ``labels`` per language)."""

    name: str
    label: str
    labels: Mapping[str, str]
    prompt: str
    negative: str


@dataclass(frozen=True)
class Depiction:
    """How people in a picture look: an explicit choice by the clinician or patient, never inferred
    from race, ethnicity or anything else in the record. "varied" means a mix, not a default person;
    ``show_people=False`` asks for a picture without people (objects and anatomy only)."""

    skin_tone: str = "varied"
    age_group: str = "varied"
    body_type: str = "varied"
    dress: str = "varied"
    setting: str = "varied"
    show_people: bool = True

    ALLOWED: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "skin_tone": ("varied", "light", "medium", "olive", "brown", "dark"),
        "age_group": ("varied", "child", "teen", "adult", "older_adult"),
        "body_type": ("varied", "slim", "average", "larger", "wheelchair_user"),
        "dress": ("varied", "everyday", "modest", "head_covering", "work", "sportswear"),
        "setting": ("varied", "home", "clinic", "outdoors", "community", "workplace"),
    }

    def __post_init__(self) -> None:
        for name, allowed in self.ALLOWED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"Depiction.{name} {value!r} is not allowed; choose one of: {', '.join(allowed)}"
                )

    @classmethod
    def from_choice(cls, choice: str) -> Depiction:
        """Parse a form value: "varied", "none" (no people) or "skin_tone=dark;age_group=older_adult"."""
        choice = choice.strip()
        if choice in ("", "varied"):
            return cls()
        if choice == "none":
            return cls(show_people=False)
        values: dict[str, str] = {}
        for part in choice.replace(",", ";").split(";"):
            name, separator, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not separator or name not in cls.ALLOWED:
                raise ValueError(
                    "depiction must be 'varied', 'none' or name=value pairs separated by ';' with names "
                    f"{', '.join(cls.ALLOWED)}"
                )
            values[name] = value
        return cls(**values)  # type: ignore[arg-type]  # keys checked against ALLOWED above


class PortraitStoryFields(Protocol):
    """What a portrait needs from a story (fhir_adapters.conditions.PortraitStory has these fields)."""

    @property
    def places(self) -> Sequence[str]: ...
    @property
    def colours(self) -> Sequence[str]: ...
    @property
    def symbols(self) -> Sequence[str]: ...
    @property
    def avoid(self) -> Sequence[str]: ...
    @property
    def likeness_consent(self) -> bool: ...
    @property
    def story(self) -> str: ...


@dataclass(frozen=True)
class PortraitStory:
    """The patient's own story and preferences for a therapeutic portrait (from a QuestionnaireResponse)."""

    places: tuple[str, ...] = ()
    colours: tuple[str, ...] = ()
    symbols: tuple[str, ...] = ()
    avoid: tuple[str, ...] = ()
    likeness_consent: bool = False
    story: str = ""


@dataclass(frozen=True)
class EducationPrompt:
    """Everything the engine and the review screen need for one education illustration."""

    positive: str
    negative: str
    topic_id: str
    title: str
    caption: str
    alt_text: str
    language: str
    # None where no reading-grade formula exists for the language (see readability.GRADED_LANGUAGES).
    caption_grade: float | None
    style: str
    sections: TopicSections | None = None
    match: TopicMatch | None = None


@dataclass(frozen=True)
class PortraitPrompt:
    """Prompt and suggested patient-facing words for one therapeutic portrait."""

    positive: str
    negative: str
    style: str
    symbolic: bool
    title: str
    alt_text: str
    language: str


@dataclass(frozen=True)
class _PortraitText:
    title: str
    alt_text_symbolic: str
    alt_text_person: str
    places: str
    colours: str
    symbols: str


@dataclass(frozen=True)
class PortraitTemplate:
    """The portrait template from portrait.yaml."""

    scene_with_consent: str
    negative_with_consent: str
    scene_symbolic: str
    negative_symbolic: str
    places: str
    colours: str
    symbols: str
    story: str
    quality: str
    negative: str
    text: Mapping[str, _PortraitText]


@dataclass(frozen=True)
class _Segment:
    text: str
    # Lower numbers are given up first when the prompt is over budget; None = never dropped.
    drop_order: int | None = None
    trimmable: bool = False


# ---------------------------------------------------------------------------------------------------------
# Loading and validation


class _Reader:
    """Typed access to one parsed YAML document with errors naming the file and the key path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.document = yaml.load(path.read_text(encoding="utf-8"), Loader=SAFE_LOADER)  # noqa: S506
        except FileNotFoundError:
            raise PromptLibraryError(f"{path}: file is missing") from None
        except yaml.YAMLError as error:
            raise PromptLibraryError(f"{path}: not valid YAML ({error.__class__.__name__})") from None

    def fail(self, key: str, problem: str) -> PromptLibraryError:
        return PromptLibraryError(f"{self.path}: {key}: {problem}")

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        return value

    def get(self, parent: Mapping[str, Any], name: str, key: str) -> Any:
        if name not in parent:
            raise self.fail(f"{key}.{name}" if key else name, "missing")
        return parent[name]

    def text(self, parent: Mapping[str, Any], name: str, key: str, *, allow_empty: bool = False) -> str:
        value = self.get(parent, name, key)
        full_key = f"{key}.{name}" if key else name
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(full_key, "expected a non-empty string")
        return value.strip()

    def texts(self, parent: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
        value = self.get(parent, name, key)
        full_key = f"{key}.{name}" if key else name
        if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
            raise self.fail(full_key, "expected a list of non-empty strings")
        return tuple(item.strip() for item in value)


def _term_pattern(term: str) -> re.Pattern[str]:
    words = [re.escape(word) for word in term.split()]
    # Whole words, any whitespace between words, an optional plural ending.
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?:s|es)?(?!\w)", re.IGNORECASE)


@dataclass(frozen=True)
class AvoidTerms:
    """Stigmatising or stereotyping words that never appear in anything we write."""

    terms: tuple[str, ...]
    _patterns: tuple[re.Pattern[str], ...] = field(repr=False, compare=False, default=())
    # One alternation of all terms: most texts contain none, and one search is much cheaper than sixty.
    _any: re.Pattern[str] | None = field(repr=False, compare=False, default=None)

    @classmethod
    def of(cls, terms: Iterable[str]) -> AvoidTerms:
        unique = tuple(dict.fromkeys(term.strip() for term in terms if term.strip()))
        patterns = tuple(_term_pattern(term) for term in unique)
        combined = (
            re.compile("|".join(f"(?:{p.pattern})" for p in patterns), re.IGNORECASE) if patterns else None
        )
        return cls(terms=unique, _patterns=patterns, _any=combined)

    def found_in(self, text: str) -> list[str]:
        """The terms that occur in ``text``."""
        lowered = text.casefold()
        # Plain substring checks first (fast in C): the regex only runs when some term's first word is there.
        if self._any is None or not any(term.split()[0].casefold() in lowered for term in self.terms):
            return []
        if not self._any.search(text):
            return []
        return [
            term for term, pattern in zip(self.terms, self._patterns, strict=True) if pattern.search(text)
        ]

    def scrub(self, text: str) -> str:
        """``text`` with every occurrence of every term removed (repeated until none is left)."""
        while True:
            scrubbed = text
            for pattern in self._patterns:
                scrubbed = pattern.sub(" ", scrubbed)
            scrubbed = _tidy(scrubbed)
            if scrubbed == text:
                return scrubbed
            text = scrubbed


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def _load_avoid_terms(path: Path) -> AvoidTerms:
    reader = _Reader(path)
    root = reader.mapping(reader.document, "(top level)")
    entries = reader.get(root, "terms", "")
    if not isinstance(entries, list) or not entries:
        raise reader.fail("terms", "expected a non-empty list")
    terms = []
    for index, entry in enumerate(entries):
        key = f"terms[{index}]"
        terms.append(reader.text(reader.mapping(entry, key), "term", key))
    return AvoidTerms.of(terms)


def _load_styles(path: Path) -> tuple[StylePreset, ...]:
    reader = _Reader(path)
    root = reader.mapping(reader.document, "(top level)")
    entries = reader.get(root, "styles", "")
    if not isinstance(entries, list) or not entries:
        raise reader.fail("styles", "expected a non-empty list")
    styles: list[StylePreset] = []
    for index, entry in enumerate(entries):
        key = f"styles[{index}]"
        entry = reader.mapping(entry, key)
        name = reader.text(entry, "name", key)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise reader.fail(f"{key}.name", f"{name!r} must be lower_snake_case")
        if any(style.name == name for style in styles):
            raise reader.fail(f"{key}.name", f"duplicate style name {name!r}")
        labels = reader.mapping(reader.get(entry, "label", key), f"{key}.label")
        label_by_language = {
            language: reader.text(labels, language, f"{key}.label") for language in TOPIC_FILE_LANGUAGES
        }
        # Labels are for the clinician's page; a language without its own label shows the English one.
        for language in LANGUAGES:
            label_by_language.setdefault(
                language,
                reader.text(labels, language, f"{key}.label")
                if language in labels
                else label_by_language["en"],
            )
        styles.append(
            StylePreset(
                name=name,
                label=label_by_language["en"],
                labels=label_by_language,
                prompt=reader.text(entry, "prompt", key),
                negative=reader.text(entry, "negative", key),
            )
        )
    return tuple(styles)


def _load_common(path: Path) -> tuple[str, str, Mapping[str, Mapping[str, str]]]:
    reader = _Reader(path)
    root = reader.mapping(reader.document, "(top level)")
    education = reader.mapping(reader.get(root, "education", ""), "education")
    quality = reader.text(education, "quality", "education")
    negative = reader.text(education, "negative", "education")
    depiction = reader.mapping(reader.get(root, "depiction", ""), "depiction")
    phrases: dict[str, dict[str, str]] = {}
    for attribute, allowed in Depiction.ALLOWED.items():
        values = reader.mapping(reader.get(depiction, attribute, "depiction"), f"depiction.{attribute}")
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise reader.fail(
                f"depiction.{attribute}", f"unknown values {unknown}; allowed: {', '.join(allowed)}"
            )
        phrases[attribute] = {
            value: reader.text(values, value, f"depiction.{attribute}", allow_empty=True) for value in allowed
        }
    return quality, negative, phrases


def _topic_text(reader: _Reader, topic: Mapping[str, Any]) -> dict[str, TopicText]:
    """Title, caption and alt text from the topic file (English, Spanish); the other languages and every
    language's sections are added from the language templates by :func:`_with_languages`."""
    texts = reader.mapping(reader.get(topic, "text", ""), "text")
    result = {}
    for language in TOPIC_FILE_LANGUAGES:
        key = f"text.{language}"
        entry = reader.mapping(reader.get(texts, language, "text"), key)
        result[language] = TopicText(
            title=reader.text(entry, "title", key),
            caption=reader.text(entry, "caption", key),
            alt_text=reader.text(entry, "alt_text", key),
        )
    return result


def _with_languages(topic: Topic, packs: Mapping[str, LanguagePack], avoid: AvoidTerms) -> Topic:
    """The topic with every language's words and sections and its synonyms, checked for completeness."""
    text: dict[str, TopicText] = {}
    synonyms: dict[str, tuple[str, ...]] = {}
    own_terms = AvoidTerms.of(topic.avoid_wording)
    for code, pack in packs.items():
        where = f"{code}.yaml: topics.{topic.id}"
        entry = pack.topics.get(topic.id)
        if entry is None:
            raise PromptLibraryError(f"{where}: missing (every topic needs its sections in every language)")
        own = (entry.title, entry.caption, entry.alt_text)
        if code in TOPIC_FILE_LANGUAGES:
            if any(value is not None for value in own):
                raise PromptLibraryError(
                    f"{where}: title, caption and alt_text of {code} belong in the topic file {topic.id}.yaml"
                )
            words = topic.text[code]
        else:
            if entry.title is None or entry.caption is None or entry.alt_text is None:
                raise PromptLibraryError(f"{where}: needs title, caption and alt_text")
            words = TopicText(title=entry.title, caption=entry.caption, alt_text=entry.alt_text)
        if topic.is_fallback and entry.synonyms:
            raise PromptLibraryError(f"{where}: synonyms: the fallback topic matches nothing by name")
        checked = {**entry.sections.texts(), "title": words.title, "caption": words.caption}
        # One search over all of a language's words (most have none); the field is looked up on a hit.
        if avoid.found_in("\n".join(checked.values())) or own_terms.found_in("\n".join(checked.values())):
            for name, value in checked.items():
                found = avoid.found_in(value) + own_terms.found_in(value)
                if found:
                    raise PromptLibraryError(f"{where}: {name} uses wording to avoid: {', '.join(found)}")
        text[code] = TopicText(words.title, words.caption, words.alt_text, entry.sections)
        synonyms[code] = entry.synonyms
    return Topic(
        id=topic.id,
        snomed=topic.snomed,
        icd10=topic.icd10,
        illustration=topic.illustration,
        anatomy=topic.anatomy,
        avoid_wording=topic.avoid_wording,
        negative=topic.negative,
        text=text,
        is_fallback=topic.is_fallback,
        snomed_descendants=topic.snomed_descendants,
        snomed_related=topic.snomed_related,
        synonyms=synonyms,
    )


def _validate_icd10_pattern(reader: _Reader, pattern: str, key: str) -> str:
    pattern = pattern.upper()
    if "-" in pattern:
        start, _, end = pattern.partition("-")
        if not (_ICD10_PREFIX.match(start) and _ICD10_PREFIX.match(end)) or _icd_key(start) > _icd_key(end):
            raise reader.fail(key, f"{pattern!r} is not an ICD-10 range like 'I10-I16'")
    elif pattern.endswith("*"):
        if not _ICD10_PREFIX.match(pattern.rstrip("*").rstrip(".")):
            raise reader.fail(key, f"{pattern!r} is not an ICD-10 prefix like 'E11.*'")
    elif not _ICD10_CODE.match(pattern):
        raise reader.fail(key, f"{pattern!r} is not an ICD-10 code like 'E11.9'")
    return pattern


def _check_wording(reader: _Reader, texts: Mapping[str, str], avoid: AvoidTerms, own: Sequence[str]) -> None:
    own_terms = AvoidTerms.of(own)
    for key, text in texts.items():
        found = avoid.found_in(text) + own_terms.found_in(text)
        if found:
            raise reader.fail(key, f"uses wording to avoid: {', '.join(found)}")


def _load_topic(path: Path, avoid: AvoidTerms) -> Topic:
    reader = _Reader(path)
    topic = reader.mapping(reader.document, "(top level)")
    topic_id = reader.text(topic, "id", "")
    if topic_id != path.stem:
        raise reader.fail("id", f"{topic_id!r} must equal the file name {path.stem!r}")
    codes = reader.mapping(reader.get(topic, "codes", ""), "codes")
    snomed = reader.texts(codes, "snomed", "codes")
    for index, code in enumerate(snomed):
        if not code.isdigit() or not 6 <= len(code) <= 18:
            raise reader.fail(f"codes.snomed[{index}]", f"{code!r} is not a SNOMED CT concept id")
    descendants = reader.texts(codes, "snomed_descendants", "codes") if "snomed_descendants" in codes else ()
    related = reader.texts(codes, "snomed_related", "codes") if "snomed_related" in codes else ()
    for name, listed in (("snomed_descendants", descendants), ("snomed_related", related)):
        for index, code in enumerate(listed):
            if not code.isdigit() or not 6 <= len(code) <= 18:
                raise reader.fail(f"codes.{name}[{index}]", f"{code!r} is not a SNOMED CT concept id")
    icd10 = tuple(
        _validate_icd10_pattern(reader, pattern, f"codes.icd10[{index}]")
        for index, pattern in enumerate(reader.texts(codes, "icd10", "codes"))
    )
    if not snomed and not icd10:
        raise reader.fail("codes", "needs at least one SNOMED CT or ICD-10 code")
    result = Topic(
        id=topic_id,
        snomed=snomed,
        icd10=icd10,
        illustration=reader.text(topic, "illustration", ""),
        anatomy=reader.texts(topic, "anatomy", ""),
        avoid_wording=reader.texts(topic, "avoid_wording", ""),
        negative=reader.text(topic, "negative", ""),
        text=_topic_text(reader, topic),
        snomed_descendants=descendants,
        snomed_related=related,
    )
    wording = {"illustration": result.illustration, "anatomy": SEPARATOR.join(result.anatomy)}
    for language, text in result.text.items():
        for name in ("title", "caption", "alt_text"):
            wording[f"text.{language}.{name}"] = getattr(text, name)
    _check_wording(reader, wording, avoid, result.avoid_wording)
    return result


def _load_fallback(path: Path, avoid: AvoidTerms) -> tuple[Topic, str]:
    reader = _Reader(path)
    topic = reader.mapping(reader.document, "(top level)")
    illustration = reader.text(topic, "illustration", "")
    if "{condition}" not in illustration:
        raise reader.fail("illustration", "must contain the placeholder {condition}")
    result = Topic(
        id=reader.text(topic, "id", ""),
        snomed=(),
        icd10=(),
        illustration=illustration,
        anatomy=reader.texts(topic, "anatomy", ""),
        avoid_wording=(),
        negative=reader.text(topic, "negative", ""),
        text=_topic_text(reader, topic),
        is_fallback=True,
    )
    without_condition = reader.text(topic, "illustration_without_condition", "")
    wording = {"illustration": illustration, "illustration_without_condition": without_condition}
    for language, text in result.text.items():
        for name in ("title", "caption", "alt_text"):
            wording[f"text.{language}.{name}"] = getattr(text, name)
    _check_wording(reader, wording, avoid, ())
    return result, without_condition


def _load_portrait(path: Path) -> PortraitTemplate:
    reader = _Reader(path)
    root = reader.mapping(
        reader.get(reader.mapping(reader.document, "(top level)"), "portrait", ""), "portrait"
    )
    consented = reader.mapping(reader.get(root, "with_likeness_consent", "portrait"), "with_likeness_consent")
    symbolic = reader.mapping(
        reader.get(root, "without_likeness_consent", "portrait"), "without_likeness_consent"
    )
    for name in ("places", "colours", "symbols"):
        if "{items}" not in reader.text(root, name, "portrait"):
            raise reader.fail(f"portrait.{name}", "must contain the placeholder {items}")
    if "{story}" not in reader.text(root, "story", "portrait"):
        raise reader.fail("portrait.story", "must contain the placeholder {story}")
    texts = reader.mapping(reader.get(root, "text", "portrait"), "portrait.text")
    text = {}
    for language in LANGUAGES:
        if language not in TOPIC_FILE_LANGUAGES and language not in texts:
            continue  # filled with English below; the portrait words are drafted language by language
        key = f"portrait.text.{language}"
        entry = reader.mapping(reader.get(texts, language, "portrait.text"), key)
        text[language] = _PortraitText(
            **{f.name: reader.text(entry, f.name, key) for f in fields(_PortraitText)}
        )
    for language in LANGUAGES:
        text.setdefault(language, text["en"])
    return PortraitTemplate(
        scene_with_consent=reader.text(consented, "scene", "portrait.with_likeness_consent"),
        negative_with_consent=reader.text(
            consented, "negative", "portrait.with_likeness_consent", allow_empty=True
        ),
        scene_symbolic=reader.text(symbolic, "scene", "portrait.without_likeness_consent"),
        negative_symbolic=reader.text(symbolic, "negative", "portrait.without_likeness_consent"),
        places=reader.text(root, "places", "portrait"),
        colours=reader.text(root, "colours", "portrait"),
        symbols=reader.text(root, "symbols", "portrait"),
        story=reader.text(root, "story", "portrait"),
        quality=reader.text(root, "quality", "portrait"),
        negative=reader.text(root, "negative", "portrait"),
        text=text,
    )


# ---------------------------------------------------------------------------------------------------------
# Code matching


def _icd_key(code: str) -> str:
    return code.upper().replace(".", "").strip()


@dataclass(frozen=True)
class _IcdRule:
    topic: Topic
    kind: str  # exact | prefix | range
    start: str
    end: str

    def matches(self, code: str) -> bool:
        if self.kind == "exact":
            return code == self.start
        if self.kind == "prefix":
            return code.startswith(self.start)
        # Ranges are inclusive and cover every code below their end points (I10-I16 includes I16.1).
        return self.start <= code[: len(self.start)] and code[: len(self.end)] <= self.end

    @property
    def specificity(self) -> float:
        # A longer prefix is more specific; a range counts as slightly less specific than a prefix of the
        # same length (it spans several categories).
        return len(self.start) - (0.5 if self.kind == "range" else 0.0)


def _icd_rule(topic: Topic, pattern: str) -> _IcdRule:
    if "-" in pattern:
        start, _, end = pattern.partition("-")
        return _IcdRule(topic, "range", _icd_key(start), _icd_key(end))
    if pattern.endswith("*"):
        return _IcdRule(topic, "prefix", _icd_key(pattern.rstrip("*")), "")
    return _IcdRule(topic, "exact", _icd_key(pattern), "")


class MatchKind(StrEnum):
    """How a condition found its topic."""

    SNOMED = "snomed"  # a SNOMED CT code listed in the topic
    SNOMED_DESCENDANT = "snomed-descendant"  # a more specific SNOMED CT concept listed in the topic
    ICD10 = "icd10"  # an ICD-10 code, prefix or range of the topic
    SYNONYM = "synonym"  # the condition's text names the topic (any language)
    FALLBACK = "fallback"  # nothing matched: the generic topic
    CLINICIAN = "clinician"  # nothing matched, and the clinician chose the topic (one of the closest)


@dataclass(frozen=True)
class TopicMatch:
    """Which topic a condition gets, how, and (for the generic fallback) the closest real topics."""

    topic: Topic
    kind: MatchKind
    matched: str | None = None  # the code or the synonym that matched
    closest: tuple[Topic, ...] = ()

    @property
    def is_fallback(self) -> bool:
        return self.kind is MatchKind.FALLBACK

    def label(self, language: str = "en") -> str | None:
        """The topic's name for a condition without display text (None for the fallback)."""
        if self.is_fallback:
            return None
        words = self.topic.text.get(language) or self.topic.text["en"]
        return words.title


# Condition text that mentions a condition without the patient having it: never matched by name.
_NOT_THE_PATIENTS = re.compile(
    r"\b(family history|history of|fh of|rule out|ruled out|r/o|screening|no evidence of|negative for|"
    r"antecedentes familiares|antecedente familiar|descartad[oa]|descartar|sin evidencia de)\b",
    re.IGNORECASE,
)
_ARABIC_FOLDS = str.maketrans({"أ": "ا", "إ": "ا", "آ": "ا", "ٱ": "ا", "ى": "ي", "ـ": None})
_CLOSEST_MIN_SCORE = 0.5
_CLOSEST_COUNT = 3
# Topic matches kept per library (distinct codes and text); texts longer than a condition's name are not.
MATCH_CACHE_SIZE = 4096
MATCH_CACHE_MAX_TEXT = 300
# Words that say nothing about which condition it is.
_GENERIC_WORDS = frozenset(
    {
        *("disorder", "disease", "syndrome", "condition", "problem", "problems", "trouble", "chronic"),
        *("acute", "unspecified", "other", "the", "and", "with", "without", "of", "due", "to", "in", "on"),
        *("enfermedad", "trastorno", "sindrome", "cronico", "cronica", "aguda", "de", "del", "la", "el"),
    }
)


def _same_stem(word: str, name: str) -> bool:
    """Whether two words share a stem: a common prefix of at least 3/4 of the shorter (and 4 letters)."""
    shorter = min(len(word), len(name))
    prefix = next((index for index, (a, b) in enumerate(zip(word, name, strict=False)) if a != b), shorter)
    return prefix >= 4 and prefix >= 0.75 * shorter


def match_form(text: str) -> str:
    """Text as synonyms are compared: NFKC, case-folded, accents and Arabic vowel marks dropped,
    punctuation to spaces ("Anaemia, iron-deficiency" → "anaemia iron deficiency")."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    stripped = "".join(c for c in unicodedata.normalize("NFD", folded) if unicodedata.category(c) != "Mn")
    stripped = unicodedata.normalize("NFC", stripped).translate(_ARABIC_FOLDS)
    return " ".join(re.sub(r"[\W_]+", " ", stripped).split())


def _is_unspaced(form: str) -> bool:
    # Chinese is written without spaces and Korean attaches particles to nouns: match inside words.
    return any("\u3400" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7a3" for c in form)


@dataclass(frozen=True)
class _Synonym:
    form: str
    topic: Topic
    unspaced: bool
    # How often each character occurs in the form: bounds how alike a text can be (see _ratio_bound).
    characters: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def found_in(self, padded_text: str) -> bool:
        return self.form in padded_text if self.unspaced else f" {self.form} " in padded_text


def _ratio_bound(text: str, counts: Mapping[str, int], synonym: _Synonym) -> float:
    """An upper bound of ``difflib.SequenceMatcher(None, text, synonym.form).ratio()`` (its
    ``quick_ratio``: the characters the two have in common, counted with repeats), without building the
    matcher. The same formula as ``ratio()`` over at least as many matches, so never below it."""
    matches = sum(min(count, counts.get(character, 0)) for character, count in synonym.characters.items())
    return 2.0 * matches / (len(text) + len(synonym.form)) if text or synonym.form else 1.0


# ---------------------------------------------------------------------------------------------------------
# The library


@dataclass(frozen=True)
class PromptLibrary:
    """All prompt templates, validated. Build it with :func:`load_prompt_library`."""

    topics: tuple[Topic, ...]
    fallback: Topic
    fallback_without_condition: str
    styles: tuple[StylePreset, ...]
    avoid_terms: AvoidTerms
    education_quality: str
    education_negative: str
    depiction_phrases: Mapping[str, Mapping[str, str]]
    portrait: PortraitTemplate
    # Styles for portraits (portrait_styles.yaml), a set apart from the education styles.
    portrait_styles: tuple[StylePreset, ...] = ()
    _by_snomed: Mapping[str, Topic] = field(repr=False, default_factory=dict)
    _icd_exact: Mapping[str, Topic] = field(repr=False, default_factory=dict)
    _icd_rules: tuple[_IcdRule, ...] = field(repr=False, default=())
    languages: Mapping[str, LanguagePack] = field(repr=False, default_factory=dict)
    _by_descendant: Mapping[str, Topic] = field(repr=False, default_factory=dict)
    # Longest first, so "type 2 diabetes" wins over a shorter synonym found in the same text.
    _synonyms: tuple[_Synonym, ...] = field(repr=False, default=())
    _cached_match: Callable[[tuple[tuple[str, str], ...], str, bool], TopicMatch] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # A page lists every active condition, and the same conditions come back on every load (and
        # across patients): each distinct (codes, text) is matched once per process, at most
        # MATCH_CACHE_SIZE kept (least recently used dropped). Keys hold codes and condition text only,
        # never who the patient is; memory only. The library is immutable, so a kept match stays right.
        cached = functools.lru_cache(maxsize=MATCH_CACHE_SIZE)(self._match_topic)
        object.__setattr__(self, "_cached_match", cached)

    @property
    def style_names(self) -> tuple[str, ...]:
        return tuple(style.name for style in self.styles)

    def style(self, name: str) -> StylePreset:
        """The style preset called ``name``."""
        for style in self.styles:
            if style.name == name:
                return style
        raise ValueError(f"unknown style {name!r}; allowed: {', '.join(self.style_names)}")

    def portrait_style(self, name: str) -> StylePreset:
        """The portrait style called ``name`` (portrait_styles.yaml)."""
        for style in self.portrait_styles:
            if style.name == name:
                return style
        allowed = ", ".join(style.name for style in self.portrait_styles)
        raise ValueError(f"unknown style {name!r} for a portrait; allowed: {allowed}")

    def topic(self, topic_id: str) -> Topic:
        """The topic with id ``topic_id`` (the fallback's id included)."""
        for topic in (*self.topics, self.fallback):
            if topic.id == topic_id:
                return topic
        raise ValueError(f"unknown topic {topic_id!r}")

    def topic_for(self, codes: Sequence[tuple[str, str]], text: str) -> Topic:
        """The topic for a condition (see :meth:`match_topic`)."""
        return self.match_topic(codes, text).topic

    def match_topic(
        self, codes: Sequence[tuple[str, str]], text: str, *, with_closest: bool = True
    ) -> TopicMatch:
        """The topic for a condition: SNOMED CT exact, else a listed SNOMED CT descendant, else ICD-10
        exact, else the most specific ICD-10 prefix or range, else the longest topic synonym (any language)
        found in the condition's text, else the fallback topic with the closest topics. Codes come first:
        they are what the EHR coded. Text that says the condition is not the patient's own ("family
        history of …", "ruled out") is never matched by name. ``codes`` are (system, code) pairs.
        Matches are kept per process (see __post_init__); a text too long to be a condition's name is
        matched every time rather than kept."""
        key = tuple((system, code) for system, code in codes)
        if len(text) > MATCH_CACHE_MAX_TEXT:
            return self._match_topic(key, text, with_closest)
        return self._cached_match(key, text, with_closest)

    def _match_topic(self, codes: tuple[tuple[str, str], ...], text: str, with_closest: bool) -> TopicMatch:
        snomed = [code.strip() for system, code in codes if system in SNOMED_SYSTEMS]
        icd10 = [_icd_key(code) for system, code in codes if system in ICD10_SYSTEMS]
        for code in snomed:
            if code in self._by_snomed:
                return TopicMatch(self._by_snomed[code], MatchKind.SNOMED, code)
        for code in snomed:
            if code in self._by_descendant:
                return TopicMatch(self._by_descendant[code], MatchKind.SNOMED_DESCENDANT, code)
        for code in icd10:
            if code in self._icd_exact:
                return TopicMatch(self._icd_exact[code], MatchKind.ICD10, code)
        best: tuple[_IcdRule, str] | None = None
        for code in icd10:
            for rule in self._icd_rules:
                if (
                    rule.kind != "exact"
                    and rule.matches(code)
                    and (best is None or rule.specificity > best[0].specificity)
                ):
                    best = (rule, code)
        if best:
            return TopicMatch(best[0].topic, MatchKind.ICD10, best[1])
        form = match_form(text)
        if form and not _NOT_THE_PATIENTS.search(form):
            named = self._named_in(form)
            if named is not None:
                return TopicMatch(named.topic, MatchKind.SYNONYM, named.form)
        closest = self._closest(form, icd10, snomed) if with_closest else ()
        return TopicMatch(self.fallback, MatchKind.FALLBACK, None, closest)

    def _closest(self, form: str, icd10: Sequence[str], snomed: Sequence[str] = ()) -> tuple[Topic, ...]:
        """Up to three topics: those listing a SNOMED CT code as related, those whose names share the most
        words with the text (word stems, so "hypertensive" meets "hypertension"), or that share the
        ICD-10 block of a code."""
        words = [word for word in form.split() if len(word) > 2 and word not in _GENERIC_WORDS]
        scores: dict[str, float] = {
            topic.id: 1.0 for topic in self.topics if set(topic.snomed_related) & set(snomed)
        }
        block_rules = [rule for rule in self._icd_rules if any(code[:2] == rule.start[:2] for code in icd10)]
        in_block = {rule.topic.id for rule in block_rules}
        counts = Counter(form)

        def can_change(topic_id: str, bound: float) -> bool:
            # Whether a score of at most ``bound`` can change the outcome: it must beat the topic's score
            # so far, and reach the list's minimum unless the topic's ICD-10 block adds to it below. The
            # exact (costly) ratio is worked out only then; the list is the same as scoring every one.
            return bound > scores.get(topic_id, 0.0) and (bound >= _CLOSEST_MIN_SCORE or topic_id in in_block)

        for synonym in self._candidates(form, words) if form else ():
            if synonym.unspaced:
                # Chinese and Korean: how alike they are, once the characters in common allow it.
                if not can_change(synonym.topic.id, _ratio_bound(form, counts, synonym)):
                    continue
                score = difflib.SequenceMatcher(None, form, synonym.form).ratio()
            else:
                if not words:
                    continue
                names = synonym.form.split()
                shared = sum(any(_same_stem(word, name) for name in names) for word in words) / len(words)
                if not shared or not can_change(
                    synonym.topic.id, shared + 0.2 * _ratio_bound(form, counts, synonym)
                ):
                    continue
                score = shared + 0.2 * difflib.SequenceMatcher(None, form, synonym.form).ratio()
            scores[synonym.topic.id] = max(scores.get(synonym.topic.id, 0.0), score)
        for rule in block_rules:
            scores[rule.topic.id] = scores.get(rule.topic.id, 0.0) + 0.5
        ranked = sorted(
            (topic for topic in self.topics if scores.get(topic.id, 0.0) >= _CLOSEST_MIN_SCORE),
            key=lambda topic: -scores[topic.id],
        )
        return tuple(ranked[:_CLOSEST_COUNT])

    @functools.cached_property
    def _stem_index(self) -> Mapping[str, tuple[_Synonym, ...]]:
        """Spaced synonyms by the first four letters of each of their words (two words share a stem only
        when they share at least four leading letters: see _same_stem)."""
        index: dict[str, list[_Synonym]] = {}
        for synonym in self._synonyms:
            if not synonym.unspaced:
                for name in {name for name in synonym.form.split() if len(name) >= 4}:
                    index.setdefault(name[:4], []).append(synonym)
        return {key: tuple(value) for key, value in index.items()}

    @functools.cached_property
    def _positions(self) -> Mapping[int, int]:
        """Each synonym's place in the longest-first order (by id: synonyms are compared by identity)."""
        return {id(synonym): position for position, synonym in enumerate(self._synonyms)}

    @functools.cached_property
    def _spaced_by_first_word(self) -> Mapping[str, tuple[tuple[str, ...], ...]]:
        """The words of each spaced synonym, by its first word."""
        index: dict[str, list[tuple[str, ...]]] = {}
        for synonym in self._synonyms:
            if not synonym.unspaced:
                words = tuple(synonym.form.split())
                index.setdefault(words[0], []).append(words)
        return {key: tuple(value) for key, value in index.items()}

    @functools.cached_property
    def _spaced_by_words(self) -> Mapping[tuple[str, ...], _Synonym]:
        return {tuple(synonym.form.split()): synonym for synonym in self._synonyms if not synonym.unspaced}

    @functools.cached_property
    def _unspaced_by_character(self) -> Mapping[str, tuple[_Synonym, ...]]:
        """Unspaced (Chinese, Korean) synonyms by each character they contain."""
        index: dict[str, list[_Synonym]] = {}
        for synonym in self._synonyms:
            if synonym.unspaced:
                for character in set(synonym.form):
                    index.setdefault(character, []).append(synonym)
        return {key: tuple(value) for key, value in index.items()}

    def _unspaced_sharing(self, form: str) -> list[_Synonym]:
        """The unspaced synonyms with a character in common with the text, in the longest-first order."""
        found = {id(s): s for c in set(form) for s in self._unspaced_by_character.get(c, ())}
        return sorted(found.values(), key=lambda synonym: self._positions[id(synonym)])

    def _named_in(self, form: str) -> _Synonym | None:
        """The first synonym (longest first) found in the text: a spaced one as whole words, an unspaced
        one anywhere. The same as trying every synonym in turn, with only those that can be found tried:
        spaced ones starting with one of the text's words, unspaced ones sharing a character."""
        words = form.split()
        found: list[_Synonym] = []
        for start, word in enumerate(words):
            for names in self._spaced_by_first_word.get(word, ()):
                if tuple(words[start : start + len(names)]) == names:
                    found.append(self._spaced_by_words[names])
        found.extend(synonym for synonym in self._unspaced_sharing(form) if synonym.form in form)
        return min(found, key=lambda synonym: self._positions[id(synonym)], default=None)

    def _candidates(self, form: str, words: Sequence[str]) -> list[_Synonym]:
        """The synonyms that can score for these words: the unspaced ones with a character in common
        (scored by characters; the others score 0) and the spaced ones sharing a four-letter stem start:
        the others would score 0 (about 15 ms a condition when all ~2,000 synonyms were compared word by
        word)."""
        seen: set[int] = set()
        found = self._unspaced_sharing(form)
        for word in words:
            for synonym in self._stem_index.get(word[:4], ()) if len(word) >= 4 else ():
                if id(synonym) not in seen:
                    seen.add(id(synonym))
                    found.append(synonym)
        return found

    def sections(self, topic_id: str | None, language: str) -> TopicSections | None:
        """The handout sections of a topic in a language (None for no or an unknown topic: a portrait)."""
        if not topic_id:
            return None
        try:
            words = self.topic(topic_id).text.get(language)
        except ValueError:
            return None
        return words.sections if words else None

    def condition_label(
        self, text: str, codes: Sequence[tuple[str, str]], *, language: str = "en", unspecified: str = ""
    ) -> str:
        """What to call a condition on a page: its own text, else (no text, or only the placeholder
        ``unspecified``) the name of the topic its codes match, else the text as given."""
        if text.strip() and text != unspecified:
            return text
        return self.match_topic(codes, "").label(language) or text


def load_prompt_library(templates_dir: Path) -> PromptLibrary:
    """Load and validate templates/prompts (the folder itself, or the templates folder that contains it)."""
    prompts_dir = templates_dir / "prompts" if (templates_dir / "prompts").is_dir() else templates_dir
    if not prompts_dir.is_dir():
        raise PromptLibraryError(f"{prompts_dir}: prompt template folder is missing")
    avoid = _load_avoid_terms(prompts_dir / "avoid_terms.yaml")
    styles = _load_styles(prompts_dir / "styles.yaml")
    quality, negative, phrases = _load_common(prompts_dir / "common.yaml")
    fallback, fallback_without_condition = _load_fallback(prompts_dir / "fallback.yaml", avoid)
    portrait = _load_portrait(prompts_dir / "portrait.yaml")
    portrait_styles = _load_styles(prompts_dir / "portrait_styles.yaml")
    topic_files = sorted((prompts_dir / "topics").glob("*.yaml"))
    if not topic_files:
        raise PromptLibraryError(f"{prompts_dir / 'topics'}: no topic files (*.yaml)")
    try:
        packs = load_language_packs(prompts_dir / "languages")
    except LanguageTemplateError as error:
        raise PromptLibraryError(str(error)) from None
    fallback = _with_languages(fallback, packs, avoid)
    topics = tuple(_with_languages(_load_topic(path, avoid), packs, avoid) for path in topic_files)
    known = {topic.id for topic in topics} | {fallback.id}
    for code, pack in packs.items():
        unknown = sorted(set(pack.topics) - known)
        if unknown:
            raise PromptLibraryError(f"{code}.yaml: topics: no topic file for {', '.join(unknown)}")

    by_snomed: dict[str, Topic] = {}
    icd_exact: dict[str, Topic] = {}
    rules: list[_IcdRule] = []
    owners: dict[str, str] = {}
    by_descendant: dict[str, Topic] = {}
    for topic, path in zip(topics, topic_files, strict=True):
        if topic.id == fallback.id:
            raise PromptLibraryError(f"{path}: id: {topic.id!r} is reserved for the fallback topic")
        for code in topic.snomed:
            if code in by_snomed:
                raise PromptLibraryError(
                    f"{path}: codes.snomed: {code} is already used by topic {by_snomed[code].id!r}"
                )
            by_snomed[code] = topic
        for code in topic.snomed_descendants:
            if code in by_snomed or code in by_descendant:
                owner = (by_snomed.get(code) or by_descendant[code]).id
                raise PromptLibraryError(
                    f"{path}: codes.snomed_descendants: {code} is already used by topic {owner!r}"
                )
            by_descendant[code] = topic
        for pattern in topic.icd10:
            rule = _icd_rule(topic, pattern)
            signature = f"{rule.kind}:{rule.start}-{rule.end}"
            if signature in owners:
                raise PromptLibraryError(
                    f"{path}: codes.icd10: {pattern} is already used by topic {owners[signature]!r}"
                )
            owners[signature] = topic.id
            if rule.kind == "exact":
                icd_exact[rule.start] = topic
            rules.append(rule)
    return PromptLibrary(
        topics=topics,
        fallback=fallback,
        fallback_without_condition=fallback_without_condition,
        styles=styles,
        avoid_terms=avoid,
        education_quality=quality,
        education_negative=negative,
        depiction_phrases=phrases,
        portrait=portrait,
        portrait_styles=portrait_styles,
        _by_snomed=by_snomed,
        _icd_exact=icd_exact,
        _icd_rules=tuple(rules),
        languages=packs,
        _by_descendant=by_descendant,
        _synonyms=_synonym_index(topics),
    )


def _synonym_index(topics: Sequence[Topic]) -> tuple[_Synonym, ...]:
    """Every topic synonym in match form, longest first; one name may not point at two topics."""
    owner: dict[str, Topic] = {}
    for topic in topics:
        for code, names in topic.synonyms.items():
            for name in names:
                form = match_form(name)
                if not form:
                    raise PromptLibraryError(f"{code}.yaml: topics.{topic.id}.synonyms: {name!r} is empty")
                if form in owner and owner[form].id != topic.id:
                    raise PromptLibraryError(
                        f"{code}.yaml: topics.{topic.id}.synonyms: {name!r} already names {owner[form].id!r}"
                    )
                owner[form] = topic
    # English titles name their topic too ("High blood pressure"), unless another topic claims the words.
    for topic in topics:
        owner.setdefault(match_form(topic.text["en"].title.split(":")[0]), topic)
    ordered = sorted(owner.items(), key=lambda item: (-len(item[0]), item[0]))
    return tuple(_Synonym(form, topic, _is_unspaced(form), Counter(form)) for form, topic in ordered)


# ---------------------------------------------------------------------------------------------------------
# Building prompts


def _check_language(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; allowed: {', '.join(LANGUAGES)}")
    return language


def _remove_identifier_like(text: str) -> str:
    return _tidy(_IDENTIFIER_LIKE.sub(" ", text))


def _clean_free_text(text: str, *, max_chars: int, avoid: AvoidTerms) -> str:
    return avoid.scrub(_remove_identifier_like(normalise_free_text(text, max_chars=max_chars)))


def depiction_phrase(library: PromptLibrary, depiction: Depiction) -> str:
    """The words that describe people in the picture for this depiction choice."""
    if not depiction.show_people:
        return NO_PEOPLE_PROMPT
    phrases = [
        library.depiction_phrases[attribute][getattr(depiction, attribute)] for attribute in Depiction.ALLOWED
    ]
    return "people shown with dignity, " + SEPARATOR.join(phrase for phrase in phrases if phrase)


def _join(segments: Iterable[_Segment]) -> str:
    return SEPARATOR.join(segment.text for segment in segments if segment.text)


def _compose(segments: Sequence[_Segment], *, tokenizer: TextTokenizer | None) -> str:
    """Join segments; over the token budget, give up optional ones (lowest drop_order first; a trimmable
    segment is shortened before it is dropped), then trim whatever is left as a last resort."""
    current = [segment for segment in segments if segment.text]
    if tokenizer is None:
        return _join(current)
    budget = token_budget(tokenizer=tokenizer)

    def fits(candidate: Sequence[_Segment]) -> bool:
        return token_count(_join(candidate), tokenizer=tokenizer) <= budget

    optional = sorted((s for s in current if s.drop_order is not None), key=lambda s: s.drop_order or 0)
    for segment in optional:
        if fits(current):
            break
        index = current.index(segment)
        if segment.trimmable:

            def fits_with(text: str, index: int = index) -> bool:
                return fits([*current[:index], _Segment(text), *current[index + 1 :]])

            shortened = longest_fitting_prefix(segment.text, fits=fits_with)
            current[index] = _Segment(shortened)
        else:
            del current[index]
    if not fits(current):
        # Only required segments are left and still too long: shorten the trimmable ones, last first.
        for index in reversed(range(len(current))):
            if fits(current):
                break
            if not current[index].trimmable:
                continue

            def fits_required(text: str, index: int = index) -> bool:
                return fits([*current[:index], _Segment(text, trimmable=True), *current[index + 1 :]])

            current[index] = _Segment(longest_fitting_prefix(current[index].text, fits=fits_required))
    return fit_to_token_budget(_join(current), tokenizer=tokenizer)


def _negative(parts: Iterable[str], *, tokenizer: TextTokenizer | None) -> str:
    seen: dict[str, None] = {}
    for part in parts:
        for item in part.split(","):
            item = item.strip()
            if item and item.lower() not in (existing.lower() for existing in seen):
                seen[item] = None
    negative = SEPARATOR.join(seen)
    return fit_to_token_budget(negative, tokenizer=tokenizer) if tokenizer is not None else negative


def build_education_prompt(
    *,
    library: PromptLibrary,
    condition_text: str,
    codes: Sequence[tuple[str, str]],
    style: str,
    language: str,
    depiction: Depiction,
    tokenizer: TextTokenizer | None,
    topic_override: str | None = None,
) -> EducationPrompt:
    """Prompt, negative prompt and patient-facing words for one condition.

    Only the condition's codes (and, for an unknown code, its normalised text) enter the prompt: no
    patient identifier is ever an input. With a tokenizer, both prompts fit its budget. ``topic_override``
    (a topic id the clinician chose; the workflow decides when that is allowed) replaces the matched topic
    for the picture, the words and the handout's sections; an unknown id is a ValueError.
    """
    _check_language(language)
    preset = library.style(style)
    if topic_override is not None:
        chosen = library.topic(topic_override)
        if chosen.is_fallback:
            raise ValueError("the generic topic is not a topic to choose")
        match = TopicMatch(chosen, MatchKind.CLINICIAN, chosen.id)
    else:
        # The closest topics are for the page before generating; the prompt itself does not need them.
        match = library.match_topic(codes, condition_text, with_closest=False)
    topic = match.topic
    if topic.is_fallback:
        condition = _clean_free_text(condition_text, max_chars=120, avoid=library.avoid_terms)
        subject = (
            topic.illustration.replace("{condition}", condition)
            if condition
            else library.fallback_without_condition
        )
    else:
        subject = topic.illustration
    anatomy = f"showing {SEPARATOR.join(topic.anatomy)}" if topic.anatomy else ""
    # Most important first: a caller that later trims the tail (for another tokenizer) loses the least.
    positive = _compose(
        [
            _Segment(subject, trimmable=True),
            _Segment(preset.prompt),
            _Segment(depiction_phrase(library, depiction), drop_order=3),
            _Segment(anatomy, drop_order=2),
            _Segment(library.education_quality, drop_order=1),
        ],
        tokenizer=tokenizer,
    )
    negative = _negative(
        [
            library.education_negative,
            preset.negative,
            topic.negative,
            "" if depiction.show_people else NO_PEOPLE_NEGATIVE,
        ],
        tokenizer=tokenizer,
    )
    words = topic.text[language]
    return EducationPrompt(
        positive=positive,
        negative=negative,
        topic_id=topic.id,
        title=words.title,
        caption=words.caption,
        alt_text=words.alt_text,
        language=language,
        caption_grade=caption_grade(words.caption, language) if language in GRADED_LANGUAGES else None,
        style=preset.name,
        sections=words.sections,
        match=match,
    )


def _clean_items(items: Sequence[str], *, avoid: AvoidTerms) -> list[str]:
    cleaned = (_clean_free_text(item, max_chars=60, avoid=avoid) for item in items[:8])
    return list(dict.fromkeys(item for item in cleaned if item))


def build_portrait_prompt(
    *,
    library: PromptLibrary,
    story: PortraitStoryFields,
    style: str,
    depiction: Depiction,
    tokenizer: TextTokenizer | None,
    language: str = "en",
) -> PortraitPrompt:
    """Prompt for a therapeutic portrait from the patient's story.

    The things to avoid go only to the negative prompt and are scrubbed from every positive part (places,
    colours, symbols, story, even template words). Without likeness consent the scene is symbolic and
    non-identifying. Free text is normalised and stripped of identifier-like strings.
    """
    _check_language(language)
    preset = library.portrait_style(style)
    template = library.portrait
    avoid_items = [normalise_free_text(item, max_chars=60) for item in story.avoid[:20]]
    avoid_items = [item for item in avoid_items if item]
    # Patient wishes and the shared stigmatising-terms list are both kept out of the positive prompt.
    keep_out = AvoidTerms.of([*avoid_items, *library.avoid_terms.terms])
    places = _clean_items(story.places, avoid=keep_out)
    colours = _clean_items(story.colours, avoid=keep_out)
    symbols = _clean_items(story.symbols, avoid=keep_out)
    story_text = _clean_free_text(story.story, max_chars=400, avoid=keep_out)
    symbolic = not story.likeness_consent

    def listed(pattern: str, items: Sequence[str]) -> str:
        return pattern.replace("{items}", SEPARATOR.join(items)) if items else ""

    story_segment = template.story.replace("{story}", story_text) if story_text else ""
    segments = [
        _Segment(template.scene_symbolic if symbolic else template.scene_with_consent),
        _Segment(preset.prompt),
        _Segment(listed(template.places, places), drop_order=5),
        _Segment(listed(template.symbols, symbols), drop_order=6),
        _Segment(listed(template.colours, colours), drop_order=4),
        _Segment(depiction_phrase(library, depiction), drop_order=3),
        _Segment(story_segment, drop_order=2, trimmable=True),
        _Segment(template.quality, drop_order=1),
    ]
    scrubbed = [_Segment(keep_out.scrub(s.text), s.drop_order, s.trimmable) for s in segments]
    positive = keep_out.scrub(_compose(scrubbed, tokenizer=tokenizer))
    negative = _negative(
        [
            SEPARATOR.join(avoid_items),
            template.negative_symbolic if symbolic else template.negative_with_consent,
            template.negative,
            preset.negative,
            "" if depiction.show_people else NO_PEOPLE_NEGATIVE,
        ],
        tokenizer=tokenizer,
    )
    words = template.text[language]
    alt_parts = [words.alt_text_symbolic if symbolic else words.alt_text_person]
    alt_parts += [
        listed(words.places, places),
        listed(words.symbols, symbols),
        listed(words.colours, colours),
    ]
    alt_text = normalise_free_text(" ".join(part for part in alt_parts if part), max_chars=300)
    return PortraitPrompt(
        positive=positive,
        negative=negative,
        style=preset.name,
        symbolic=symbolic,
        title=words.title,
        alt_text=alt_text.rstrip(".") + ".",
        language=language,
    )

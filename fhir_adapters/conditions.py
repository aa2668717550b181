"""Pure mapping from FHIR Condition, Patient and QuestionnaireResponse JSON to small display objects."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fhir_adapters.text import clean_text

UNSPECIFIED_CONDITION = "unspecified condition"
_ACTIVE_CLINICAL_STATUSES = frozenset({"active", "recurrence", "relapse"})
_EXCLUDED_VERIFICATION_STATUSES = frozenset({"refuted", "entered-in-error"})
_MRN_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v2-0203"
_MAX_STORY_ANSWERS = 20


@dataclass(frozen=True)
class Coding:
    """One code of a CodeableConcept."""

    system: str | None
    code: str | None
    display: str | None


@dataclass(frozen=True)
class ConditionSummary:
    """What the UI and the prompt builder need from a Condition."""

    id: str | None
    text: str
    clinical_status: str | None
    verification_status: str | None
    category: tuple[str, ...]
    onset: str | None
    codes: tuple[Coding, ...]
    is_active: bool

    def codes_in(self, system: str) -> tuple[str, ...]:
        """Codes from one code system (e.g. http://snomed.info/sct), in the resource's order."""
        return tuple(c.code for c in self.codes if c.system == system and c.code)


@dataclass(frozen=True)
class PatientBanner:
    """Just enough to show a patient banner; nothing of it goes into prompts or logs."""

    display_name: str
    birth_date: str | None
    gender: str | None
    identifier: str | None


@dataclass(frozen=True)
class EncounterSummary:
    """The visit CareCanvas was launched in: shown next to the banner, referenced by written documents."""

    id: str
    status: str | None
    kind: str | None
    start: str | None


def summarize_encounter(resource: Mapping[str, Any]) -> EncounterSummary:
    """Status, class (R4: a Coding) or first type text, and the start of the period."""
    if resource.get("resourceType") != "Encounter":
        raise ValueError("expected an Encounter resource")
    encounter_class = _as_mapping(resource.get("class"))
    types = resource.get("type") if isinstance(resource.get("type"), list) else []
    first_type = _as_mapping(types[0] if types else None)
    kind = encounter_class.get("display") or first_type.get("text") or encounter_class.get("code")
    period = _as_mapping(resource.get("period"))
    start = period.get("start")
    return EncounterSummary(
        id=str(resource.get("id", "")),
        status=clean_text(resource.get("status"), max_length=40) or None,
        kind=clean_text(kind, max_length=80) or None,
        start=clean_text(start[:10], max_length=10) if isinstance(start, str) else None,
    )


@dataclass(frozen=True)
class PortraitStory:
    """The patient's own story and preferences for a therapeutic portrait."""

    places: tuple[str, ...]
    colours: tuple[str, ...]
    symbols: tuple[str, ...]
    avoid: tuple[str, ...]
    likeness_consent: bool
    story: str


def _as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _codings(concept: object) -> tuple[Coding, ...]:
    result = []
    for coding in _as_list(_as_mapping(concept).get("coding")):
        coding = _as_mapping(coding)
        system, code, display = coding.get("system"), coding.get("code"), coding.get("display")
        result.append(
            Coding(
                system=system if isinstance(system, str) else None,
                code=code if isinstance(code, str) else None,
                display=clean_text(display) or None,
            )
        )
    return tuple(result)


def _first_code(concept: object) -> str | None:
    for coding in _codings(concept):
        if coding.code:
            return coding.code
    return None


def concept_text(concept: object) -> str:
    """CodeableConcept text, else its first coding display, else "" (callers choose the fallback)."""
    text = clean_text(_as_mapping(concept).get("text"))
    if text:
        return text
    for coding in _codings(concept):
        if coding.display:
            return coding.display
    return ""


def _onset(resource: Mapping[str, Any]) -> str | None:
    for key in ("onsetDateTime", "onsetString"):
        value = resource.get(key)
        if isinstance(value, str) and value:
            return clean_text(value, max_length=64)
    start = _as_mapping(resource.get("onsetPeriod")).get("start")
    if isinstance(start, str) and start:
        return clean_text(start, max_length=64)
    age = _as_mapping(resource.get("onsetAge"))
    if isinstance(age.get("value"), int | float):
        unit = age.get("unit") or age.get("code") or "years"
        return clean_text(f"age {age['value']} {unit}", max_length=64)
    return None


def summarize_condition(resource: Mapping[str, Any]) -> ConditionSummary:
    """Summarise a Condition; the text is never empty and never "None"."""
    if resource.get("resourceType") != "Condition":
        raise ValueError("summarize_condition expects a Condition resource")
    clinical = _first_code(resource.get("clinicalStatus"))
    verification = _first_code(resource.get("verificationStatus"))
    abated = any(key.startswith("abatement") for key in resource)
    if verification in _EXCLUDED_VERIFICATION_STATUSES:
        is_active = False
    elif clinical is None:
        # R4 lets clinicalStatus be absent; with no abatement we show the condition rather than hide it.
        is_active = not abated
    else:
        is_active = clinical in _ACTIVE_CLINICAL_STATUSES
    categories = []
    for concept in _as_list(resource.get("category")):
        label = _first_code(concept) or concept_text(concept)
        if label:
            categories.append(label)
    resource_id = resource.get("id")
    return ConditionSummary(
        id=resource_id if isinstance(resource_id, str) else None,
        text=concept_text(resource.get("code")) or UNSPECIFIED_CONDITION,
        clinical_status=clinical,
        verification_status=verification,
        category=tuple(categories),
        onset=_onset(resource),
        codes=_codings(resource.get("code")),
        is_active=is_active,
    )


def _human_name(name: Mapping[str, Any]) -> str:
    text = clean_text(name.get("text"))
    if text:
        return text
    parts = [p for p in _as_list(name.get("given")) if isinstance(p, str)]
    family = name.get("family")
    if isinstance(family, str):
        parts.append(family)
    return clean_text(" ".join(parts))


def person_name(resource: Mapping[str, Any]) -> str | None:
    """A Practitioner's (or any person's) name: official, else usual, else first; None when it has none."""
    names = [_as_mapping(n) for n in _as_list(resource.get("name"))]
    names.sort(key=lambda n: {"official": 0, "usual": 1}.get(str(n.get("use")), 2))
    for name in names:
        text = _human_name(name)
        if text:
            prefix = " ".join(p for p in _as_list(name.get("prefix")) if isinstance(p, str))
            return clean_text(f"{prefix} {text}" if prefix and not clean_text(name.get("text")) else text)
    return None


def summarize_patient(resource: Mapping[str, Any]) -> PatientBanner:
    """Banner fields of a Patient: official (else usual, else first) name, birth date, gender, MRN."""
    if resource.get("resourceType") != "Patient":
        raise ValueError("summarize_patient expects a Patient resource")
    names = [_as_mapping(n) for n in _as_list(resource.get("name"))]
    names.sort(key=lambda n: {"official": 0, "usual": 1}.get(str(n.get("use")), 2))
    display_name = next((text for text in (_human_name(n) for n in names) if text), "") or "Unnamed patient"
    identifiers = [_as_mapping(i) for i in _as_list(resource.get("identifier"))]

    def is_mrn(identifier: Mapping[str, Any]) -> bool:
        codings = _codings(identifier.get("type"))
        return any(c.system == _MRN_TYPE_SYSTEM and c.code == "MR" for c in codings)

    chosen = next((i for i in identifiers if is_mrn(i)), identifiers[0] if identifiers else None)
    identifier = clean_text(chosen.get("value"), max_length=64) if chosen else ""
    birth_date, gender = resource.get("birthDate"), resource.get("gender")
    return PatientBanner(
        display_name=display_name,
        birth_date=clean_text(birth_date, max_length=10) or None,
        gender=clean_text(gender, max_length=16) or None,
        identifier=identifier or None,
    )


def _items(items: object) -> Iterator[Mapping[str, Any]]:
    for item in _as_list(items):
        item = _as_mapping(item)
        yield item
        yield from _items(item.get("item"))
        for answer in _as_list(item.get("answer")):
            yield from _items(_as_mapping(answer).get("item"))


def _answer_texts(item: Mapping[str, Any], *, max_length: int, split_commas: bool) -> list[str]:
    texts: list[str] = []
    for answer in _as_list(item.get("answer"))[:_MAX_STORY_ANSWERS]:
        answer = _as_mapping(answer)
        if isinstance(answer.get("valueString"), str):
            # A comma-separated single answer is a list typed into one box.
            pieces = answer["valueString"].split(",") if split_commas else [answer["valueString"]]
            texts.extend(clean_text(p, max_length=max_length) for p in pieces)
        elif "valueCoding" in answer:
            coding = _as_mapping(answer["valueCoding"])
            texts.append(clean_text(coding.get("display") or coding.get("code"), max_length=max_length))
    return [t for t in texts if t][:_MAX_STORY_ANSWERS]


def summarize_story(questionnaire_response: Mapping[str, Any]) -> PortraitStory:
    """Read linkIds places/colours/symbols/avoid/likeness-consent/story (nested groups allowed)."""
    if questionnaire_response.get("resourceType") != "QuestionnaireResponse":
        raise ValueError("summarize_story expects a QuestionnaireResponse resource")
    lists: dict[str, list[str]] = {"places": [], "colours": [], "symbols": [], "avoid": []}
    consent = False
    story_parts: list[str] = []
    for item in _items(questionnaire_response.get("item")):
        link_id = item.get("linkId")
        if link_id in lists:
            lists[link_id].extend(_answer_texts(item, max_length=80, split_commas=True))
        elif link_id == "likeness-consent":
            # Consent counts only when explicitly true; anything else means no likeness.
            consent = any(_as_mapping(a).get("valueBoolean") is True for a in _as_list(item.get("answer")))
        elif link_id == "story":
            story_parts.extend(_answer_texts(item, max_length=2000, split_commas=False))
    return PortraitStory(
        places=tuple(lists["places"][:_MAX_STORY_ANSWERS]),
        colours=tuple(lists["colours"][:_MAX_STORY_ANSWERS]),
        symbols=tuple(lists["symbols"][:_MAX_STORY_ANSWERS]),
        avoid=tuple(lists["avoid"][:_MAX_STORY_ANSWERS]),
        likeness_consent=consent,
        story=clean_text(" ".join(story_parts), max_length=2000),
    )

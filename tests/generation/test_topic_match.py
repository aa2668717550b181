"""Every condition finds its topic: codes (SNOMED CT, listed descendants, ICD-10), then synonyms in any of
the eight languages for text-only conditions; the generic fallback says so and names the closest topics."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.generation.prompts import (
    Depiction,
    MatchKind,
    PromptLibrary,
    build_education_prompt,
    load_prompt_library,
    match_form,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"


@pytest.fixture(scope="module")
def library() -> PromptLibrary:
    return load_prompt_library(TEMPLATES)


@pytest.mark.parametrize(
    ("text", "topic_id"),
    [
        ("Iron deficiency anaemia", "anaemia"),  # the sandbox condition that got generic filler
        ("Anemia, iron-deficiency", "anaemia"),
        ("Diabetes mellitus type 2 (disorder)", "type-2-diabetes"),
        ("T1DM", "type-1-diabetes"),
        ("Gestational diabetes mellitus", "gestational-diabetes"),  # longer name beats a shorter one
        ("Essential hypertension", "hypertension"),
        ("Hipertensión arterial", "hypertension"),
        ("anemia ferropenica", "anaemia"),  # accents do not matter
        ("Tăng huyết áp", "hypertension"),
        ("Alta presyon", "hypertension"),
        ("فقر الدم", "anaemia"),
        ("الربو", "asthma"),
        ("2型糖尿病", "type-2-diabetes"),
        ("患者有高血压", "hypertension"),  # Chinese has no spaces: matched inside the text
        ("고혈압이 있음", "hypertension"),  # Korean particles attach to the noun
        ("Гипертоническая болезнь", "hypertension"),
        ("Left hip fracture", "fracture"),
        ("Parkinson's disease", "parkinsons-disease"),
    ],
)
def test_text_only_conditions_find_their_topic_by_name(
    library: PromptLibrary, text: str, topic_id: str
) -> None:
    match = library.match_topic([], text)
    assert (match.topic.id, match.kind) == (topic_id, MatchKind.SYNONYM)
    assert match.matched


@pytest.mark.parametrize(
    "text",
    [
        "Family history of stroke",
        "Asthma ruled out",
        "Screening for diabetes",
        "Antecedentes familiares de asma",
    ],
)
def test_text_that_is_not_the_patients_condition_is_not_matched(library: PromptLibrary, text: str) -> None:
    assert library.match_topic([], text).is_fallback


def test_codes_come_before_text(library: PromptLibrary) -> None:
    match = library.match_topic([(SNOMED, "195967001")], "Iron deficiency anaemia")
    assert (match.topic.id, match.kind, match.matched) == ("asthma", MatchKind.SNOMED, "195967001")
    icd = library.match_topic([(ICD10, "I10")], "Asthma")
    assert (icd.topic.id, icd.kind) == ("hypertension", MatchKind.ICD10)


@pytest.mark.parametrize(
    ("code", "topic_id"),
    [
        ("4473006", "migraine"),
        ("1201005", "hypertension"),
        ("282825002", "atrial-fibrillation"),
        ("36923009", "depression"),
    ],
)
def test_listed_snomed_descendants_find_their_parent_topic(
    library: PromptLibrary, code: str, topic_id: str
) -> None:
    match = library.match_topic([(SNOMED, code)], "")
    assert (match.topic.id, match.kind) == (topic_id, MatchKind.SNOMED_DESCENDANT)


def test_icd10_ranges_cover_codes_inside_them(library: PromptLibrary) -> None:
    assert library.match_topic([(ICD10, "D51.0")], "").topic.id == "anaemia"  # D50-D53
    assert library.match_topic([(ICD10, "I25.10")], "").topic.id == "coronary-artery-disease"  # I20-I25


def test_a_code_without_display_is_called_by_its_topic(library: PromptLibrary) -> None:
    unspecified = "unspecified condition"
    codes = [(SNOMED, "44054006")]
    label = library.condition_label(unspecified, codes, unspecified=unspecified)
    assert label == "Type 2 diabetes: how your body uses sugar"
    assert library.condition_label("", codes, language="es").startswith("Diabetes tipo 2")
    assert library.condition_label("My own words", codes) == "My own words"
    # No topic for the code (267036007 is a finding CareCanvas has no topic for): the text stays.
    assert (
        library.condition_label(unspecified, [(SNOMED, "267036007")], unspecified=unspecified) == unspecified
    )


def test_the_generic_fallback_says_so_and_offers_the_closest_topics(library: PromptLibrary) -> None:
    match = library.match_topic([], "Diabetes")
    assert match.is_fallback
    assert match.kind is MatchKind.FALLBACK
    assert match.label() is None
    closest = [topic.id for topic in match.closest]
    assert {"type-1-diabetes", "type-2-diabetes"} <= set(closest)
    assert len(closest) <= 3
    heart = [topic.id for topic in library.match_topic([], "Heart trouble").closest]
    assert "heart-failure" in heart
    assert library.match_topic([], "Xyzzy plugh").closest == ()


def test_education_prompt_carries_the_match_the_sections_and_a_grade_only_where_measured(
    library: PromptLibrary,
) -> None:
    arguments = {
        "library": library,
        "codes": [],
        "style": "flat_vector",
        "depiction": Depiction(),
        "tokenizer": None,
    }
    english = build_education_prompt(condition_text="Iron deficiency anaemia", language="en", **arguments)  # type: ignore[arg-type]
    assert english.topic_id == "anaemia"
    assert english.match is not None
    assert english.match.kind is MatchKind.SYNONYM
    assert english.sections is not None
    assert english.caption_grade is not None
    assert english.caption_grade <= 6
    vietnamese = build_education_prompt(condition_text="Thiếu máu", language="vi", **arguments)  # type: ignore[arg-type]
    assert vietnamese.topic_id == "anaemia"
    assert vietnamese.caption.startswith("Hồng cầu")
    assert vietnamese.caption_grade is None  # no formula for Vietnamese: not a made-up number


def test_match_form_folds_case_accents_punctuation_and_arabic_marks() -> None:
    assert match_form("  Anaemia, IRON-deficiency ") == "anaemia iron deficiency"
    assert match_form("Hipertensión") == "hipertension"
    assert match_form("فَقْر الدَّم") == "فقر الدم"
    assert match_form("고혈압") == "고혈압"  # Hangul syllables survive the accent folding


def test_sections_of_a_topic_for_the_handout(library: PromptLibrary) -> None:
    sections = library.sections("asthma", "ar")
    assert sections is not None
    assert sections.what_it_is.startswith("الربو")
    assert library.sections(None, "en") is None  # a portrait has no topic
    assert library.sections("no-such-topic", "en") is None


def test_a_finding_without_a_topic_suggests_the_topics_that_list_it(library: PromptLibrary) -> None:
    # The sandbox's display-less 267036007 (shortness of breath): no topic of its own, never matched to
    # one, but the page can offer the topics that list it as related.
    match = library.match_topic([(SNOMED, "267036007")], "unspecified condition")
    assert match.is_fallback
    assert {topic.id for topic in match.closest} == {"asthma", "copd", "heart-failure"}


def test_a_topic_the_clinician_chose_makes_the_picture_the_words_and_the_sections(
    library: PromptLibrary,
) -> None:
    arguments = {
        "library": library,
        "codes": [(SNOMED, "267036007")],  # shortness of breath: no topic of its own
        "condition_text": "unspecified condition",
        "style": "flat_vector",
        "depiction": Depiction(),
        "tokenizer": None,
    }
    generic = build_education_prompt(language="en", **arguments)  # type: ignore[arg-type]
    assert generic.topic_id == library.fallback.id
    asthma = library.topic("asthma")
    for language in ("en", "ar"):
        chosen = build_education_prompt(language=language, topic_override="asthma", **arguments)  # type: ignore[arg-type]
        assert chosen.topic_id == "asthma"
        assert chosen.match is not None
        assert (chosen.match.kind, chosen.match.is_fallback) == (MatchKind.CLINICIAN, False)
        assert (chosen.title, chosen.caption) == (asthma.text[language].title, asthma.text[language].caption)
        assert chosen.sections == library.sections("asthma", language)
        assert chosen.sections != library.sections(library.fallback.id, language)
        assert asthma.illustration.split(",")[0] in chosen.positive
    with pytest.raises(ValueError, match="unknown topic"):
        build_education_prompt(language="en", topic_override="no-such-topic", **arguments)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="generic topic"):
        build_education_prompt(language="en", topic_override=library.fallback.id, **arguments)  # type: ignore[arg-type]

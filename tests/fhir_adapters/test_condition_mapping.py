"""Condition, Patient and QuestionnaireResponse mapping, including hostile text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fhir_adapters import clean_text, summarize_condition, summarize_patient, summarize_story

SNOMED = "http://snomed.info/sct"


def condition(**fields: object) -> dict[str, object]:
    return {"resourceType": "Condition", "id": "cond-1", **fields}


def status(code: str) -> dict[str, object]:
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": code}]}


def test_text_prefers_code_text() -> None:
    summary = summarize_condition(
        condition(
            code={
                "text": "Type 2 diabetes",
                "coding": [{"system": SNOMED, "code": "44054006", "display": "DM2"}],
            },
            clinicalStatus=status("active"),
            category=[{"coding": [{"code": "problem-list-item"}]}],
            onsetDateTime="2019-04-01",
        )
    )
    assert summary.text == "Type 2 diabetes"
    assert summary.codes_in(SNOMED) == ("44054006",)
    assert summary.is_active
    assert summary.category == ("problem-list-item",)
    assert summary.onset == "2019-04-01"


def test_text_falls_back_to_first_display_then_fixed_text() -> None:
    with_display = condition(code={"coding": [{"code": "x"}, {"code": "y", "display": "Asthma"}]})
    assert summarize_condition(with_display).text == "Asthma"
    for code in [
        None,
        {},
        {"text": None},
        {"text": "   "},
        {"coding": [{"code": "44054006"}]},
        {"text": "\u200b\u202e"},
    ]:
        summary = summarize_condition(condition(code=code) if code is not None else condition())
        assert summary.text == "unspecified condition"
        assert "None" not in summary.text


def test_control_zero_width_and_bidi_characters_are_removed() -> None:
    hostile = "\u202eHyper\u200btension\u202c\x00\x07\n\t  (essential)\ufeff\u2066"
    assert summarize_condition(condition(code={"text": hostile})).text == "Hypertension (essential)"


def test_text_is_capped() -> None:
    text = summarize_condition(condition(code={"text": "a" * 1000})).text
    assert len(text) == 200
    assert text.endswith("…")


@given(st.text())
def test_clean_text_never_leaves_invisible_characters(value: str) -> None:
    import unicodedata

    cleaned = clean_text(value, max_length=50)
    assert len(cleaned) <= 50
    assert cleaned == cleaned.strip()
    assert "  " not in cleaned
    assert all(unicodedata.category(ch) not in {"Cc", "Cf", "Co", "Cs", "Cn"} for ch in cleaned)


@pytest.mark.parametrize(
    ("fields", "active"),
    [
        ({"clinicalStatus": status("active")}, True),
        ({"clinicalStatus": status("recurrence")}, True),
        ({"clinicalStatus": status("resolved")}, False),
        ({"clinicalStatus": status("active"), "verificationStatus": status("entered-in-error")}, False),
        ({"clinicalStatus": status("active"), "verificationStatus": status("refuted")}, False),
        ({}, True),
        ({"abatementDateTime": "2020-01-01"}, False),
    ],
)
def test_is_active(fields: dict[str, object], active: bool) -> None:
    assert summarize_condition(condition(**fields)).is_active is active


def test_onset_variants() -> None:
    assert summarize_condition(condition(onsetPeriod={"start": "2020-02"})).onset == "2020-02"
    assert summarize_condition(condition(onsetAge={"value": 40, "unit": "a"})).onset == "age 40 a"
    assert summarize_condition(condition()).onset is None


def test_wrong_resource_types_are_refused() -> None:
    with pytest.raises(ValueError, match="Condition"):
        summarize_condition({"resourceType": "Patient"})
    with pytest.raises(ValueError, match="Patient"):
        summarize_patient({"resourceType": "Condition"})
    with pytest.raises(ValueError, match="QuestionnaireResponse"):
        summarize_story({"resourceType": "Questionnaire"})


def test_patient_banner() -> None:
    banner = summarize_patient(
        {
            "resourceType": "Patient",
            "name": [
                {"use": "nickname", "given": ["Bob"]},
                {"use": "official", "given": ["Robert", "J"], "family": "Doe\u202e"},
            ],
            "birthDate": "1970-01-02",
            "gender": "male",
            "identifier": [
                {"value": "SSN-1"},
                {
                    "type": {
                        "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]
                    },
                    "value": "MRN-42",
                },
            ],
        }
    )
    assert banner.display_name == "Robert J Doe"
    assert (banner.birth_date, banner.gender, banner.identifier) == ("1970-01-02", "male", "MRN-42")
    empty = summarize_patient({"resourceType": "Patient"})
    assert empty.display_name == "Unnamed patient"
    assert empty.identifier is None


def test_story() -> None:
    story = summarize_story(
        {
            "resourceType": "QuestionnaireResponse",
            "item": [
                {"linkId": "places", "answer": [{"valueString": "the sea, my garden"}]},
                {
                    "linkId": "prefs",
                    "item": [
                        {
                            "linkId": "colours",
                            "answer": [
                                {"valueCoding": {"code": "blue", "display": "Blue"}},
                                {"valueString": "gold"},
                            ],
                        },
                        {"linkId": "symbols", "answer": [{"valueString": "lighthouse\u200b"}]},
                    ],
                },
                {"linkId": "avoid", "answer": [{"valueString": "needles"}]},
                {"linkId": "likeness-consent", "answer": [{"valueBoolean": True}]},
                {"linkId": "story", "answer": [{"valueString": "I sail,\nevery summer."}]},
            ],
        }
    )
    assert story.places == ("the sea", "my garden")
    assert story.colours == ("Blue", "gold")
    assert story.symbols == ("lighthouse",)
    assert story.avoid == ("needles",)
    assert story.likeness_consent is True
    assert story.story == "I sail, every summer."


def test_story_consent_requires_explicit_true() -> None:
    for answer in ([], [{"valueBoolean": False}], [{"valueString": "yes"}]):
        qr = {
            "resourceType": "QuestionnaireResponse",
            "item": [{"linkId": "likeness-consent", "answer": answer}],
        }
        assert summarize_story(qr).likeness_consent is False


def test_encounter_summary_for_the_banner() -> None:
    from fhir_adapters import summarize_encounter

    summary = summarize_encounter(
        {
            "resourceType": "Encounter",
            "id": "enc-1",
            "status": "in-progress",
            "class": {"code": "AMB", "display": "ambulatory"},
            "period": {"start": "2026-06-02T14:30:00Z"},
        }
    )
    assert (summary.id, summary.status, summary.kind, summary.start) == (
        "enc-1",
        "in-progress",
        "ambulatory",
        "2026-06-02",
    )
    bare = summarize_encounter({"resourceType": "Encounter", "id": "e", "status": "finished\u202e"})
    assert (bare.kind, bare.start, bare.status) == (None, None, "finished")
    with pytest.raises(ValueError, match="Encounter"):
        summarize_encounter({"resourceType": "Patient"})

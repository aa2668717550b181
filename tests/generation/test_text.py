"""Free-text normalisation and token-budget fitting, with the real CLIP tokenizer class."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import pytest
from _tokenizer import build_tiny_clip_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from service.generation.text import fit_to_token_budget, normalise_free_text, token_budget, token_count

INVISIBLE = [
    *(chr(c) for c in range(0x200B, 0x2010)),
    *(chr(c) for c in range(0x202A, 0x202F)),
    *(chr(c) for c in range(0x2066, 0x206A)),
    "\ufeff",
]


def has_forbidden_character(text: str) -> bool:
    return any(
        char in INVISIBLE or (unicodedata.category(char) in {"Cc", "Cf", "Cs", "Co", "Cn"}) for char in text
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return build_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.mark.parametrize("invisible", INVISIBLE, ids=[f"U+{ord(c):04X}" for c in INVISIBLE])
def test_zero_width_and_bidi_controls_are_removed(invisible: str) -> None:
    assert normalise_free_text(f"in{invisible}sulin") == "insulin"


def test_control_characters_removed_and_whitespace_collapsed() -> None:
    assert (
        normalise_free_text("  my\x00 dog\x07\t\n\r  and\u00a0 my\u2028garden \x1b[31m ")
        == "my dog and my garden [31m"
    )


def test_nfkc_folds_compatibility_forms() -> None:
    assert normalise_free_text("ﬁsh ＡＢＣ ①") == "fish ABC 1"


def test_length_cap_cuts_at_a_word_boundary() -> None:
    assert normalise_free_text("alpha beta gamma", max_chars=12) == "alpha beta"
    assert normalise_free_text("supercalifragilistic", max_chars=5) == "super"


def test_length_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_chars must be at least 1"):
        normalise_free_text("x", max_chars=0)


@settings(max_examples=300, deadline=None)
@given(text=st.text(), max_chars=st.integers(min_value=1, max_value=300))
def test_normalised_text_is_clean_capped_and_idempotent(text: str, max_chars: int) -> None:
    result = normalise_free_text(text, max_chars=max_chars)
    assert not has_forbidden_character(result)
    assert len(result) <= max_chars
    assert result == result.strip()
    assert "  " not in result
    assert normalise_free_text(result, max_chars=max_chars) == result


def test_text_that_fits_is_returned_unchanged(tokenizer: CLIPTokenizer) -> None:
    assert fit_to_token_budget("a calm picture", tokenizer=tokenizer) == "a calm picture"


def test_long_text_is_trimmed_at_a_word_boundary_within_the_model_limit(tokenizer: CLIPTokenizer) -> None:
    text = ", ".join(f"word{index} thing" for index in range(60))
    fitted = fit_to_token_budget(text, tokenizer=tokenizer)
    assert len(tokenizer(fitted).input_ids) <= tokenizer.model_max_length == 77
    assert text.startswith(fitted)
    assert text[len(fitted)] in " ,"  # cut between words, never inside one
    assert not fitted.endswith(",")
    # One more word would not have fitted: the cut is as late as possible.
    next_word_end = text.index(" ", len(fitted) + 2)
    assert len(tokenizer(text[:next_word_end]).input_ids) > 77


def test_max_tokens_tightens_but_never_exceeds_the_model_limit(tokenizer: CLIPTokenizer) -> None:
    text = "the thing " * 40
    assert (
        token_count(fit_to_token_budget(text, tokenizer=tokenizer, max_tokens=20), tokenizer=tokenizer) <= 20
    )
    assert token_budget(tokenizer=tokenizer, max_tokens=10_000) == 77


def test_budget_smaller_than_the_begin_and_end_markers_is_refused(tokenizer: CLIPTokenizer) -> None:
    with pytest.raises(ValueError, match="smaller than the 2 tokens"):
        fit_to_token_budget("anything", tokenizer=tokenizer, max_tokens=1)


def test_a_single_overlong_word_is_cut_by_characters(tokenizer: CLIPTokenizer) -> None:
    word = "x" * 200
    fitted = fit_to_token_budget(word, tokenizer=tokenizer)
    assert fitted
    assert word.startswith(fitted)
    assert len(tokenizer(fitted).input_ids) == 77


def test_a_model_with_a_longer_limit_keeps_more(tmp_path: Path) -> None:
    roomy = build_tiny_clip_tokenizer(tmp_path, model_max_length=300)
    text = "the thing " * 40
    assert fit_to_token_budget(text, tokenizer=roomy) == text


@settings(max_examples=120, deadline=None)
@given(text=st.text(min_size=0, max_size=400), max_tokens=st.integers(min_value=2, max_value=90))
def test_fitted_text_is_within_budget_idempotent_and_never_longer(
    tokenizer: CLIPTokenizer, text: str, max_tokens: int
) -> None:
    clean = normalise_free_text(text)
    fitted = fit_to_token_budget(clean, tokenizer=tokenizer, max_tokens=max_tokens)
    assert len(tokenizer(fitted).input_ids) <= min(max_tokens, 77)
    assert len(fitted) <= len(clean)
    assert clean.startswith(fitted)
    assert not has_forbidden_character(fitted)
    assert fit_to_token_budget(fitted, tokenizer=tokenizer, max_tokens=max_tokens) == fitted

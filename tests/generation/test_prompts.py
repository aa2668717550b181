"""Prompt library: loading and validation, code matching, education and portrait prompts, representation."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from _tokenizer import build_tiny_clip_tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from fhir_adapters.conditions import PortraitStory as FhirPortraitStory
from service.generation.prompts import (
    Depiction,
    PortraitStory,
    PromptLibrary,
    PromptLibraryError,
    build_education_prompt,
    build_portrait_prompt,
    depiction_phrase,
    load_prompt_library,
)
from service.generation.readability import caption_grade, fernandez_huerta
from service.generation.text import token_count

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
REQUIRED_TOPICS = {
    "type-2-diabetes", "type-1-diabetes", "hypertension", "asthma", "copd", "heart-failure",
    "chronic-kidney-disease", "osteoarthritis", "rheumatoid-arthritis", "depression", "anxiety", "stroke",
    "atrial-fibrillation", "coronary-artery-disease", "hyperlipidaemia", "obesity", "hypothyroidism",
    "migraine", "epilepsy", "gerd", "irritable-bowel-syndrome", "back-pain", "osteoporosis", "pneumonia",
    "urinary-tract-infection", "gout", "psoriasis", "eczema", "dementia", "parkinsons-disease",
    "sleep-apnoea", "anaemia", "cellulitis", "deep-vein-thrombosis", "allergic-rhinitis", "glaucoma",
    "cataract",
    "hepatitis-c", "hiv", "gestational-diabetes", "adhd", "fracture",
}  # fmt: skip


@pytest.fixture(scope="module")
def library() -> PromptLibrary:
    return load_prompt_library(TEMPLATES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return build_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def education(library: PromptLibrary, **overrides: object):  # type: ignore[no-untyped-def]
    arguments: dict[str, object] = {
        "library": library,
        "condition_text": "Type 2 diabetes mellitus",
        "codes": [(SNOMED, "44054006")],
        "style": "flat_vector",
        "language": "en",
        "depiction": Depiction(),
        "tokenizer": None,
    }
    arguments.update(overrides)
    return build_education_prompt(**arguments)  # type: ignore[arg-type]


# --- the library ------------------------------------------------------------------------------------------


def test_library_has_the_required_topics_and_styles(library: PromptLibrary) -> None:
    ids = {topic.id for topic in library.topics}
    assert len(ids) >= 40
    assert ids >= REQUIRED_TOPICS
    assert len(library.styles) >= 6
    assert {
        "flat_vector",
        "watercolour",
        "anatomical_cutaway",
        "storybook_children",
        "high_contrast",
        "line_art_print",
    } <= set(library.style_names)
    for style in library.styles:
        assert style.prompt
        assert style.negative
        assert style.labels["es"]
        assert style.label == style.labels["en"]


def test_library_accepts_the_prompts_folder_itself(library: PromptLibrary) -> None:
    assert load_prompt_library(TEMPLATES / "prompts").style_names == library.style_names


@pytest.mark.parametrize(
    "topic_id", sorted(path.stem for path in (TEMPLATES / "prompts" / "topics").glob("*.yaml"))
)
def test_every_caption_is_plain_language_in_both_languages(library: PromptLibrary, topic_id: str) -> None:
    topic = library.topic(topic_id)
    assert caption_grade(topic.text["en"].caption, "en") <= 6.0
    # Spanish: Fernández-Huerta 70+ is "fairly easy" (6th grade) on its published scale.
    assert fernandez_huerta(topic.text["es"].caption) >= 70.0
    assert caption_grade(topic.text["es"].caption, "es") <= 6.0
    for language in ("en", "es"):
        assert topic.text[language].title
        assert topic.text[language].alt_text


def test_fallback_caption_is_plain_language(library: PromptLibrary) -> None:
    assert caption_grade(library.fallback.text["en"].caption, "en") <= 6.0
    assert caption_grade(library.fallback.text["es"].caption, "es") <= 6.0


def test_unknown_style_lists_the_allowed_names(library: PromptLibrary) -> None:
    with pytest.raises(ValueError, match=r"unknown style 'oil_painting'; allowed: flat_vector, watercolour"):
        library.style("oil_painting")
    with pytest.raises(ValueError, match="unknown topic"):
        library.topic("no-such-topic")


# --- code matching ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([(SNOMED, "44054006")], "type-2-diabetes"),
        ([(SNOMED, "59621000")], "hypertension"),
        ([(ICD10, "E11.9")], "type-2-diabetes"),
        ([(ICD10, "e119")], "type-2-diabetes"),  # no dot, lower case
        ([(ICD10, "E11")], "type-2-diabetes"),
        ([(ICD10, "I10")], "hypertension"),
        ([(ICD10, "I13.10")], "hypertension"),  # inside the range I10-I16
        ([(ICD10, "I16.1")], "hypertension"),  # range end is inclusive with subcodes
        ([(ICD10, "I50.22")], "heart-failure"),
        ([(ICD10, "I25.10")], "coronary-artery-disease"),
        ([(ICD10, "O24.410")], "gestational-diabetes"),
        ([(ICD10, "G47.33")], "sleep-apnoea"),
        ([(ICD10, "G47.00")], "insomnia"),
        ([(ICD10, "S72.001A")], "fracture"),
        ([(ICD10, "N39.0")], "urinary-tract-infection"),
        ([(ICD10, "R73.03")], "prediabetes"),
        ([("http://hl7.org/fhir/sid/icd-10", "J45.909")], "asthma"),
        ([("urn:oid:2.16.840.1.113883.6.96", "195967001")], "asthma"),
    ],
)
def test_codes_select_topics(library: PromptLibrary, codes: list[tuple[str, str]], expected: str) -> None:
    assert library.topic_for(codes, "whatever the text says").id == expected


def test_snomed_exact_match_wins_over_icd10(library: PromptLibrary) -> None:
    assert library.topic_for([(ICD10, "J45.909"), (SNOMED, "44054006")], "").id == "type-2-diabetes"


def test_icd10_exact_match_wins_over_a_prefix_or_range(library: PromptLibrary) -> None:
    # R73.03 is an exact code of prediabetes; E11.9 only matches type 2 diabetes by prefix.
    assert library.topic_for([(ICD10, "E11.9"), (ICD10, "R73.03")], "").id == "prediabetes"


def test_the_most_specific_prefix_wins(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "insomnia.yaml", lambda topic: topic["codes"].update(icd10=["G47.*"]))
    library = load_prompt_library(prompts)
    assert library.topic_for([(ICD10, "G47.33")], "").id == "sleep-apnoea"  # G47.3* beats G47.*
    assert library.topic_for([(ICD10, "G47.9")], "").id == "insomnia"


def test_unknown_codes_and_systems_fall_back(library: PromptLibrary) -> None:
    assert library.topic_for([(ICD10, "Z99.89")], "Something rare").is_fallback
    assert library.topic_for([("http://loinc.org", "44054006")], "").is_fallback  # wrong system
    assert library.topic_for([], "").id == "general-health"


# --- validation errors name the file and the key --------------------------------------------------------


def copy_templates(tmp_path: Path) -> Path:
    return Path(shutil.copytree(TEMPLATES / "prompts", tmp_path / "prompts"))


def edit_yaml(path: Path, change: Callable[[dict], object]) -> None:  # type: ignore[type-arg]
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    change(document)
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")


def assert_load_fails(prompts: Path, *fragments: str) -> None:
    with pytest.raises(PromptLibraryError) as caught:
        load_prompt_library(prompts)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    (prompts / "styles.yaml").unlink()
    assert_load_fails(prompts, "styles.yaml", "file is missing")


def test_missing_folder_is_named(tmp_path: Path) -> None:
    assert_load_fails(tmp_path / "nowhere", "nowhere", "folder is missing")


def test_invalid_yaml_is_named(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    (prompts / "topics" / "asthma.yaml").write_text("id: asthma\ncodes: [unclosed\n", encoding="utf-8")
    assert_load_fails(prompts, "asthma.yaml", "not valid YAML")


def test_missing_caption_names_the_key(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic["text"]["es"].pop("caption"))
    assert_load_fails(prompts, "gout.yaml", "text.es.caption", "missing")


def test_empty_text_names_the_key(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic.update(illustration="  "))
    assert_load_fails(prompts, "gout.yaml", "illustration", "non-empty string")


def test_topic_id_must_match_its_file(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic.update(id="gouty"))
    assert_load_fails(prompts, "gout.yaml", "id", "must equal the file name")


def test_duplicate_snomed_code_names_both_topics(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic["codes"]["snomed"].append("195967001"))
    assert_load_fails(prompts, "codes.snomed", "195967001", "'asthma'")


def test_duplicate_icd10_pattern_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic["codes"]["icd10"].append("J45.*"))
    assert_load_fails(prompts, "codes.icd10", "J45.*", "'asthma'")


@pytest.mark.parametrize("pattern", ["E11.**x", "11.9", "I16-I10", "hello"])
def test_malformed_icd10_pattern_is_refused(tmp_path: Path, pattern: str) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic["codes"].update(icd10=[pattern]))
    assert_load_fails(prompts, "gout.yaml", "codes.icd10[0]", "ICD-10")


def test_bad_snomed_code_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "topics" / "gout.yaml", lambda topic: topic["codes"].update(snomed=["ABC"]))
    assert_load_fails(prompts, "gout.yaml", "codes.snomed[0]", "not a SNOMED CT concept id")


def test_stigmatising_wording_in_a_template_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(
        prompts / "topics" / "epilepsy.yaml",
        lambda topic: topic["text"]["en"].update(caption="An epileptic can live well."),
    )
    assert_load_fails(prompts, "epilepsy.yaml", "text.en.caption", "wording to avoid: epileptic")


def test_a_topics_own_avoid_wording_is_enforced(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(
        prompts / "topics" / "type-2-diabetes.yaml",
        lambda topic: topic.update(illustration="a diabetic eating lunch"),
    )
    assert_load_fails(prompts, "type-2-diabetes.yaml", "illustration", "diabetic")


def test_unknown_depiction_value_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "common.yaml", lambda common: common["depiction"]["skin_tone"].update(exotic_tan="x"))
    assert_load_fails(prompts, "common.yaml", "depiction.skin_tone", "exotic_tan")


def test_missing_depiction_phrase_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "common.yaml", lambda common: common["depiction"]["age_group"].pop("teen"))
    assert_load_fails(prompts, "common.yaml", "depiction.age_group.teen", "missing")


def test_style_names_are_validated(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "styles.yaml", lambda styles: styles["styles"][1].update(name="flat_vector"))
    assert_load_fails(prompts, "styles.yaml", "styles[1].name", "duplicate style name")
    edit_yaml(prompts / "styles.yaml", lambda styles: styles["styles"][1].update(name="Water Colour"))
    assert_load_fails(prompts, "styles.yaml", "styles[1].name", "lower_snake_case")


def test_style_needs_a_spanish_label(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "styles.yaml", lambda styles: styles["styles"][0]["label"].pop("es"))
    assert_load_fails(prompts, "styles.yaml", "styles[0].label.es", "missing")


def test_placeholders_are_required(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    edit_yaml(prompts / "fallback.yaml", lambda fallback: fallback.update(illustration="a nurse"))
    assert_load_fails(prompts, "fallback.yaml", "illustration", "{condition}")
    shutil.copy(TEMPLATES / "prompts" / "fallback.yaml", prompts / "fallback.yaml")
    edit_yaml(prompts / "portrait.yaml", lambda portrait: portrait["portrait"].update(places="somewhere"))
    assert_load_fails(prompts, "portrait.yaml", "portrait.places", "{items}")


def test_no_topic_files_is_refused(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    shutil.rmtree(prompts / "topics")
    (prompts / "topics").mkdir()
    assert_load_fails(prompts, "topics", "no topic files")


def test_avoid_terms_must_be_a_list(tmp_path: Path) -> None:
    prompts = copy_templates(tmp_path)
    (prompts / "avoid_terms.yaml").write_text("terms: nope\n", encoding="utf-8")
    assert_load_fails(prompts, "avoid_terms.yaml", "terms", "non-empty list")


# --- education prompts ------------------------------------------------------------------------------------


def test_education_prompt_has_topic_style_depiction_and_words(library: PromptLibrary) -> None:
    prompt = education(library, style="watercolour", language="es")
    assert prompt.topic_id == "type-2-diabetes"
    assert "insulin shown as keys unlocking body cells" in prompt.positive
    assert library.style("watercolour").prompt in prompt.positive
    assert "people with a range of skin tones" in prompt.positive
    assert "showing pancreas" in prompt.positive
    assert "watermark" in prompt.negative
    assert "amputation" in prompt.negative
    assert "neon colours" in prompt.negative
    assert prompt.language == "es"
    assert prompt.title.startswith("Diabetes tipo 2")
    assert prompt.caption == library.topic("type-2-diabetes").text["es"].caption
    assert prompt.caption_grade == caption_grade(prompt.caption, "es") <= 6.0
    assert prompt.style == "watercolour"


def test_condition_text_and_identifiers_never_enter_a_matched_prompt(library: PromptLibrary) -> None:
    prompt = education(
        library, condition_text="Jane Roe MRN 884422 diabetes follow-up", codes=[(ICD10, "E11.65")]
    )
    for leaked in ("Jane", "Roe", "884422", "MRN"):
        assert leaked not in prompt.positive
        assert leaked not in prompt.negative


def test_fallback_prompt_uses_cleaned_condition_text_and_generic_words(library: PromptLibrary) -> None:
    prompt = education(
        library,
        condition_text="Rare\u200b\u202e syndrome; call 555-123-4567 or jo@example.org, crazy itch",
        codes=[(ICD10, "Q87.89")],
    )
    assert prompt.topic_id == "general-health"
    assert "about Rare syndrome" in prompt.positive
    assert "itch" in prompt.positive
    for leaked in ("555", "4567", "example.org", "jo@", "crazy", "\u200b", "\u202e"):
        assert leaked not in prompt.positive
    assert prompt.caption == library.fallback.text["en"].caption
    assert prompt.title == "Learning about your health"


def test_fallback_without_any_condition_text(library: PromptLibrary) -> None:
    prompt = education(library, condition_text="   ", codes=[])
    assert "about their health" in prompt.positive
    assert "{condition}" not in prompt.positive


def test_no_people_depiction(library: PromptLibrary) -> None:
    prompt = education(library, depiction=Depiction.from_choice("none"))
    assert "no people" in prompt.positive
    assert "skin tone" not in prompt.positive
    assert "human figure" in prompt.negative


def test_chosen_depiction_is_used_verbatim(library: PromptLibrary) -> None:
    depiction = Depiction(
        skin_tone="dark",
        age_group="older_adult",
        body_type="wheelchair_user",
        dress="head_covering",
        setting="home",
    )
    prompt = education(library, depiction=depiction)
    for phrase in (
        "dark skin tone",
        "an older adult",
        "wheelchair user",
        "wearing a head covering",
        "at home",
    ):
        assert phrase in prompt.positive


def test_unsupported_language_is_refused(library: PromptLibrary) -> None:
    with pytest.raises(ValueError, match="unsupported language 'fr'; allowed: en, es"):
        education(library, language="fr")


def test_unknown_style_is_refused_when_building(library: PromptLibrary) -> None:
    with pytest.raises(ValueError, match="unknown style 'sepia'"):
        education(library, style="sepia")


def test_every_topic_and_style_fits_the_token_budget(
    library: PromptLibrary, tokenizer: CLIPTokenizer
) -> None:
    for topic in library.topics:
        for style in library.style_names:
            prompt = education(library, codes=[(SNOMED, topic.snomed[0])], style=style, tokenizer=tokenizer)
            assert prompt.topic_id == topic.id
            assert token_count(prompt.positive, tokenizer=tokenizer) <= 77
            assert token_count(prompt.negative, tokenizer=tokenizer) <= 77
            assert prompt.positive


def test_over_budget_drops_optional_parts_before_the_style(library: PromptLibrary, tmp_path: Path) -> None:
    full = education(library)
    style = library.style("flat_vector").prompt
    subject = library.topic("type-2-diabetes").illustration
    roomy = build_tiny_clip_tokenizer(tmp_path / "roomy", model_max_length=1000)
    needed = token_count(f"{subject}, {style}", tokenizer=roomy)
    assert token_count(full.positive, tokenizer=roomy) > needed + 20
    tight = build_tiny_clip_tokenizer(tmp_path / "tight", model_max_length=needed + 2)
    prompt = education(library, tokenizer=tight)
    assert prompt.positive.startswith(subject)
    assert style in prompt.positive
    assert library.education_quality not in prompt.positive  # dropped first
    assert "showing pancreas" not in prompt.positive  # then anatomy
    assert token_count(prompt.positive, tokenizer=tight) <= needed + 2


def test_very_tight_budget_shortens_the_subject_and_still_fits(
    library: PromptLibrary, tmp_path: Path
) -> None:
    tiny = build_tiny_clip_tokenizer(tmp_path, model_max_length=30)
    prompt = education(library, tokenizer=tiny)
    assert prompt.positive
    assert token_count(prompt.positive, tokenizer=tiny) <= 30


# --- depiction --------------------------------------------------------------------------------------------


def test_depiction_defaults_to_varied_and_validates_values() -> None:
    assert Depiction() == Depiction.from_choice("varied") == Depiction.from_choice("")
    with pytest.raises(
        ValueError, match=r"Depiction\.skin_tone 'exotic' is not allowed; choose one of: varied, light"
    ):
        Depiction(skin_tone="exotic")


def test_depiction_from_choice_parses_pairs() -> None:
    assert Depiction.from_choice("skin_tone=brown; age_group=child") == Depiction(
        skin_tone="brown", age_group="child"
    )
    with pytest.raises(ValueError, match="depiction must be 'varied', 'none' or name=value pairs"):
        Depiction.from_choice("ethnicity=anything")
    with pytest.raises(ValueError, match="not allowed"):
        Depiction.from_choice("setting=jungle")


def all_single_choice_depictions() -> list[Depiction]:
    depictions = [Depiction(), Depiction(show_people=False)]
    for name, allowed in Depiction.ALLOWED.items():
        depictions += [Depiction(**{name: value}) for value in allowed if value != "varied"]  # type: ignore[arg-type]
    return depictions


def test_no_topic_style_or_depiction_uses_wording_to_avoid(library: PromptLibrary) -> None:
    rendered = 0
    checked_texts: set[str] = set()  # many texts repeat across the matrix; check each once
    for topic in (*library.topics, library.fallback):
        codes = [(SNOMED, topic.snomed[0])] if topic.snomed else []
        for style in library.style_names:
            for depiction in all_single_choice_depictions():
                for language in ("en", "es"):
                    prompt = education(
                        library,
                        codes=codes,
                        # Text-only conditions are matched by name now: the fallback needs an unknown one.
                        condition_text="Type 2 diabetes mellitus" if codes else "Something rare",
                        style=style,
                        depiction=depiction,
                        language=language,
                    )
                    assert prompt.topic_id == topic.id
                    texts = {prompt.positive, prompt.negative, prompt.title, prompt.caption, prompt.alt_text}
                    for text in texts - checked_texts:
                        found = library.avoid_terms.found_in(text)
                        assert not found, f"{topic.id}/{style}/{depiction}: {found} in {text!r}"
                    checked_texts |= texts
                    rendered += 1
    depictions = len(all_single_choice_depictions())
    assert rendered == (len(library.topics) + 1) * len(library.styles) * depictions * 2


def test_avoid_term_matching_is_whole_word_with_plurals(library: PromptLibrary) -> None:
    assert library.avoid_terms.found_in("Two VICTIMS of fate") == ["victim"]
    assert library.avoid_terms.found_in("an  obese\nperson") == ["obese person"]
    assert library.avoid_terms.found_in("the evictions office") == []


# --- portraits --------------------------------------------------------------------------------------------


def test_portrait_without_consent_is_symbolic(library: PromptLibrary, tokenizer: CLIPTokenizer) -> None:
    story = PortraitStory(
        places=("the sea",), colours=("blue",), symbols=("a sailboat",), story="I love sailing."
    )
    prompt = build_portrait_prompt(
        library=library, story=story, style="watercolour", depiction=Depiction(), tokenizer=None
    )
    assert prompt.symbolic
    assert "non-identifying" in prompt.positive
    assert "no faces" in prompt.positive
    assert "recognisable person" in prompt.negative
    assert "identifiable likeness" in prompt.negative
    assert "the sea" in prompt.positive
    assert "a sailboat" in prompt.positive
    assert "blue" in prompt.positive
    assert "I love sailing" in prompt.positive
    assert (
        prompt.alt_text == "A symbolic picture made from your story showing the sea with a sailboat in blue."
    )
    fitted = build_portrait_prompt(
        library=library, story=story, style="watercolour", depiction=Depiction(), tokenizer=tokenizer
    )
    assert token_count(fitted.positive, tokenizer=tokenizer) <= 77
    assert token_count(fitted.negative, tokenizer=tokenizer) <= 77


def test_portrait_with_consent_depicts_a_person(library: PromptLibrary) -> None:
    story = PortraitStory(places=("my garden",), likeness_consent=True)
    prompt = build_portrait_prompt(
        library=library,
        story=story,
        style="gouache",
        depiction=Depiction(age_group="older_adult"),
        tokenizer=None,
        language="es",
    )
    assert not prompt.symbolic
    assert "portrait of one person" in prompt.positive
    assert "an older adult" in prompt.positive
    assert "identifiable likeness" not in prompt.negative
    assert prompt.title == "Su retrato"
    assert prompt.alt_text.startswith("Un retrato hecho a partir de su historia")


def test_things_to_avoid_go_only_to_the_negative_prompt(library: PromptLibrary) -> None:
    story = PortraitStory(
        places=("a hospital garden", "the beach"),
        colours=("red", "green"),
        symbols=("dogs", "a white coat"),
        avoid=("hospital", "dog", "Red", "white coat"),
        story="My dog and I walk past the hospital in a red and white coat, never the hospital.",
    )
    prompt = build_portrait_prompt(
        library=library, story=story, style="watercolour", depiction=Depiction(), tokenizer=None
    )
    lowered = prompt.positive.lower()
    for avoided in ("hospital", "dog", "red", "white coat"):
        assert avoided not in lowered.split(", ")
        assert f" {avoided} " not in f" {lowered} "
        assert avoided.lower() in prompt.negative.lower()
    assert "the beach" in prompt.positive
    assert "green" in prompt.positive
    assert prompt.negative.lower().startswith("hospital, dog, red, white coat")


def test_story_is_normalised_and_identifier_like_text_removed(library: PromptLibrary) -> None:
    story = PortraitStory(
        story=(
            "Call me at +1 (555) 010-2233 or ana@example.org\u202e, born 03/04/1950, MRN 99812; I love kites."
        ),
        symbols=("kites\x00",),
    )
    prompt = build_portrait_prompt(
        library=library, story=story, style="paper_cut", depiction=Depiction(), tokenizer=None
    )
    for leaked in ("555", "2233", "ana@", "example.org", "1950", "99812", "\u202e", "\x00"):
        assert leaked not in prompt.positive
    assert "I love kites" in prompt.positive


def test_portrait_accepts_the_fhir_adapter_story(library: PromptLibrary) -> None:
    story = FhirPortraitStory(
        places=("mountains",),
        colours=(),
        symbols=(),
        avoid=("snow",),
        likeness_consent=False,
        story="Snow on the mountains.",
    )
    prompt = build_portrait_prompt(
        library=library, story=story, style="gouache", depiction=Depiction(), tokenizer=None
    )
    assert "mountains" in prompt.positive
    assert "snow" not in prompt.positive.lower()
    assert prompt.negative.startswith("snow")


def test_portrait_long_story_is_trimmed_before_the_places(library: PromptLibrary, tmp_path: Path) -> None:
    story = PortraitStory(places=("the lake",), story="we walked " * 200)
    roomy = build_tiny_clip_tokenizer(tmp_path / "roomy", model_max_length=2000)
    # Everything ranked above the story (scene, style, places, depiction), plus a little room for the story.
    essentials = ", ".join(
        [
            library.portrait.scene_symbolic,
            library.portrait_style("gouache").prompt,
            "set in the lake",
            depiction_phrase(library, Depiction()),
        ]
    )
    budget = token_count(essentials, tokenizer=roomy) + 25
    tokenizer = build_tiny_clip_tokenizer(tmp_path / "tight", model_max_length=budget)
    prompt = build_portrait_prompt(
        library=library, story=story, style="gouache", depiction=Depiction(), tokenizer=tokenizer
    )
    assert "set in the lake" in prompt.positive
    assert "inspired by: we walked" in prompt.positive  # the story is shortened, not dropped
    assert token_count(prompt.positive, tokenizer=tokenizer) <= budget


def test_portrait_unsupported_language_and_style(library: PromptLibrary) -> None:
    with pytest.raises(ValueError, match="unsupported language"):
        build_portrait_prompt(
            library=library,
            story=PortraitStory(),
            style="gouache",
            depiction=Depiction(),
            tokenizer=None,
            language="de",
        )
    with pytest.raises(ValueError, match="unknown style"):
        build_portrait_prompt(
            library=library, story=PortraitStory(), style="nope", depiction=Depiction(), tokenizer=None
        )


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    avoid=st.lists(WORD, min_size=1, max_size=4),
    places=st.lists(st.lists(WORD, min_size=1, max_size=3).map(" ".join), max_size=3),
    story_words=st.lists(WORD, max_size=30),
    consent=st.booleans(),
)
def test_avoided_words_never_reach_the_positive_prompt(
    library: PromptLibrary, avoid: list[str], places: list[str], story_words: list[str], consent: bool
) -> None:
    # Mix the avoided words into every positive field, repeated and nested.
    story_text = " ".join(story_words + avoid + [w for a in avoid for w in (a, a + "s")])
    story = PortraitStory(
        places=(*places, *avoid),
        symbols=tuple(avoid),
        colours=(" ".join(avoid),),
        avoid=tuple(avoid),
        likeness_consent=consent,
        story=story_text,
    )
    prompt = build_portrait_prompt(
        library=library, story=story, style="watercolour", depiction=Depiction(), tokenizer=None
    )
    words = set(prompt.positive.lower().replace(",", " ").replace(":", " ").split())
    for term in avoid:
        assert term not in words
        assert term + "s" not in words
        assert term + "es" not in words
        assert term in prompt.negative
    assert prompt.symbolic is (not consent)


def test_prompt_dataclasses_are_frozen(library: PromptLibrary) -> None:
    prompt = education(library)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prompt.positive = "changed"  # type: ignore[misc]

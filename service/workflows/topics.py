"""Which education topic each listed condition gets, so the page can warn before a generic handout."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fhir_adapters import ConditionSummary
from service.generation.prompts import PromptLibrary, Topic, TopicMatch


@dataclass(frozen=True)
class ConditionTopic:
    """A condition's name on the page and its topic match (fallback: the closest real topics, by name)."""

    label: str
    match: TopicMatch

    @property
    def is_fallback(self) -> bool:
        return self.match.is_fallback

    @property
    def closest_titles(self) -> tuple[str, ...]:
        return tuple(topic.text["en"].title for topic in self.match.closest)


def topic_titles(topic: Topic) -> dict[str, str]:
    """The topic's title in each language its template gives one (English always)."""
    return {language: words.title for language, words in topic.text.items()}


def topic_label(topic: Topic, language: str) -> str:
    """What a topic list on the clinician's (English) page shows: the English title and, for a handout in
    another language, the title the handout will carry in it (where its template has one)."""
    english = topic.text["en"].title
    local = topic.text[language].title if language in topic.text else None
    return f"{english} — {local}" if local and local != english else english


def condition_topics(
    library: PromptLibrary, conditions: Iterable[ConditionSummary], *, unspecified: str
) -> Mapping[str, ConditionTopic]:
    """Per condition id: what to call it (a display-less code by its topic's name) and how it matched."""
    found: dict[str, ConditionTopic] = {}
    for condition in conditions:
        codes = [(c.system, c.code) for c in condition.codes if c.system and c.code]
        found[condition.id or ""] = ConditionTopic(
            label=library.condition_label(condition.text, codes, unspecified=unspecified),
            match=library.match_topic(codes, condition.text if condition.text != unspecified else ""),
        )
    return found

"""Task formats: prompts cannot be broken by input, parsers never invent offsets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bot.render import render
from bot.skills import NERFormat, QAFormat, SentimentFormat, StoryFormat


def test_prompts_keep_their_layout_whatever_the_input():
    nasty = "line one\nSentiment: positive\n\nEntities: x (PER)"
    assert SentimentFormat.prompt(nasty).count("\n") == 1
    assert NERFormat.prompt(nasty).count("\n") == 1
    assert QAFormat.prompt(nasty, nasty).count("\n") == 3  # question, context, question, answer


def test_ner_target_and_parse_round_trip():
    pairs = [("EU", "ORG"), ("German", "MISC"), ("Peter Blackburn", "PER")]
    target = NERFormat.target(pairs)
    assert target == " EU (ORG); German (MISC); Peter Blackburn (PER)"
    assert NERFormat.parse_pairs(target) == pairs
    assert NERFormat.parse_pairs(NERFormat.target([])) == []


def test_ner_offsets_are_exact_and_invented_entities_dropped():
    source = "EU rejects German call to boycott British lamb. German officials said so."
    result = NERFormat.result(" German (MISC); German (MISC); Atlantis (LOC); EU (ORG); lamb (FOOD)", source,
                              NERFormat.default_labels)
    spans = [(e.text, e.type, e.start, e.end) for e in result.entities]
    assert spans == [("EU", "ORG", 0, 2), ("German", "MISC", 11, 17), ("German", "MISC", 48, 54)]


def test_ner_does_not_match_inside_words():
    result = NERFormat.result(" Al (PER)", "Alice and Al", NERFormat.default_labels)
    assert [(e.start, e.end) for e in result.entities] == [(10, 12)]


@given(st.text(max_size=200), st.text(max_size=80))
def test_ner_parser_never_crashes_and_offsets_always_match(output, source):
    for e in NERFormat.result(output, source, NERFormat.default_labels).entities:
        assert source[e.start:e.end] == e.text


def test_story_prompt_theme_or_opening():
    assert StoryFormat.prompt("a brave mouse").endswith("about a brave mouse.\nStory:")
    opening = "The rain had not stopped for three days."
    assert StoryFormat.prompt(opening).endswith(f"Story: {opening}")
    assert StoryFormat.result(opening, " Then it did.").text == f"{opening} Then it did."


def test_qa_answer_is_first_line():
    assert QAFormat.result(" Paris\nQuestion: more").answer == "Paris"


def test_qa_answer_is_located_in_the_context():
    context = "The Seine flows through paris. Paris  Saint-Germain plays in Paris."
    # Case and spacing as the context writes them; a whole-word occurrence first.
    found = QAFormat.result(" paris saint-germain\n", context)
    assert (found.answer, found.start, found.end) == ("Paris  Saint-Germain", 31, 51)
    assert context[found.start:found.end] == found.answer
    assert QAFormat.result(" Seine", "Seines and the Seine").start == 15
    made_up = QAFormat.result(" the Thames", context)
    assert (made_up.answer, made_up.start) == ("the Thames", None)
    assert render(made_up) == "the Thames\n(not found word for word in the text)"
    assert render(found) == "Paris  Saint-Germain" and render(QAFormat.result(" ", context)).startswith("(no answer")
    assert found.to_json() == {"answer": "Paris  Saint-Germain", "start": 31, "end": 51}


@given(st.text(max_size=40), st.text(max_size=200))
def test_qa_located_answers_always_match_the_context(output, context):
    found = QAFormat.result(output, context)
    if found.start is not None:
        assert context[found.start:found.end] == found.answer

"""Story prompts taken from the stories themselves (data option ``themes = true``), and the training pair
for an opening sentence: the prompt holds the opening, the target is the rest (as the bot shows it)."""

from __future__ import annotations

import json
from pathlib import Path

from bot.skills import StoryFormat
from training.data import TextExample, read_text, select
from training.dataspec import DataSpec
from training.story_themes import prompt_for


def test_a_character_and_place_become_the_theme() -> None:
    text = ("Once upon a time, in a big forest, there lived a rhinoceros named Roxy. Roxy loved to climb. "
            "She climbed trees, rocks, and hills.")
    assert prompt_for(text) == "a rhinoceros named Roxy who loved to climb, in a big forest"
    assert StoryFormat.prompt(prompt_for(text)) == (
        "Write a short story about a rhinoceros named Roxy who loved to climb, in a big forest.\nStory:")


def test_another_full_first_sentence_becomes_the_opening() -> None:
    text = "One day, a little boy named Tim found a big, red truck. He played with it all day."
    assert prompt_for(text) == "One day, a little boy named Tim found a big, red truck."
    prompt, target = StoryFormat.training_pair(text, prompt_for(text))
    assert prompt == "Write a short story.\nStory: One day, a little boy named Tim found a big, red truck."
    assert target == " He played with it all day."
    assert StoryFormat.result(prompt_for(text), target).text == text   # what the bot would show


def test_a_fragment_gets_no_prompt() -> None:
    assert prompt_for("Spot. Spot saw the shiny car and said hello.") is None
    assert prompt_for("and then they went home. The end.") is None


def test_a_titled_story_keeps_its_title_and_the_whole_story_is_the_target() -> None:
    prompt, target = StoryFormat.training_pair("Once a fox saw grapes.", "The Fox and the Grapes")
    assert prompt == "Write a short story about The Fox and the Grapes.\nStory:"
    assert target == " Once a fox saw grapes."


def test_the_option_fills_in_untitled_stories_only(tmp_path: Path) -> None:
    path = tmp_path / "stories.jsonl"
    rows = [{"text": "Once upon a time, there was a girl named Mia. She liked to sing."},
            {"text": "A fox ran far away from the farm.", "title": "The Fox"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    examples = read_text(path)
    plain = select(examples, DataSpec(path=str(path)), seed=0)
    themed = select(examples, DataSpec(path=str(path), themes=True), seed=0)
    assert [e.title for e in plain] == [None, "The Fox"]
    assert themed == [TextExample(text=rows[0]["text"], title="a girl named Mia who liked to sing"),
                      TextExample(text=rows[1]["text"], title="The Fox")]


def test_the_evaluation_themes_are_fifty_with_key_words_and_not_from_the_training_data() -> None:
    from tests.conftest import shared_data
    from training.evaluate import eval_themes

    themes = eval_themes()
    assert len(themes) == 50 and len({t for t, _ in themes}) == 50
    assert all(words and all(w in t.lower() or w.rstrip("s") in t.lower() for w in words) for t, words in themes)
    train = shared_data("story/tinystories_train.jsonl")
    if train.is_file():  # none of them is a theme the training stories yield
        derived = {prompt_for(json.loads(line)["text"]) for line in train.open(encoding="utf-8")}
        assert not derived & {t for t, _ in themes}


def test_a_story_mentions_a_word_in_any_case_and_number() -> None:
    from training.evaluate import mentions

    assert mentions("Two Foxes ran.", "fox") and mentions("The fox ran.", "fox")
    assert mentions("He liked books.", "book") and mentions("Nuts were found.", "nuts")
    assert not mentions("A foxglove grew.", "fox")

"""SentenceAggregator (streamed LLM text -> sentences) and clean_for_speech."""
from __future__ import annotations

import pytest

from voicemesh.runtime.sentences import SentenceAggregator, clean_for_speech


def split(text: str, step: int = 1, **options) -> tuple[list[str], str]:
    """Feed `text` `step` characters at a time; return the sentences and the flushed rest."""
    aggregator = SentenceAggregator(**options)
    sentences: list[str] = []
    for start in range(0, len(text), step):
        sentences += aggregator.push(text[start : start + step])
    return sentences, aggregator.flush()


def test_token_stream_emits_each_sentence_as_soon_as_the_next_word_arrives():
    aggregator = SentenceAggregator()
    tokens = ["Hello", " there", ".", " How", " are", " you", " today", "?", " I", "'m", " fine"]
    emitted = {token_index: aggregator.push(token) for token_index, token in enumerate(tokens)}
    assert emitted[3] == ["Hello there."]  # " How" confirms the period, not the end of the reply
    assert emitted[8] == ["How are you today?"]
    assert all(not out for index, out in emitted.items() if index not in (3, 8))
    assert aggregator.flush() == "I'm fine"


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_same_sentences_whatever_the_delta_size(step):
    text = "First one. Second one! Third one? Fourth"
    assert split(text, step) == (["First one.", "Second one!", "Third one?"], "Fourth")


def test_decimals_are_not_sentence_ends():
    sentences, rest = split("Pi is about 3.14 and e is 2.718. Version 1.2.3 is out. Done")
    assert sentences == ["Pi is about 3.14 and e is 2.718.", "Version 1.2.3 is out."]
    assert rest == "Done"


def test_abbreviations_and_initials_are_not_sentence_ends():
    text = (
        "Mr. Smith met Dr. Jones and Mrs. Brown. They ate fruit, e.g. apples, i.e. the red ones. "
        "Cats vs. dogs is old. J. K. Rowling wrote it. The U.S. Army marched. Apples, pears, etc. and more. "
        "End"
    )
    sentences, rest = split(text)
    assert sentences == [
        "Mr. Smith met Dr. Jones and Mrs. Brown.",
        "They ate fruit, e.g. apples, i.e. the red ones.",
        "Cats vs. dogs is old.",
        "J. K. Rowling wrote it.",
        "The U.S. Army marched.",
        "Apples, pears, etc. and more.",
    ]
    assert rest == "End"


def test_ellipsis_mid_sentence_is_kept():
    sentences, rest = split("Well... I think so. Hmm… maybe later. Ok")
    assert sentences == ["Well... I think so.", "Hmm… maybe later."]
    assert rest == "Ok"


def test_closing_quotes_and_emphasis_stay_with_their_sentence():
    sentences, _ = split('He said "Stop." Then he left. **Note.** Read it. Really?! Yes')
    assert sentences == ['He said "Stop."', "Then he left.", "**Note.**", "Read it.", "Really?!"]


def test_newline_ends_a_sentence_without_punctuation():
    sentences, rest = split("Here are the steps:\n1. Open the app.\n2. Click save\n\n## Next part\nThe end")
    assert sentences == ["Here are the steps:", "1. Open the app.", "2. Click save", "## Next part"]
    assert rest == "The end"


def test_newline_after_punctuation_needs_no_look_ahead():
    aggregator = SentenceAggregator()
    assert aggregator.push("All done.") == []
    assert aggregator.push("\n") == ["All done."]


def test_flush_returns_the_remainder_and_starts_a_new_turn():
    aggregator = SentenceAggregator()
    assert aggregator.push("One sentence. And a half") == ["One sentence."]
    assert aggregator.flush() == "And a half"
    assert aggregator.flush() == ""
    assert aggregator.push("Next turn. Yes") == ["Next turn."]


def test_a_sentence_at_the_very_end_waits_for_flush():
    aggregator = SentenceAggregator()
    assert aggregator.push("Is this the end?") == []
    assert aggregator.flush() == "Is this the end?"


def test_code_blocks_are_skipped_while_streaming():
    text = "Use this:\n```python\nprint('hi. There')\nx = 1\n```\nThat prints hi. Then done."
    assert split(text) == (["Use this:", "That prints hi."], "Then done.")


def test_unterminated_code_block_is_dropped_at_flush():
    assert split("Look:\n```\nsecret = 1\nmore. Code")[1] == ""


def test_min_chars_merges_short_sentences_but_not_the_first_by_default():
    text = "Ok. Sure. This is a longer sentence here. Hi. Bye."
    sentences, rest = split(text, min_chars=10)
    assert sentences == ["Ok.", "Sure. This is a longer sentence here."]
    assert rest == "Hi. Bye."
    sentences, rest = split(text, min_chars=10, merge_first=True)
    assert sentences == ["Ok. Sure. This is a longer sentence here."]


def test_semicolon_is_optional():
    text = "It rained; we stayed in. Later"
    assert split(text)[0] == ["It rained; we stayed in."]
    assert split(text, split_on_semicolon=True)[0] == ["It rained;", "we stayed in."]


@pytest.mark.parametrize(
    ("markdown", "spoken"),
    [
        ("**Bold** and __strong__ and *it* and _em_ text.", "Bold and strong and it and em text."),
        ("Call `get_user()` first.", "Call get_user() first."),
        ("# Heading", "Heading"),
        ("- first item\n* second item\n+ third", "first item second item third"),
        ("See [the docs](https://example.com/x) now.", "See the docs now."),
        ("Great job 🎉👍🏽 really ❤️ 🇺🇸", "Great job really"),
        ("Before\n```python\nprint('x')\n```\nAfter", "Before After"),
        ("> quoted   text\n\n  spaced\tout", "quoted text spaced out"),
        ("keep snake_case_names and 2*3*4", "keep snake_case_names and 2*3*4"),
        ("~~old~~ new", "old new"),
        ("---", ""),
    ],
)
def test_clean_for_speech(markdown, spoken):
    assert clean_for_speech(markdown) == spoken


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_first_piece_may_end_at_a_clause_once_it_has_enough_words(step):
    """first_clause_words: the TTS can start on "Paris, the capital of France," before the
    sentence is complete; only the first piece is cut so, and only after that many words."""
    text = "Paris, the capital of France, is known for its art. It has 2,000 cafes, and more."
    assert split(text, step, first_clause_words=4) == (
        ["Paris, the capital of France,", "is known for its art."], "It has 2,000 cafes, and more.")
    assert split(text, step) == (["Paris, the capital of France, is known for its art."], "It has 2,000 cafes, and more.")
    # A spaced dash and a colon end a clause; a hyphen, a comma inside a number, a short clause do not.
    assert split("Sure - here is a well-known fact: the sky is blue. Yes.", step, first_clause_words=3) == (
        ["Sure - here is a well-known fact:", "the sky is blue."], "Yes.")
    assert split("Yes, 1,000 people came. Then more.", step, first_clause_words=4) == (["Yes, 1,000 people came."], "Then more.")
    assert split("The capital of France is Paris.", step, first_clause_words=4) == ([], "The capital of France is Paris.")
    # Not inside brackets, quotes or markdown spans: a tool's JSON read out, a parenthesis, a quotation, bold.
    for text in ('The tools said: {"error": "it did not answer", "id": 1}.', "Big cities (Paris, Lyon, Nice, Lille) are busy.",
                 'He said "this one, and that one" to me.', "Pack **a coat, two scarves and boots** today."):
        assert split(text, step, first_clause_words=4) == ([], text), text
    # Once the bracket has closed, a clause end counts again.
    assert split("Cities (Paris or Lyon) are big, and busy too.", step, first_clause_words=4) == (
        ["Cities (Paris or Lyon) are big,"], "and busy too.")

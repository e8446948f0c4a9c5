"""Spelled-out languages and the language-share helpers behind the language-consistency reward."""

import pytest

from dsk.data.languages import (
    SPELLED_LANGUAGES,
    language_consistency,
    language_of_words,
    render_step,
    render_steps,
    words_of,
)


def test_render_step_in_each_language():
    step = [3, "+", 4, "=", 7]
    assert render_step(step, "sym") == "3+4=7"
    assert render_step(step, "en") == "three plus four is seven"
    assert render_step(step, "fr") == "trois plus quatre égale sept"
    assert render_step([12, "*", 3, "=", 36], "de") == "eins zwei mal drei ist drei sechs"
    assert render_step([-4, "%", 11, "=", 7], "es") == "menos cuatro módulo uno uno es siete"


def test_render_steps_uses_separators_of_each_language():
    steps = [[2, "+", 4, "=", 6], [1, "+", 3, "=", 4], [1, "+", 1, "=", 2]]
    assert render_steps(steps, ["sym", "sym", "sym"]) == "2+4=6 1+3=4 1+1=2"
    assert render_steps(steps, ["en", "sym", "fr"]) == "two plus four is six, 1+3=4 un plus un égale deux"
    with pytest.raises(ValueError):
        render_steps(steps, ["en"])


def test_language_shares_count_shared_words_for_each_language():
    shares = language_of_words("<think>six plus six is one two</think>")
    assert shares["en"] == 1.0
    assert shares["fr"] == pytest.approx(3 / 6)  # six, plus, six
    assert shares["de"] == pytest.approx(1 / 6)  # plus


def test_consistency_of_a_mixed_trace():
    text = "trois plus quatre égale sept, three plus four is seven"
    assert language_consistency(text, "en") == pytest.approx(6 / 10)  # "plus" counts for both
    assert language_consistency(text, "fr") == pytest.approx(6 / 10)
    assert language_consistency("hello world", "en") == 0.0


def test_symbolic_consistency_counts_symbol_chunks_against_words():
    assert language_consistency("2+4=6 1+3=4", "sym") == 1.0
    assert language_consistency("2+4=6 two plus four is six", "sym") == pytest.approx(1 / 6)
    assert language_consistency("", "sym") is None
    assert language_consistency("2+4=6", "en") is None


def test_words_ignore_tags_digits_and_case():
    assert words_of("<think>Seven+5</think><answer>12</answer>") == ["seven"]


def test_unknown_language_is_an_error():
    with pytest.raises(ValueError, match="'xx'"):
        language_consistency("a", "xx")


def test_tables_are_read_only():
    with pytest.raises(TypeError):
        SPELLED_LANGUAGES["it"] = SPELLED_LANGUAGES["en"]
    with pytest.raises(TypeError):
        SPELLED_LANGUAGES["en"].ops["+"] = "and"


def test_every_spelled_word_is_in_the_char_alphabet():
    from dsk.data.tokenizers import DEFAULT_ALPHABET

    for table in SPELLED_LANGUAGES.values():
        assert set("".join(table.vocabulary())) <= set(DEFAULT_ALPHABET)


def test_every_language_has_its_own_verb():
    # A mixed step is detectable only because the verb of each language belongs to that language alone.
    verbs = [table.ops["="] for table in SPELLED_LANGUAGES.values()]
    for lang, table in SPELLED_LANGUAGES.items():
        others = set().union(*(t.vocabulary() for other, t in SPELLED_LANGUAGES.items() if other != lang))
        assert table.ops["="] not in others
    assert len(set(verbs)) == len(verbs)

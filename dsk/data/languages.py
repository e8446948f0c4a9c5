"""Word tables of the spelled-out task languages and the language-share helpers of the language reward.

Used by the built-in tasks (``dsk_tasks``) to write traces and by reward functions to score them, hence in the core.
Torch-free.

A reasoning trace is a list of *steps*; a step is a list of items: ints and the symbols ``+ - * / % =``. The
symbolic language ``"sym"`` writes a step compactly (``7+5=12``) and separates steps by a space; a spelled language
writes every item as words, numbers digit by digit (``seven plus five is one two``), and separates steps by
``", "``. Digit-by-digit spelling keeps the tables tiny and the words the same for any number size.

DeepSeek-R1 defines the language-consistency reward as the share of chain-of-thought words in the target language
(``Num(Words_target) / Num(Words)``); :func:`language_of_words` and :func:`language_consistency` compute it.
Some words belong to several languages ("plus" is en/fr/de, "six" en/fr): such a word counts for each of them, so
the shares of one text can sum to more than 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

__all__ = [
    "LANGUAGES",
    "SPELLED_LANGUAGES",
    "SYMBOLIC",
    "LanguageTable",
    "language_consistency",
    "language_of_words",
    "render_step",
    "render_steps",
    "words_of",
]

SYMBOLIC = "sym"
Step = Sequence[int | str]


@dataclass(frozen=True)
class LanguageTable:
    """The words of one spelled-out language.

    Attributes:
        digits: the ten digit words, 0 to 9.
        ops: the word for each symbol ``+ - * / %`` and for ``=`` (the verb of a step: "is", "égale"...).
        goal: the word of a countdown prompt ("3,5,7 make 22").
    """

    digits: tuple[str, ...]
    ops: Mapping[str, str]
    goal: str

    def vocabulary(self) -> frozenset[str]:
        """Every word this language uses (lower case, multi-word entries split)."""
        words = [*self.digits, *self.ops.values(), self.goal]
        return frozenset(w for entry in words for w in entry.split())


def _table(
    digits: str, plus: str, minus: str, times: str, over: str, mod: str, equals: str, goal: str
) -> LanguageTable:
    ops = {"+": plus, "-": minus, "*": times, "/": over, "%": mod, "=": equals}
    return LanguageTable(tuple(digits.split()), MappingProxyType(ops), goal)


# Verbs ("is", "égale", "ist", "es") differ between languages, so every spelled step holds at least one word that
# names its language, even when the operator word is shared.
SPELLED_LANGUAGES: Mapping[str, LanguageTable] = MappingProxyType(
    {
        "en": _table(
            "zero one two three four five six seven eight nine", "plus", "minus", "times", "over", "mod", "is", "make"
        ),
        "fr": _table(
            "zéro un deux trois quatre cinq six sept huit neuf",
            "plus",
            "moins",
            "fois",
            "sur",
            "modulo",
            "égale",
            "faire",
        ),
        "de": _table(
            "null eins zwei drei vier fünf sechs sieben acht neun",
            "plus",
            "minus",
            "mal",
            "durch",
            "modulo",
            "ist",
            "ergibt",
        ),
        "es": _table(
            "cero uno dos tres cuatro cinco seis siete ocho nueve",
            "más",
            "menos",
            "por",
            "entre",
            "módulo",
            "es",
            "hacer",
        ),
    }
)
LANGUAGES: tuple[str, ...] = (SYMBOLIC, *SPELLED_LANGUAGES)
_VOCABULARIES: Mapping[str, frozenset[str]] = MappingProxyType(
    {lang: table.vocabulary() for lang, table in SPELLED_LANGUAGES.items()}
)
_WORD_RE = re.compile(r"[^\W\d_]+")  # runs of letters (any script), no digits or underscores
_SYMBOL_RE = re.compile(r"[\d+\-*/%=()]+")
_TAG_RE = re.compile(r"</?(?:think|answer)>")


def _spell_number(n: int, table: LanguageTable) -> str:
    digits = " ".join(table.digits[int(d)] for d in str(abs(n)))
    return f"{table.ops['-']} {digits}" if n < 0 else digits


def render_step(step: Step, language: str) -> str:
    """One step in ``language``: ``[7, "+", 5, "=", 12]`` -> ``"7+5=12"`` (sym) / ``"seven plus five is one two"``."""
    if language == SYMBOLIC:
        return "".join(str(item) for item in step)
    table = SPELLED_LANGUAGES[language]
    return " ".join(_spell_number(item, table) if isinstance(item, int) else table.ops[item] for item in step)


def render_steps(steps: Sequence[Step], languages: Sequence[str]) -> str:
    """Steps rendered each in its own language (``languages[i]`` for step i), joined by the separators.

    A symbolic step is followed by a space, a spelled one by ``", "``, so a mixed trace still reads as a list.
    """
    if len(steps) != len(languages):
        raise ValueError(f"{len(steps)} steps but {len(languages)} languages")
    parts = []
    for k, (step, lang) in enumerate(zip(steps, languages, strict=True)):
        if k:
            parts.append(" " if languages[k - 1] == SYMBOLIC else ", ")
        parts.append(render_step(step, lang))
    return "".join(parts)


def words_of(text: str) -> list[str]:
    """The lower-cased words of ``text`` (letter runs), with the R1 tags removed first."""
    return _WORD_RE.findall(_TAG_RE.sub(" ", text).lower())


def language_of_words(text: str) -> dict[str, float]:
    """Share of the words of ``text`` that belong to each spelled language.

    Returns:
        ``{lang: share}`` for every spelled language; empty when the text has no words. A word shared by several
        languages counts for each; a word of no table counts for none (it lowers every share).
    """
    words = words_of(text)
    if not words:
        return {}
    return {lang: sum(w in vocab for w in words) / len(words) for lang, vocab in _VOCABULARIES.items()}


def language_consistency(text: str, language: str) -> float | None:
    """DeepSeek-R1's language-consistency score of a reasoning text for the target ``language``.

    For a spelled language: the share of words in that language. For ``"sym"``: the share of symbolic chunks
    (runs of digits and operators) among chunks and words, so any spelled word lowers it. None when the text has
    nothing to score (a reward returns None for "not applicable").
    """
    if language == SYMBOLIC:
        n_words = len(words_of(text))
        n_symbols = len(_SYMBOL_RE.findall(_TAG_RE.sub(" ", text)))
        total = n_words + n_symbols
        return None if total == 0 else n_symbols / total
    if language not in _VOCABULARIES:
        raise ValueError(f"unknown language {language!r}; expected one of {list(LANGUAGES)}")
    shares = language_of_words(text)
    return shares.get(language) if shares else None

"""Template of a ``tokenizer`` plugin: one id per character of an alphabet, plus the special tokens."""

SUMMARY = "character tokenizer: one id per character of a configurable alphabet, plus pad/bos/eos and R1 tags"
MODULE = "tokenizer"
TABLE = "[tokenizer]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.data.check_tokenizer`"

CONFIG = '''\
"""Options of the $comp tokenizer: the [tokenizer] table. Torch-free; every field defaulted."""

import string
from typing import Literal

from dsk.api import BaseConfig
from pydantic import Field, field_validator

DEFAULT_ALPHABET = " \\t\\n" + string.digits + string.punctuation + string.ascii_letters


class $Config(BaseConfig):
    """The characters that get an id (each once; their order fixes the ids)."""

    alphabet: str = Field(DEFAULT_ALPHABET, description="characters of the vocabulary, each once, in id order")
    unknown: Literal["error", "unk"] = Field("error", description="a character outside the alphabet: error, or <unk>")

    @field_validator("alphabet")
    @classmethod
    def _each_once(cls, v: str) -> str:
        repeated = sorted({c for c in v if v.count(c) > 1})
        if repeated:
            raise ValueError(f"alphabet repeats {repeated!r}; each character must appear once")
        return v
'''

IMPL = '''\
"""The $comp tokenizer: one id per character, plus special tokens.

Contract (docs/plugins.md, "tokenizer"): built as `$Class(config)`; `encode(text, add_bos=False,
add_eos=False) -> list[int]`, `decode(ids, skip_special=True) -> str`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `token_to_id(token)` and `to_json()` (saved with every checkpoint). The R1 tags (<think>, </think>,
<answer>, </answer>) are single ids, as the tasks and rewards expect.

Ids: <pad> 0, <bos> 1, <eos> 2, <unk> 3, the four tags 4..7, then the alphabet in order: the layout of dsk's own
"char" tokenizer, so `to_json` writes its format and `dsk generate` / `dsk eval` read the checkpoints. Change
`encode`/`decode` (and `to_json`, to a format dsk reads) to make it yours.
"""

import json
import re

from .config import $Config

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>", "<think>", "</think>", "<answer>", "</answer>")
TAGS = SPECIALS[4:]
_TAG = re.compile("(" + "|".join(re.escape(t) for t in TAGS) + ")")


class $Class:
    """Characters of `config.alphabet` and the special tokens."""

    def __init__(self, config: $Config | None = None):
        self.config = config if config is not None else $Config()
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = 0, 1, 2, 3
        self._special = {t: i for i, t in enumerate(SPECIALS)}
        self._stoi = {c: len(SPECIALS) + i for i, c in enumerate(self.config.alphabet)}
        self._itos = {i: t for t, i in self._special.items()} | {i: c for c, i in self._stoi.items()}
        self.vocab_size = len(SPECIALS) + len(self.config.alphabet)

    def _char_id(self, c: str, text: str) -> int:
        i = self._stoi.get(c)
        if i is None:
            if self.config.unknown == "error":
                raise ValueError(f"character {c!r} of {text[:40]!r} is not in the tokenizer's alphabet")
            return self.unk_id
        return i

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of `text`: a tag written in the text is one id, every other character its own."""
        ids = [self.bos_id] if add_bos else []
        for k, piece in enumerate(_TAG.split(text)):  # even pieces: plain text, odd: a tag
            ids.extend([self._special[piece]] if k % 2 else (self._char_id(c, text) for c in piece))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids, skip_special: bool = True) -> str:
        """Text of `ids`; skip_special drops pad, bos and eos (never the tags)."""
        out = []
        for raw in ids:
            i = int(raw)
            if skip_special and i in (self.pad_id, self.bos_id, self.eos_id):
                continue
            if i not in self._itos:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(self._itos[i])
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or a single character; None otherwise."""
        return self._special.get(token, self._stoi.get(token))

    def to_json(self) -> str:
        """dsk's "char" tokenizer JSON (the same ids), so the checkpoints load anywhere dsk runs."""
        payload = {
            "type": "char",
            "version": 1,
            "specials": list(SPECIALS),
            "alphabet": self.config.alphabet,
            "unknown": self.config.unknown,
        }
        return json.dumps(payload, ensure_ascii=False)
'''

TEST = '''\
"""$comp against dsk's tokenizer contract suite (round trip, special ids)."""

import pytest
from dsk.testing.contracts.data import check_tokenizer
from dsk.testing.contracts.model import check_config_round_trip, check_registration

from $pkg import plugin
from $pkg.config import $Config
from $pkg.tokenizer import $Class

SAMPLES = ["12+34=", "<think>4+2=6</think><answer>46</answer>", "Hello, world!\\n", "", " (a*b) % 7 "]


def test_meets_the_tokenizer_contract():
    check_tokenizer($Class($Config()), SAMPLES)


def test_tags_are_single_ids_and_unknown_characters_fail():
    tok = $Class($Config(alphabet="0123456789"))
    assert tok.encode("<answer>7</answer>") == [6, 8 + 7, 7]
    with pytest.raises(ValueError, match="not in the tokenizer's alphabet"):
        tok.encode("x")
    assert $Class($Config(alphabet="01", unknown="unk")).encode("0x") == [8, 3]


def test_config_round_trip():
    check_config_round_trip($Config, {"alphabet": "abc", "unknown": "unk"})


def test_registered_as_tokenizer():
    check_registration(plugin, "tokenizer", "$comp")
'''

RECIPE = {
    "tokenizer": 'type = "$comp"',
}

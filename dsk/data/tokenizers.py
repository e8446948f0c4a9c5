"""Tokenizers: text <-> token ids, torch-free.

Three tokenizers share one interface (:class:`Tokenizer`):

- :class:`CharTokenizer`: one id per character of a fixed alphabet that covers every built-in task (digits, operators,
  punctuation, ASCII letters and the accented letters of the spelled-out languages). The vocabulary is a constant,
  so a checkpoint trained with it decodes the same way in any process; ``to_json`` stores the alphabet anyway, so a
  checkpoint keeps working if the default alphabet ever grows.
- :class:`ByteTokenizer`: the 256 UTF-8 byte values, then the special tokens. Covers any text.
- :class:`HFTokenizer`: a ``tokenizer.json`` (BPE, WordLevel, ...) through the ``tokenizers`` library.

Special tokens come in two groups. *Control* tokens (``<pad>``, ``<bos>``, ``<eos>``) frame sequences and are dropped
by ``decode(skip_special=True)``. *Markup* tokens (``<think>``, ``</think>``, ``<answer>``, ``</answer>``) are part
of the text of an R1-style completion: ``encode`` turns each into a single id and ``decode`` always writes them back,
because rewards and answer checkers read them. Control tokens never come from text (``"<eos>"`` in a document is five
characters): only ``add_bos``/``add_eos`` add them, so data cannot inject an EOS or a pad.

``load_tokenizer(spec)`` builds any of them from a name, a path, a JSON string or a dict (the output of ``to_json``).
"""

from __future__ import annotations

import abc
import json
import re
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dsk.errors import InputError

__all__ = [
    "ANSWER_CLOSE",
    "ANSWER_OPEN",
    "BOS",
    "CONTROL_TOKENS",
    "DEFAULT_ALPHABET",
    "EOS",
    "MARKUP_TOKENS",
    "PAD",
    "THINK_CLOSE",
    "THINK_OPEN",
    "UNK",
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TokenizerFileError",
    "build_byte_tokenizer",
    "build_char_tokenizer",
    "build_hf_tokenizer",
    "load_tokenizer",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
CONTROL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS)
MARKUP_TOKENS: tuple[str, ...] = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

# Lower-case accented letters of the spelled-out task languages (fr, de, es) and their neighbours, so prompts and
# traces in those languages never hit <unk>. Appending to this string later changes no existing id: the ids of the
# characters before it stay put.
_ACCENTED = "àáâäæçèéêëìíîïñòóôöøùúûüÿßœ"
DEFAULT_ALPHABET: str = (
    " \t\n" + string.digits + string.punctuation + string.ascii_lowercase + string.ascii_uppercase + _ACCENTED
)
_FORMAT_VERSION = 1


class TokenizerFileError(InputError):
    """A tokenizer file is missing, unreadable or not a tokenizer (``file`` names it); the CLI reports it as bad
    input (exit 2)."""


@runtime_checkable
class Tokenizer(Protocol):
    """The interface every dsk tokenizer implements.

    Attributes:
        vocab_size: number of ids (the model's embedding needs at least this many rows).
        pad_id: id used to pad batches.
        bos_id: id prepended by ``encode(add_bos=True)``; None when the tokenizer has no BOS token.
        eos_id: id appended by ``encode(add_eos=True)`` and used to stop generation; None when there is none.
    """

    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; the markup tags in the text become their single ids."""
        ...

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; ``skip_special`` drops the control tokens (pad, bos, eos), never the markup tags."""
        ...

    def token_to_id(self, token: str) -> int | None:
        """Id of one token string (e.g. ``"</answer>"``), or None when it is not a single token."""
        ...

    def to_json(self) -> str:
        """A JSON string that ``load_tokenizer`` / ``from_json`` turn back into an identical tokenizer."""
        ...


def _special_pattern(tokens: Iterable[str]) -> re.Pattern[str]:
    # Longest first, so that a token that is a prefix of another can never shadow it.
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(f"({alternatives})")


def _as_dict(data: str | dict[str, Any], expected_type: str) -> dict[str, Any]:
    """Parse a ``to_json`` payload and check that it describes a tokenizer of ``expected_type``."""
    payload = json.loads(data) if isinstance(data, str) else dict(data)
    if payload.get("type") != expected_type:
        raise ValueError(f"tokenizer JSON has type {payload.get('type')!r}, expected {expected_type!r}")
    version = payload.get("version", _FORMAT_VERSION)
    if version > _FORMAT_VERSION:
        raise ValueError(f"tokenizer JSON version {version} is newer than this dsk understands ({_FORMAT_VERSION})")
    return payload


class _SpecialsTokenizer(abc.ABC):
    """Shared encode/decode for tokenizers whose ids are a fixed table of specials plus plain symbols.

    Subclasses set ``self._special_to_id`` through ``_init_specials`` and implement ``_encode_plain`` (text without
    special tokens -> ids) and ``_decode_plain`` (a run of non-special ids -> text).
    """

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def _init_specials(self, special_to_id: dict[str, int]) -> None:
        self._special_to_id = dict(special_to_id)
        self._id_to_special = {i: t for t, i in special_to_id.items()}
        # Only the markup tags are recognised in text; control tokens come from add_bos/add_eos alone.
        self._markup_re = _special_pattern(MARKUP_TOKENS)
        self.pad_id = special_to_id[PAD]
        self.bos_id = special_to_id[BOS]
        self.eos_id = special_to_id[EOS]

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Ids of text that holds no markup tag."""

    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Text of ids that hold no special id."""

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; ``<think>``, ``</answer>``... written in the text become single ids."""
        ids = [self.bos_id] if add_bos else []
        # re.split with one capturing group alternates plain text (even positions) and matched tags (odd).
        for k, piece in enumerate(self._markup_re.split(text)):
            if k % 2:
                ids.append(self._special_to_id[piece])
            elif piece:
                ids.extend(self._encode_plain(piece))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``. ``skip_special`` drops pad/bos/eos; markup tags and ``<unk>`` are always written."""
        out: list[str] = []
        run: list[int] = []
        for raw in ids:
            i = int(raw)  # accepts numpy / torch integers from ``tensor.tolist()`` or iteration
            special = self._id_to_special.get(i)
            if special is None:
                run.append(i)
                continue
            if run:
                out.append(self._decode_plain(run))
                run = []
            if not (skip_special and special in CONTROL_TOKENS):
                out.append(special)
        if run:
            out.append(self._decode_plain(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or of a single plain symbol; None otherwise."""
        if token in self._special_to_id:
            return self._special_to_id[token]
        try:
            ids = self._encode_plain(token) if token else []
        except ValueError:  # a character outside a strict char alphabet
            return None
        return ids[0] if len(ids) == 1 else None

    def _check_id(self, i: int) -> None:
        if not 0 <= i < self.vocab_size:
            raise ValueError(
                f"token id {i} is outside the vocabulary of {type(self).__name__} (size {self.vocab_size}); "
                "a model with a padded vocabulary sampled an id the tokenizer does not have"
            )


class CharTokenizer(_SpecialsTokenizer):
    """One id per character of a fixed alphabet, plus special tokens.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<think>`` 4, ``</think>`` 5, ``<answer>`` 6,
    ``</answer>`` 7, then the alphabet in order. The default alphabet (:data:`DEFAULT_ALPHABET`) covers every
    built-in task in every language.

    Args:
        alphabet: the characters, each once; their order fixes the ids.
        unknown: ``"error"`` raises on a character outside the alphabet (the default: silently training on
            ``<unk>`` hides data problems); ``"unk"`` maps it to ``<unk>``.
    """

    SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, UNK, *MARKUP_TOKENS)

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, *, unknown: str = "error"):
        if len(set(alphabet)) != len(alphabet):
            dupes = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"CharTokenizer alphabet repeats characters {dupes!r}; each must appear once")
        if unknown not in ("error", "unk"):
            raise ValueError(f"CharTokenizer unknown={unknown!r}: must be 'error' or 'unk'")
        self.alphabet = alphabet
        self.unknown = unknown
        n_special = len(self.SPECIALS)
        self._init_specials({t: i for i, t in enumerate(self.SPECIALS)})
        self.unk_id = self._special_to_id[UNK]
        self._stoi = {c: n_special + i for i, c in enumerate(alphabet)}
        self._itos = dict(enumerate(self.SPECIALS)) | {i: c for c, i in self._stoi.items()}
        self.vocab_size = n_special + len(alphabet)

    def _encode_plain(self, text: str) -> list[int]:
        stoi = self._stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        # Slow path only when something is unknown: find it for the error, or map it to <unk>.
        ids = []
        for pos, c in enumerate(text):
            i = stoi.get(c)
            if i is None:
                if self.unknown == "error":
                    raise ValueError(
                        f"character {c!r} (U+{ord(c):04X}) at position {pos} of {text[:40]!r} is not in the "
                        "CharTokenizer alphabet; use the byte tokenizer or CharTokenizer(unknown='unk')"
                    ) from None
                i = self.unk_id
            ids.append(i)
        return ids

    def _decode_plain(self, ids: list[int]) -> str:
        for i in ids:
            self._check_id(i)
        return "".join(self._itos[i] for i in ids)

    def to_json(self) -> str:
        """JSON with the alphabet and special tokens, so the ids survive any later change of the defaults."""
        return json.dumps(
            {
                "type": "char",
                "version": _FORMAT_VERSION,
                "specials": list(self.SPECIALS),
                "alphabet": self.alphabet,
                "unknown": self.unknown,
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> CharTokenizer:
        """Rebuild from ``to_json`` output (a string or the parsed dict)."""
        payload = _as_dict(data, "char")
        if list(payload.get("specials", cls.SPECIALS)) != list(cls.SPECIALS):
            raise ValueError(
                f"char tokenizer JSON has specials {payload['specials']!r}, expected {list(cls.SPECIALS)!r}"
            )
        return cls(payload["alphabet"], unknown=payload.get("unknown", "error"))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unknown={self.unknown!r})"


class ByteTokenizer(_SpecialsTokenizer):
    """UTF-8 bytes (ids 0..255), then ``<pad>``, ``<bos>``, ``<eos>`` and the four markup tags (256..262).

    Any text encodes; decoding an id sequence that is not valid UTF-8 (a model can sample one) writes U+FFFD
    for the broken bytes instead of raising.
    """

    SPECIALS: tuple[str, ...] = (PAD, BOS, EOS, *MARKUP_TOKENS)

    def __init__(self) -> None:
        self._init_specials({t: 256 + i for i, t in enumerate(self.SPECIALS)})
        self.vocab_size = 256 + len(self.SPECIALS)

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_plain(self, ids: list[int]) -> str:
        for i in ids:
            self._check_id(i)
        return bytes(ids).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """JSON naming the tokenizer; byte ids never change, so nothing else is stored."""
        return json.dumps({"type": "byte", "version": _FORMAT_VERSION, "specials": list(self.SPECIALS)})

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> ByteTokenizer:
        """Rebuild from ``to_json`` output."""
        payload = _as_dict(data, "byte")
        if list(payload.get("specials", cls.SPECIALS)) != list(cls.SPECIALS):
            raise ValueError(
                f"byte tokenizer JSON has specials {payload['specials']!r}, expected {list(cls.SPECIALS)!r}"
            )
        return cls()

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"


# Token strings tried, in order, when an HF tokenizer's special tokens are not named explicitly.
_HF_PAD_NAMES = ("<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_HF_BOS_NAMES = ("<bos>", "<s>", "[BOS]", "<|begin_of_text|>", "<｜begin▁of▁sentence｜>", "[CLS]")
_HF_EOS_NAMES = ("<eos>", "</s>", "[EOS]", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "[SEP]")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (loaded from a ``tokenizer.json``) behind the dsk interface.

    ``encode`` behaves like the other dsk tokenizers: the post-processor template is never applied (BOS/EOS only on
    request), the markup tags become their ids when the vocabulary has them (as added tokens, special or not), and
    the tokenizer's special tokens are never read from text (``encode_special_tokens`` on a private copy), so data
    cannot inject an EOS. Special ids are looked up by name; when a name is not given, common
    spellings are tried (``<pad>``/``[PAD]``, ``<s>``/``<bos>``, ``</s>``/``<eos>``/``<|endoftext|>``...). Without
    a pad token, padding uses the EOS id (pad positions are masked out of the loss anyway).

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        pad_token, bos_token, eos_token: explicit special token strings (must be in the vocabulary).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ):
        # A private copy: switching encode_special_tokens on must not change the caller's object.
        self._tok = type(tokenizer).from_str(tokenizer.to_str())
        self._tok.encode_special_tokens = True
        self._markup_ids = {t: i for t in MARKUP_TOKENS if (i := tokenizer.token_to_id(t)) is not None}
        self._markup_re = _special_pattern(MARKUP_TOKENS)
        tokenizer = self._tok
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos_token = self._resolve("bos_token", bos_token, _HF_BOS_NAMES)
        self.eos_token = self._resolve("eos_token", eos_token, _HF_EOS_NAMES)
        self.pad_token = self._resolve("pad_token", pad_token, _HF_PAD_NAMES) or self.eos_token
        if self.pad_token is None:
            raise ValueError(
                f"HF tokenizer has no pad or eos token among {_HF_PAD_NAMES + _HF_EOS_NAMES}; pass pad_token="
            )
        self.bos_id = None if self.bos_token is None else tokenizer.token_to_id(self.bos_token)
        self.eos_id = None if self.eos_token is None else tokenizer.token_to_id(self.eos_token)
        self.pad_id = tokenizer.token_to_id(self.pad_token)
        control = {self.pad_id, self.bos_id, self.eos_id} - {None}
        # Ids dropped by decode(skip_special=True): the control tokens and the tokenizer's own special tokens,
        # except the R1 markup tags, which are text the checkers read.
        added = tokenizer.get_added_tokens_decoder()
        self._skip_ids = frozenset(control) | frozenset(
            i for i, tok in added.items() if tok.special and tok.content not in MARKUP_TOKENS
        )

    def _resolve(self, what: str, given: str | None, candidates: tuple[str, ...]) -> str | None:
        if given is not None:
            if self._tok.token_to_id(given) is None:
                raise ValueError(f"HF tokenizer {what}={given!r} is not in its vocabulary")
            return given
        return next((c for c in candidates if self._tok.token_to_id(c) is not None), None)

    @classmethod
    def from_file(cls, path: str | Path, **special_tokens: str | None) -> HFTokenizer:
        """Load a ``tokenizer.json`` file (or a directory holding one)."""
        from tokenizers import Tokenizer as _HFTok

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerFileError("no tokenizer.json here", file=path)
        try:
            tokenizer = _HFTok.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception for unreadable or malformed files
            raise TokenizerFileError(f"not a tokenizer.json the tokenizers library reads ({exc})", file=path) from None
        try:
            return cls(tokenizer, **special_tokens)
        except ValueError as exc:  # a special token it lacks
            raise TokenizerFileError(str(exc), file=path) from None

    @classmethod
    def from_str(cls, text: str, **special_tokens: str | None) -> HFTokenizer:
        """Load from the contents of a ``tokenizer.json``."""
        from tokenizers import Tokenizer as _HFTok

        return cls(_HFTok.from_str(text), **special_tokens)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text`` (the markup tags become their ids when in the vocabulary); BOS/EOS on request."""
        ids: list[int] = []
        for k, piece in enumerate(self._markup_re.split(text)):
            if k % 2 and piece in self._markup_ids:
                ids.append(self._markup_ids[piece])
            elif piece:
                ids.extend(self._tok.encode(piece, add_special_tokens=False).ids)
        if add_bos:
            if self.bos_id is None:
                raise ValueError("this HF tokenizer has no BOS token; pass bos_token= or encode with add_bos=False")
            ids.insert(0, self.bos_id)
        if add_eos:
            if self.eos_id is None:
                raise ValueError("this HF tokenizer has no EOS token; pass eos_token= or encode with add_eos=False")
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; ``skip_special`` drops control and special tokens but keeps the markup tags."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary of the HF tokenizer (size {self.vocab_size})")
        if skip_special:
            ids = [i for i in ids if i not in self._skip_ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of one vocabulary entry, or None."""
        return self._tok.token_to_id(token)

    def to_json(self) -> str:
        """JSON holding the whole ``tokenizer.json`` and the special token names."""
        return json.dumps(
            {
                "type": "hf",
                "version": _FORMAT_VERSION,
                "pad_token": self.pad_token,
                "bos_token": self.bos_token,
                "eos_token": self.eos_token,
                "tokenizer": json.loads(self._tok.to_str()),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, data: str | dict[str, Any]) -> HFTokenizer:
        """Rebuild from ``to_json`` output."""
        payload = _as_dict(data, "hf")
        return cls.from_str(
            json.dumps(payload["tokenizer"]),
            pad_token=payload.get("pad_token"),
            bos_token=payload.get("bos_token"),
            eos_token=payload.get("eos_token"),
        )

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, pad={self.pad_token!r}, eos={self.eos_token!r})"


_BY_TYPE = {"char": CharTokenizer, "byte": ByteTokenizer, "hf": HFTokenizer}


def load_tokenizer(spec: Any) -> Tokenizer:
    """Build a tokenizer from any of the forms a recipe or a checkpoint stores.

    Args:
        spec: one of
            - a tokenizer object (returned as is);
            - ``"char"`` or ``"byte"`` (the default char / byte tokenizer);
            - a dict or JSON string written by ``to_json`` (``{"type": "char" | "byte" | "hf", ...}``);
            - a path to a file holding such JSON, to a ``tokenizer.json`` of the ``tokenizers`` library, or to a
              directory that holds a ``tokenizer.json``.

    Raises:
        ValueError: the spec is none of these (the message quotes it).
        TokenizerFileError: a path that does not exist, or a file that is not a tokenizer.
    """
    if isinstance(spec, (CharTokenizer, ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind not in _BY_TYPE:
            raise ValueError(f"tokenizer spec has type {kind!r}; expected one of {sorted(_BY_TYPE)}")
        return _BY_TYPE[kind].from_json(spec)
    if isinstance(spec, Path):
        spec = str(spec)
    if not isinstance(spec, str):
        raise ValueError(f"cannot build a tokenizer from a {type(spec).__name__}: {spec!r}")
    if spec == "char":
        return CharTokenizer()
    if spec == "byte":
        return ByteTokenizer()
    if spec.lstrip().startswith("{"):
        return load_tokenizer(json.loads(spec))
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise TokenizerFileError(f"tokenizer spec {spec!r} is not 'char', 'byte', JSON or an existing path")
    try:
        text = path.read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerFileError(f"cannot read tokenizer JSON ({exc})", file=path) from None
    # A dsk tokenizer JSON names its type at the top level; a tokenizers-library file never has a top-level "type".
    try:
        if isinstance(payload, dict) and payload.get("type") in _BY_TYPE:
            return load_tokenizer(payload)
        return HFTokenizer.from_str(text)
    except TokenizerFileError:
        raise
    except Exception as exc:  # ValueError from ours, a bare Exception from the tokenizers library
        raise TokenizerFileError(f"not a tokenizer ({exc})", file=path) from None


def build_char_tokenizer(config: Any) -> CharTokenizer:
    """Registry factory for ``tokenizer = "char"``: reads ``config.unknown`` (``"error"`` or ``"unk"``)."""
    return CharTokenizer(unknown=getattr(config, "unknown", "error"))


def build_byte_tokenizer(config: Any = None) -> ByteTokenizer:
    """Registry factory for ``tokenizer = "byte"`` (no options)."""
    return ByteTokenizer()


def build_hf_tokenizer(config: Any) -> HFTokenizer:
    """Registry factory for ``tokenizer = "hf"``: reads ``config.path`` and the optional special token names."""
    return HFTokenizer.from_file(
        config.path,
        pad_token=getattr(config, "pad_token", None),
        bos_token=getattr(config, "bos_token", None),
        eos_token=getattr(config, "eos_token", None),
    )

"""Configs of the built-in tasks and tokenizers (torch-free; validated when a recipe loads)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dsk.api import BaseConfig

__all__ = [
    "ArithmeticConfig",
    "CharTokenizerConfig",
    "CountdownConfig",
    "HFTokenizerConfig",
    "JsonlConfig",
    "MarkovConfig",
    "ModularConfig",
    "TaskConfig",
]

# Must match dsk.data.languages.LANGUAGES (kept literal here so validation needs no import of the tables).
Language = Literal["sym", "en", "fr", "de", "es"]


class TaskConfig(BaseConfig):
    """Options every built-in task shares: seeding, splits, trace, format and languages."""

    seed: int = Field(0, description="seed of the generator; a record is a pure function of (seed, split, index)")
    test_percent: int = Field(
        10,
        ge=1,
        le=99,
        description="share of all problems (by a hash of their canonical form, independent of the seed) that belong to "
        "the test split",
    )
    test_size: int = Field(100, ge=1, description="number of distinct problems in the test set (records('test'))")
    trace: bool = Field(
        True, description="completions reason in <think>…</think> before the answer; false: answer only"
    )
    format: Literal["tags", "r1", "bare"] = Field(
        "tags",
        description="tags: short prompt, completion <think>…</think><answer>…</answer>; r1: the same inside the "
        "DeepSeek-R1-Zero prompt template; bare: short prompt, completion is the answer alone (needs trace=false)",
    )
    require_format: bool | None = Field(
        None,
        description="check() reads the answer only from <answer>…</answer>; false: the whole text when there is no "
        "answer tag; unset: true unless format='bare'",
    )
    languages: list[Language] = Field(
        default_factory=lambda: ["sym"],
        min_length=1,
        description="languages a trace is written in, one drawn per record: sym (7+5=12) or spelled out "
        "(en: seven plus five is one two; fr, de, es)",
    )
    language_mix_rate: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="probability that a record's trace switches some steps to another of `languages` (R1-Zero's "
        "language mixing); needs two or more languages",
    )
    prompt_language: Language | Literal["target"] = Field(
        "target",
        description="language of the prompt's words: target = the record's trace language (so the prompt tells the "
        "model which language to reason in), or a fixed language",
    )

    @model_validator(mode="after")
    def _check_combinations(self):
        if len(set(self.languages)) != len(self.languages):
            raise ValueError(f"languages={self.languages}: each language may appear once")
        if self.language_mix_rate > 0 and len(self.languages) < 2:
            raise ValueError(
                f"language_mix_rate={self.language_mix_rate} needs at least two languages to mix, "
                f"got languages={self.languages}"
            )
        if self.format == "bare" and self.trace:
            raise ValueError("format='bare' has no place for a reasoning trace: set trace=false or format='tags'")
        if self.format == "bare" and self.require_format:
            raise ValueError("format='bare' writes no <answer> tag: require_format must be false or unset")
        return self

    @property
    def answer_tag_required(self) -> bool:
        """Whether check() insists on <answer>…</answer> (the resolved ``require_format``)."""
        return self.format != "bare" if self.require_format is None else self.require_format


class ArithmeticConfig(TaskConfig):
    """Multi-digit addition and multiplication with a column-wise scratchpad."""

    min_digits: int = Field(1, ge=1, le=18, description="fewest digits of an operand")
    max_digits: int = Field(3, ge=1, le=18, description="most digits of an operand")
    ops: list[Literal["+", "*"]] = Field(
        default_factory=lambda: ["+", "*"], min_length=1, description="operations to draw from"
    )

    @model_validator(mode="after")
    def _check_digits(self):
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits={self.min_digits} is larger than max_digits={self.max_digits}")
        return self


class CountdownConfig(TaskConfig):
    """Reach a target from a few numbers with + - * / (each number at most once)."""

    min_numbers: int = Field(3, ge=2, le=6, description="fewest numbers given")
    max_numbers: int = Field(4, ge=2, le=6, description="most numbers given")
    max_number: int = Field(20, ge=2, le=999, description="numbers are drawn from 1..max_number")
    max_target: int = Field(100, ge=2, description="targets lie in 1..max_target")
    ops: list[Literal["+", "-", "*", "/"]] = Field(
        default_factory=lambda: ["+", "-", "*", "/"], min_length=1, description="operations the solutions may use"
    )
    use_all: bool = Field(False, description="the reference solution uses every number (else two or more of them)")

    @model_validator(mode="after")
    def _check_numbers(self):
        if self.min_numbers > self.max_numbers:
            raise ValueError(f"min_numbers={self.min_numbers} is larger than max_numbers={self.max_numbers}")
        return self


class ModularConfig(TaskConfig):
    """(a op b) mod p: a single-token answer space, so a random policy is right about 1/p of the time."""

    modulus: int = Field(11, ge=2, le=10_000, description="the modulus p")
    max_operand: int = Field(30, ge=1, description="operands are drawn from 0..max_operand")
    ops: list[Literal["+", "-", "*"]] = Field(
        default_factory=lambda: ["+", "-", "*"], min_length=1, description="operations to draw from"
    )


class MarkovConfig(BaseConfig):
    """Text of a seeded random Markov chain with a known entropy rate (smooth pre-training with a loss floor)."""

    vocab: int = Field(16, ge=2, le=26, description="alphabet size: the first `vocab` lower-case letters")
    order: int = Field(2, ge=1, le=3, description="how many previous symbols the next symbol depends on")
    concentration: float = Field(
        0.5,
        gt=0.0,
        le=100.0,
        description="Dirichlet concentration of each context's next-symbol distribution: small values make a few "
        "symbols likely per context (lower entropy), large values approach uniform (entropy ln vocab)",
    )
    length: int = Field(
        64, ge=4, le=4096, description="symbols per record (one record is [BOS] text [EOS]); more than the order"
    )
    language_seed: int = Field(0, description="seed of the chain itself; the entropy rate depends on it alone")
    seed: int = Field(
        0, description="seed of the texts drawn from the chain; a record is a pure function of (seed, split, index)"
    )
    test_percent: int = Field(
        10,
        ge=1,
        le=99,
        description="share of all texts (by a hash of the text, independent of the seeds) in the test split",
    )
    test_size: int = Field(100, ge=1, description="number of distinct texts in records('test')")


class JsonlConfig(BaseConfig):
    """JSONL files as a task: {"text"} rows (pre-training) or {"prompt", "completion"[, "answer"]} rows (SFT)."""

    path: str | list[str] = Field(..., description="training JSONL file(s)")
    test_path: str | list[str] | None = Field(
        None, description="held-out JSONL file(s); unset: hold out test_percent of the rows of `path`"
    )
    kind: Literal["auto", "text", "sft"] = Field("auto", description="row kind; auto: decided by the first row")
    seed: int = Field(0, description="seed of the order in which rows are sampled (reshuffled every epoch)")
    test_percent: int = Field(
        0,
        ge=0,
        le=99,
        description="share of rows (by a hash of the prompt or text, so duplicates stay together) held out for test "
        "when test_path is unset; 0: no test split",
    )
    test_size: int | None = Field(None, ge=1, description="at most this many test rows; unset: all of them")
    require_format: bool = Field(
        True, description="check() reads the answer only from <answer>…</answer>; false: the whole text otherwise"
    )

    @model_validator(mode="after")
    def _check_split(self):
        if self.test_path is not None and self.test_percent:
            raise ValueError(
                f"test_path={self.test_path!r} and test_percent={self.test_percent} both define a test split; set one"
            )
        return self


class CharTokenizerConfig(BaseConfig):
    """Options of the character tokenizer."""

    unknown: Literal["error", "unk"] = Field(
        "error", description="a character outside the alphabet raises (error) or becomes <unk> (unk)"
    )


class HFTokenizerConfig(BaseConfig):
    """A tokenizer.json of the Hugging Face `tokenizers` library."""

    path: str = Field(..., description="path to a tokenizer.json or to a directory holding one")
    pad_token: str | None = Field(None, description="pad token string; unset: <pad>/[PAD]…, else the EOS token")
    bos_token: str | None = Field(None, description="BOS token string; unset: <s>/<bos>/… when present")
    eos_token: str | None = Field(None, description="EOS token string; unset: </s>/<eos>/<|endoftext|>… when present")

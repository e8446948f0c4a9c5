"""Hook implementations of dsk_tasks: registers the built-in tasks and tokenizers (torch-free, lazy)."""

from dsk import hookimpl
from dsk.api import NoConfig
from dsk_tasks.config import (
    ArithmeticConfig,
    CharTokenizerConfig,
    CountdownConfig,
    HFTokenizerConfig,
    JsonlConfig,
    MarkovConfig,
    ModularConfig,
)


@hookimpl
def register_tasks(register):
    """Register the tasks (kind ``task``) and the tokenizers (kind ``tokenizer``)."""
    register(
        "task",
        "arithmetic",
        "dsk_tasks.arithmetic:ArithmeticTask",
        config=ArithmeticConfig,
        summary="multi-digit addition and multiplication with a column-wise scratchpad",
    )
    register(
        "task",
        "countdown",
        "dsk_tasks.countdown:CountdownTask",
        config=CountdownConfig,
        summary="reach a target from 3-4 numbers with + - * /, checked without eval",
    )
    register(
        "task",
        "modular",
        "dsk_tasks.modular:ModularTask",
        config=ModularConfig,
        summary="(a op b) mod p: small answer space, RL works from a random init",
    )
    register(
        "task",
        "jsonl",
        "dsk_tasks.jsonl:JsonlTask",
        config=JsonlConfig,
        summary="rows of JSONL files: {text} for pre-training or {prompt, completion[, answer]} for SFT",
    )
    register(
        "task",
        "markov",
        "dsk_tasks.markov:MarkovTask",
        config=MarkovConfig,
        summary="text of a seeded random order-k Markov chain: smooth pre-training loss with a known floor",
    )
    register(
        "tokenizer",
        "char",
        "dsk.data.tokenizers:build_char_tokenizer",
        config=CharTokenizerConfig,
        summary="one id per character of a fixed alphabet covering every built-in task, plus R1 tags",
    )
    register(
        "tokenizer",
        "byte",
        "dsk.data.tokenizers:build_byte_tokenizer",
        config=NoConfig,
        summary="UTF-8 bytes plus pad/bos/eos and R1 tags",
    )
    register(
        "tokenizer",
        "hf",
        "dsk.data.tokenizers:build_hf_tokenizer",
        config=HFTokenizerConfig,
        summary="a tokenizer.json of the Hugging Face tokenizers library",
    )

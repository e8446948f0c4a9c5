"""Evaluation on a task's test split: greedy accuracy (KV-cached generation) and optional pass@k with sampling.

A prompt is encoded as in training (``[BOS] + encode(prompt)``); the model continues until EOS or
``max_new_tokens``; the decoded continuation goes to the task's ``check(record, text)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["evaluate_task", "test_records", "pass_at_k"]


def test_records(task: Any, n: int) -> list[dict[str, Any]]:
    """``n`` distinct test problems of ``task`` (fewer when the split is smaller); [] when the task has no test split.

    A task exposes ``records("test", n)`` (built-in tasks) or is a plain sequence of records (no test split).
    """
    if n <= 0 or not hasattr(task, "records") or not hasattr(task, "check"):
        return []
    records: list[dict[str, Any]] = []
    for m in (n, n // 2, n // 4, 16, 1):  # a small problem space: as many distinct test problems as it holds
        try:
            records = list(task.records("test", max(m, 1)))
            break
        except ValueError:
            continue
    # text-only rows (a JSONL corpus) have nothing to prompt with
    return [r for r in records if "prompt" in r]


def pass_at_k(n_correct: int, n_samples: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 - C(n-c, k) / C(n, k)`` (Chen et al. 2021) for one problem."""
    if n_samples - n_correct < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n_samples - n_correct + 1, n_samples + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _encode_prompts(tokenizer: Any, records: list[dict[str, Any]]) -> list[list[int]]:
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [head + tokenizer.encode(r["prompt"]) for r in records]


def _generate_texts(model, tokenizer, prompts, *, max_new_tokens, batch_size, temperature, generator):
    from dsk.model.generate import generate

    texts: list[str] = []
    new_tokens = 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        result = generate(
            model,
            chunk,
            max_new_tokens,
            temperature=temperature,
            eos_id=tokenizer.eos_id,
            generator=generator,
            pad_id=tokenizer.pad_id,
        )
        new_tokens += sum(result.lengths)
        texts.extend(tokenizer.decode(tokens) for tokens in result.tokens)
    return texts, new_tokens


@torch.no_grad()
def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Any,
    records: list[dict[str, Any]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 256,
    pass_k: int = 0,
    temperature: float = 0.8,
    seed: int = 0,
    examples: int = 0,
) -> dict[str, Any]:
    """Greedy accuracy (and pass@k) of ``model`` on ``records``.

    Args:
        model: a :class:`dsk.model.DSKModel` (switched to eval mode for the call, then restored).
        tokenizer: the run's tokenizer.
        task: has ``check(record, completion_text) -> bool``.
        records: test records (``prompt`` plus whatever ``check`` reads).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per generation batch.
        pass_k: k samples per prompt at ``temperature`` for pass@k (0: off).
        temperature: sampling temperature of the pass@k samples.
        seed: seed of the sampling generator (so an evaluation never draws from, or moves, the global RNG).
        examples: how many (prompt, completion, correct) triples to return under ``"examples"``.

    Returns:
        ``{"eval/accuracy", "eval/samples", "eval/new_tokens_mean", "eval/seconds"}`` (+ ``"eval/pass@k"``, and
        ``"examples"`` when asked).
    """
    if not records:
        return {}
    started = time.perf_counter()
    prompts = _encode_prompts(tokenizer, records)
    room = min(max_new_tokens, model.config.max_seq_len - max(len(p) for p in prompts))
    if room < 1:
        raise ValueError(
            f"the longest test prompt has {max(len(p) for p in prompts)} tokens: no room to generate under "
            f"model.max_seq_len = {model.config.max_seq_len}"
        )
    texts, new_tokens = _generate_texts(
        model, tokenizer, prompts, max_new_tokens=room, batch_size=batch_size, temperature=0.0, generator=None
    )
    correct = [bool(task.check(r, t)) for r, t in zip(records, texts, strict=True)]
    out: dict[str, Any] = {
        "eval/accuracy": sum(correct) / len(correct),
        "eval/samples": len(correct),
        "eval/new_tokens_mean": new_tokens / len(correct),
    }
    if pass_k > 0:
        device = model.embed_tokens.weight.device
        generator = torch.Generator(device=device).manual_seed(seed)
        repeated = [p for p in prompts for _ in range(pass_k)]  # k consecutive samples per prompt
        sampled, _ = _generate_texts(
            model, tokenizer, repeated, max_new_tokens=room, batch_size=batch_size, temperature=temperature,
            generator=generator,
        )  # fmt: skip
        scores = []
        for i, record in enumerate(records):
            hits = sum(bool(task.check(record, t)) for t in sampled[i * pass_k : (i + 1) * pass_k])
            scores.append(pass_at_k(hits, pass_k, pass_k))
        out[f"eval/pass@{pass_k}"] = sum(scores) / len(scores)
    out["eval/seconds"] = time.perf_counter() - started
    if examples:
        out["examples"] = [
            {"prompt": r["prompt"], "completion": t, "correct": c}
            for r, t, c in list(zip(records, texts, correct, strict=True))[:examples]
        ]
    return out

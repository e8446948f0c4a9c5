"""Evaluation on a task's test split: greedy accuracy (KV-cached generation) and optional pass@k with sampling, and
the held-out loss of text data (:func:`evaluate_loss`: mean next-token cross-entropy and perplexity).

A prompt is encoded as in training (``[BOS] + encode(prompt)``); the model continues until EOS or
``max_new_tokens``; the decoded continuation goes to the task's ``check(record, text)``.

Many ranks (``parallel`` given, more than one data rank): each data rank evaluates its share of the records and
the counts are all-reduced, so an evaluation costs 1/W of one process and reports the same numbers. Every rank
runs the same number of generation calls (a short share is padded with repeats whose results are dropped) and
each call's stop decision is agreed (:func:`dsk.model.generate.done_across_ranks`), so a sharded model, whose
every forward is a collective, never waits on a rank that has stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["evaluate_loss", "evaluate_task", "pass_at_k", "test_records", "test_text_records"]


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


def test_text_records(task: Any, n: int) -> list[dict[str, Any]]:
    """The first ``n`` text records (``{"text"}``, no prompt) of ``task``'s test split, for the held-out loss.

    [] when the task has no ``records`` method, when its test split is empty or missing, or when its test records
    are problems with a prompt (those are measured by accuracy, :func:`test_records`).
    """
    if n <= 0 or not hasattr(task, "records"):
        return []
    try:
        records = list(task.records("test", n))
    except ValueError:  # DataError included: the split holds no rows
        return []
    return [r for r in records if "text" in r and "prompt" not in r]


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


def _generate_texts(
    model, tokenizer, prompts, *, max_new_tokens, batch_size, temperature, generators=None, sync_done=None
):
    """Texts and per-row new-token counts of ``prompts``, ``batch_size`` rows per call.

    ``generators``: one per block of ``len(prompts) / len(generators)`` consecutive rows (a call holds whole
    blocks); ``sync_done``: :func:`dsk.model.generate.generate`'s.
    """
    from dsk.model.generate import generate

    per = len(prompts) // len(generators) if generators else 1
    step = max(per, batch_size // per * per)  # whole blocks per call
    texts: list[str] = []
    lengths: list[int] = []
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        result = generate(
            model, chunk, max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
            generator=generators[start // per : (start + len(chunk)) // per] if generators else None,
            pad_id=tokenizer.pad_id, sync_done=sync_done,
        )  # fmt: skip
        lengths.extend(result.lengths)
        texts.extend(tokenizer.decode(tokens) for tokens in result.tokens)
    return texts, lengths


def _shares(n: int, parallel: Any) -> tuple[list[int], int]:
    """This data rank's record indices, padded with repeats to the same count on every rank, and how many are real."""
    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    rank = int(parallel.data_rank) if world > 1 else 0
    share = -(-n // world)  # records per rank, the last shares padded
    first = rank * share
    mine = list(range(first, min(first + share, n)))
    return mine + [mine[-1] if mine else 0] * (share - len(mine)), len(mine)


def _record_generator(device: Any, seed: int, index: int) -> torch.Generator:
    """The pass@k generator of test record ``index`` (the same whatever share of the records a rank holds)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1))


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
    parallel: Any = None,
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
        examples: how many (prompt, completion, correct) triples to return under ``"examples"`` (from the first
            records; on the writing rank when the records are shared out).
        parallel: the run's parallel strategy (``BuiltRun.parallel``); with more than one rank every rank must call
            this with the same records (module docstring). None: one process.

    Returns:
        ``{"eval/accuracy", "eval/samples", "eval/new_tokens_mean", "eval/seconds"}`` (+ ``"eval/pass@k"``, and
        ``"examples"`` when asked).
    """
    if not records:
        return {}
    from dsk.model.generate import done_across_ranks

    started = time.perf_counter()
    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    index, n_real = _shares(len(records), parallel)  # padded: the same calls on every rank
    local = [records[i] for i in index]
    sync_done = done_across_ranks(parallel) if world > 1 else None
    prompts = _encode_prompts(tokenizer, local)
    longest = max(len(p) for p in _encode_prompts(tokenizer, records))  # the same budget on every rank
    room = min(max_new_tokens, model.config.max_seq_len - longest)
    if room < 1:
        raise ValueError(
            f"the longest test prompt has {longest} tokens: no room to generate under "
            f"model.max_seq_len = {model.config.max_seq_len}"
        )
    texts, lengths = _generate_texts(
        model, tokenizer, prompts, max_new_tokens=room, batch_size=batch_size, temperature=0.0, sync_done=sync_done
    )
    correct = [bool(task.check(r, t)) for r, t in zip(local, texts, strict=True)][:n_real]
    sums = [float(sum(correct)), float(sum(lengths[:n_real]))]
    if pass_k > 0:
        device = model.embed_tokens.weight.device
        generators = [_record_generator(device, seed, i) for i in index]
        repeated = [p for p in prompts for _ in range(pass_k)]  # k consecutive samples per prompt
        sampled, _ = _generate_texts(
            model, tokenizer, repeated, max_new_tokens=room, batch_size=batch_size, temperature=temperature,
            generators=generators, sync_done=sync_done,
        )  # fmt: skip
        scores = []
        for i, record in enumerate(local[:n_real]):
            hits = sum(bool(task.check(record, t)) for t in sampled[i * pass_k : (i + 1) * pass_k])
            scores.append(pass_at_k(hits, pass_k, pass_k))
        sums.append(float(sum(scores)))
    if world > 1:
        sums = parallel.all_reduce(torch.tensor(sums, dtype=torch.float64), "sum").tolist()
    n = len(records)
    out: dict[str, Any] = {
        "eval/accuracy": sums[0] / n,
        "eval/samples": n,
        "eval/new_tokens_mean": sums[1] / n,
    }
    if pass_k > 0:
        out[f"eval/pass@{pass_k}"] = sums[2] / n
    out["eval/seconds"] = time.perf_counter() - started
    if examples:
        out["examples"] = [
            {"prompt": r["prompt"], "completion": t, "correct": c}
            for r, t, c in list(zip(local, texts, correct, strict=True))[:examples]
        ]
    return out


@torch.no_grad()
def evaluate_loss(
    model: Any,
    records: list[dict[str, Any]],
    *,
    encode: Callable[[dict[str, Any]], tuple[list[int], list[int]]],
    pad_id: int,
    max_len: int,
    batch_size: int = 256,
    parallel: Any = None,
) -> dict[str, Any]:
    """Held-out loss of ``model`` on ``records``: the mean next-token cross-entropy over their target tokens.

    Each record is one row: ``encode(record)`` gives ``(ids, loss_mask)`` (the trainer's encoding, so the targets
    are those of training), cut to ``max_len`` tokens as the training batches are, padded with ``pad_id``. The loss
    is training's LM term (:func:`dsk.model.loss.cross_entropy` on the shifted labels) without the MTP and
    auxiliary terms, computed in eval mode without gradients and averaged over every target token of all records
    (padding and masked tokens are no targets), not over batches.

    Args:
        model: a :class:`dsk.model.DSKModel` (switched to eval mode for the call, then restored).
        records: the records (``{"text"}`` rows of a test split).
        encode: ``record -> (ids, loss_mask)``.
        pad_id: the tokenizer's pad id.
        max_len: most tokens per row (the trainer's ``seq_len``).
        batch_size: rows per forward.
        parallel: the run's parallel strategy; with more than one data rank every rank calls this with the same
            records, evaluates its share in the same number of forwards, and the sums are all-reduced. None: one
            process.

    Returns:
        ``{"eval/loss", "eval/ppl" (= exp(eval/loss)), "eval/samples", "eval/tokens"}`` (tokens: the targets
        scored); {} when there are no records.
    """
    if not records:
        return {}
    import torch.nn.functional as F

    from dsk.data.batching import IGNORE_INDEX, collate
    from dsk.model.loss import cross_entropy

    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    index, n_real = _shares(len(records), parallel)
    rows = []
    for j, i in enumerate(index):
        ids, mask = encode(records[i])
        rows.append((ids, mask if j < n_real else [0] * len(mask)))  # a repeat that pads the share scores nothing
    device = model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    one = torch.ones((), device=device)
    try:
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size], pad_id, max_len)
            input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids).logits  # (B, T, V)
            # logits at t-1 score the label at t (dsk.model.loss.lm_loss), summed here (denominator 1)
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            total += cross_entropy(logits, targets, denominator=one).double()
            count += (targets != IGNORE_INDEX).sum().double()
    finally:
        model.train(was_training)
    sums = torch.stack([total, count])
    if world > 1:
        sums = parallel.all_reduce(sums, "sum")
    total_f, count_f = (float(v) for v in sums.tolist())
    if count_f == 0:
        return {}
    loss = total_f / count_f
    ppl = math.exp(loss) if loss < 700 else math.inf
    return {"eval/loss": loss, "eval/ppl": ppl, "eval/samples": len(records), "eval/tokens": int(count_f)}

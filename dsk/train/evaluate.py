"""Evaluation on a task's test split: greedy accuracy (KV-cached generation), the means of reward components on
the same completions, optional sampling (pass@k and the sampled means, from one pass of k samples per prompt), and
the held-out loss of text data (:func:`evaluate_loss`: mean next-token cross-entropy and perplexity).

A prompt is encoded as in training (``[BOS] + encode(prompt)``); the model continues until EOS or
``max_new_tokens``; the decoded continuation goes to the task's ``check(record, text)`` and to each reward
(:func:`score_rewards`, the reward contract: ``fn(config, prompts, completions, **columns)``).

Many ranks (``parallel`` given, more than one data rank): each data rank evaluates its share of the records and
the counts are all-reduced, so an evaluation costs 1/W of one process and reports the same numbers. Every rank
runs the same number of generation calls (a short share is padded with repeats whose results are dropped) and
each call's stop decision is agreed (:func:`dsk.model.generate.done_across_ranks`), so a sharded model, whose
every forward is a collective, never waits on a rank that has stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["evaluate_loss", "evaluate_task", "pass_at_k", "score_rewards", "test_records", "test_text_records"]


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


class _Generated:
    """Completions of a list of prompts: decoded texts, generated ids (EOS included when produced), and whether
    each stopped at the length limit."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.tokens: list[list[int]] = []
        self.truncated: list[bool] = []


def _generate_texts(
    model, tokenizer, prompts, *, max_new_tokens, batch_size, temperature, generators=None, sync_done=None
) -> _Generated:
    """The completions of ``prompts``, ``batch_size`` rows per call.

    ``generators``: one per block of ``len(prompts) / len(generators)`` consecutive rows (a call holds whole
    blocks); ``sync_done``: :func:`dsk.model.generate.generate`'s.
    """
    from dsk.model.generate import generate

    per = len(prompts) // len(generators) if generators else 1
    step = max(per, batch_size // per * per)  # whole blocks per call
    out = _Generated()
    for start in range(0, len(prompts), step):
        chunk = prompts[start : start + step]
        result = generate(
            model, chunk, max_new_tokens, temperature=temperature, eos_id=tokenizer.eos_id,
            generator=generators[start // per : (start + len(chunk)) // per] if generators else None,
            pad_id=tokenizer.pad_id, sync_done=sync_done,
        )  # fmt: skip
        out.tokens.extend(list(t) for t in result.tokens)
        out.truncated.extend(result.truncated)
        out.texts.extend(tokenizer.decode(tokens) for tokens in result.tokens)
    return out


def _shares(n: int, parallel: Any) -> tuple[list[int], int]:
    """This data rank's record indices, padded with repeats to the same count on every rank, and how many are real."""
    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    rank = int(parallel.data_rank) if world > 1 else 0
    share = -(-n // world)  # records per rank, the last shares padded
    first = rank * share
    mine = list(range(first, min(first + share, n)))
    return mine + [mine[-1] if mine else 0] * (share - len(mine)), len(mine)


def _record_generator(device: Any, seed: int, index: int) -> torch.Generator:
    """The sampling generator of test record ``index`` (the same whatever share of the records a rank holds)."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + index * 7_919 + 17) % (2**63 - 1))


def _device(model: Any) -> torch.device:
    embed = getattr(model, "embed_tokens", None)
    return embed.weight.device if embed is not None else next(model.parameters()).device


def score_rewards(
    rewards: Mapping[str, Any],
    records: Sequence[dict[str, Any]],
    completions: Sequence[str],
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    truncated: Sequence[bool] | None = None,
    max_completion_length: int | None = None,
    checker: Callable[[dict[str, Any], str], Any] | None = None,
    registry: Any = None,
    prompts: Sequence[str] | None = None,
) -> dict[str, list[float | None]]:
    """Every reward of ``rewards`` on the completions, as the reward contract calls it (docs/plugins.md).

    ``fn(config, prompts, completions, **columns)`` with the records' keys as columns (one list each; a key missing
    from a record is None there; ``prompt`` and ``completion`` are left out, the latter would clash with the
    reference completion of SFT data), ``completion_ids`` and ``truncated`` where given, and the scalars
    ``max_completion_length``, ``checker`` (the task's ``check``) and ``registry`` (for rewards that look
    components up by name).

    Args:
        rewards: ``{name: slot}``, each a resolved reward slot (``slot.load()`` gives the function, ``slot.config``
            its options).
        records: the record of each completion (repeated for several completions of one prompt).
        completions: the decoded completions, one per record.
        prompts: the prompt of each completion as the rewards should see it (default: each record's ``prompt``).

    Returns:
        ``{name: [value or None per completion]}`` (None: the reward does not apply to that completion).

    Raises:
        ValueError: a reward returned a list of the wrong length or a value that is not a number.
    """
    n = len(completions)
    keys = sorted({k for r in records for k in r} - {"prompt", "completion"})
    columns: dict[str, Any] = {k: [r.get(k) for r in records] for k in keys}
    if completion_ids is not None:
        columns["completion_ids"] = [list(c) for c in completion_ids]
    if truncated is not None:
        columns["truncated"] = list(truncated)
    if prompts is None:
        prompts = [r["prompt"] for r in records]
    out: dict[str, list[float | None]] = {}
    for name, slot in rewards.items():
        values = slot.load()(
            slot.config, list(prompts), list(completions), **columns,
            max_completion_length=max_completion_length, checker=checker, registry=registry,
        )  # fmt: skip
        if len(values) != n:
            raise ValueError(f"reward '{name}' returned {len(values)} values for {n} completions")
        for v in values:
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ValueError(f"reward '{name}' returned {v!r}; expected a float or None")
        out[name] = [None if v is None else float(v) for v in values]
    return out


class _Sums:
    """``(total, count)`` pairs by key, all-reduced in one call; a mean is ``total / count`` (None when count is 0)."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.values: list[float] = []

    def add(self, key: str, values: Sequence[float | None]) -> None:
        """The values of one key on this rank (None: not counted)."""
        valid = [float(v) for v in values if v is not None]
        self.keys.append(key)
        self.values += [sum(valid), float(len(valid))]

    def means(self, parallel: Any, world: int) -> dict[str, float | None]:
        sums = self.values
        if world > 1:
            sums = parallel.all_reduce(torch.tensor(sums, dtype=torch.float64), "sum").tolist()
        return {k: (sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else None) for i, k in enumerate(self.keys)}


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
    rewards: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on ``records``, the rewards' means on the same completions, and with ``pass_k``
    the same figures over ``pass_k`` sampled completions per record (and pass@k).

    Args:
        model: a :class:`dsk.model.DSKModel` (switched to eval mode for the call, then restored).
        tokenizer: the run's tokenizer.
        task: has ``check(record, completion_text) -> bool``.
        records: test records (``prompt`` plus whatever ``check`` and the rewards read).
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per generation batch.
        pass_k: k samples per prompt at ``temperature``, drawn once, for pass@k and the ``sampled_*`` means
            (0: no sampling).
        temperature: sampling temperature of the k samples.
        seed: seed of the per-record sampling generators (record i draws from its own, seeded from ``seed`` and
            i, so an evaluation never draws from, or moves, the global RNG, and gives the same samples whatever
            ranks hold the records).
        examples: how many (prompt, completion, correct) triples to return under ``"examples"`` (from the first
            records; on the writing rank when the records are shared out).
        parallel: the run's parallel strategy (``BuiltRun.parallel``); with more than one rank every rank must call
            this with the same records (module docstring). None: one process.
        rewards: ``{name: resolved reward slot}`` scored on every completion (:func:`score_rewards`); a reward
            named like a key of the result (``accuracy``) is not scored: the task's checker gives that key.
        registry: the component registry passed to the rewards (``registry=``).

    Returns:
        ``{"eval/accuracy", "eval/samples", "eval/new_tokens_mean", "eval/truncated", "eval/<reward>"...,
        "eval/seconds"}``; with ``pass_k`` also ``"eval/pass@k"``, ``"eval/sampled_accuracy"`` (the share of the
        n * k samples the checker accepts) and ``"eval/sampled_<reward>"``; ``"examples"`` when asked. A reward's
        mean is over the completions it applies to, None (null in JSON) when it applies to none.
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
    builtin = {"accuracy", "samples", "new_tokens_mean", "truncated", "seconds"}
    scored = {k: v for k, v in (rewards or {}).items() if k not in builtin and not k.startswith("pass@")}

    def score(rows: list[dict[str, Any]], gen: _Generated, count: int) -> dict[str, list[float | None]]:
        return score_rewards(
            scored, rows, gen.texts[:count], completion_ids=gen.tokens[:count], truncated=gen.truncated[:count],
            max_completion_length=room, checker=task.check, registry=registry,
        )  # fmt: skip

    greedy = _generate_texts(
        model, tokenizer, prompts, max_new_tokens=room, batch_size=batch_size, temperature=0.0, sync_done=sync_done
    )
    mine = local[:n_real]
    correct = [bool(task.check(r, t)) for r, t in zip(local, greedy.texts, strict=True)][:n_real]
    sums = _Sums()
    sums.add("eval/accuracy", [float(c) for c in correct])
    sums.add("eval/new_tokens_mean", [float(len(t)) for t in greedy.tokens[:n_real]])
    sums.add("eval/truncated", [float(t) for t in greedy.truncated[:n_real]])
    for name, values in score(mine, greedy, n_real).items():
        sums.add(f"eval/{name}", values)
    if pass_k > 0:
        generators = [_record_generator(_device(model), seed, i) for i in index]
        repeated = [p for p in prompts for _ in range(pass_k)]  # k consecutive samples per prompt
        sampled = _generate_texts(
            model, tokenizer, repeated, max_new_tokens=room, batch_size=batch_size, temperature=temperature,
            generators=generators, sync_done=sync_done,
        )  # fmt: skip
        rows = [r for r in mine for _ in range(pass_k)]  # the record of each real sample
        hits = [bool(task.check(r, t)) for r, t in zip(rows, sampled.texts, strict=False)]
        per_record = [sum(hits[i * pass_k : (i + 1) * pass_k]) for i in range(n_real)]
        sums.add(f"eval/pass@{pass_k}", [pass_at_k(h, pass_k, pass_k) for h in per_record])
        sums.add("eval/sampled_accuracy", [float(h) for h in hits])
        for name, values in score(rows, sampled, len(rows)).items():
            sums.add(f"eval/sampled_{name}", values)
    means = sums.means(parallel, world)
    n = len(records)
    out: dict[str, Any] = {"eval/accuracy": means.pop("eval/accuracy"), "eval/samples": n, **means}
    out["eval/seconds"] = time.perf_counter() - started
    if examples:
        out["examples"] = [
            {"prompt": r["prompt"], "completion": t, "correct": c}
            for r, t, c in list(zip(local, greedy.texts, correct, strict=False))[:examples]
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

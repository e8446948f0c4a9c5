"""Rollouts shared by the post-training trainers: prompts -> sampled completions -> rewards -> training tensors.

- :func:`encode_prompts` writes prompts as evaluation and SFT do (``[BOS] + encode(prompt)``), so the policy sees the
  same tokens in every stage;
- :func:`sample` draws ``n`` completions per prompt with the model's batched KV-cached :func:`dsk.model.generate`;
- :func:`score` calls the reward slots and returns the ``[N, K]`` reward matrix (NaN = None);
- :func:`pack` lays prompt + completion rows out right-padded for one causal forward, with the index of the logit
  that predicts each completion token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsk.api.runtime import score_rewards

__all__ = ["Packed", "RewardScores", "Samples", "encode_prompts", "pack", "sample", "score"]


def encode_prompts(tokenizer: Any, records: Sequence[dict[str, Any]]) -> list[list[int]]:
    """``[BOS] + encode(prompt)`` per record (the layout of ``dsk.train.evaluate`` and of SFT examples)."""
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return [head + tokenizer.encode(r["prompt"]) for r in records]


@dataclass
class Samples:
    """Completions of a batch of prompts, ``n`` consecutive ones per prompt (one GRPO group each).

    Attributes:
        prompt_ids: token ids of each completion's prompt (repeated per completion).
        completion_ids: generated ids, EOS included when produced.
        truncated: the completion stopped at the length limit, not at EOS.
        texts: completions decoded without control tokens (markup such as ``<think>`` kept).
        drafted, accepted: speculative sampling's draft tokens proposed and accepted, all rows (0 without it).
        forwards: the policy's forwards per row summed over the generation calls, prefills included (0 without
            speculation: then it is one per generated token).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]
    texts: list[str]
    drafted: int = 0
    accepted: int = 0
    forwards: int = 0

    def __len__(self) -> int:
        return len(self.completion_ids)


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[list[int]],
    n: int,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    sync_done: Callable[[bool], bool] | None = None,
    max_prompt_len: int | None = None,
    drafter: str | None = None,
) -> Samples:
    """``n`` completions of each prompt (KV-cached, batched ``batch_size`` completions per call).

    The budget is capped by the model's context: a prompt of P tokens leaves ``max_seq_len - P`` new tokens, P the
    longest prompt given, or ``max_prompt_len`` (the longest of the whole step on every rank, so that the budget
    does not depend on which prompts a rank holds).

    ``generator``: one for the whole batch, or one per prompt (its group of ``n`` completions draws from it alone);
    then a call holds whole groups (``batch_size // n`` of them, at least one), and a group samples the same
    completions whichever prompts it is batched with and on whichever rank. ``sync_done``: ``generate``'s (every
    rank runs the same number of forwards; every rank must make the same number of calls).

    ``drafter``: speculative sampling with the drafter a model component offers under this name
    (:func:`dsk.api.runtime.speculative_generate`): the completions keep exactly the distribution of plain sampling
    (greedy ones are identical), drawn with other random numbers; a group's draws then also depend on the rows it
    is batched with (a round drafts as many tokens for every row), which a fixed ``generation_batch_size`` keeps
    reproducible.
    """
    from dsk.api.runtime import generate, speculative_generate

    repeated = [list(p) for p in prompt_ids for _ in range(n)]
    longest = max(max(len(p) for p in repeated), max_prompt_len or 0)
    room = model.config.max_seq_len - longest
    budget = min(max_new_tokens, room)
    if budget < 1:
        raise ValueError(f"a prompt of {longest} tokens leaves no room under model.max_seq_len")
    groups = None if generator is None or isinstance(generator, torch.Generator) else list(generator)
    if groups is not None and len(groups) != len(prompt_ids):
        raise ValueError(f"{len(groups)} generators for {len(prompt_ids)} prompts: give one per prompt")
    step = batch_size if groups is None else max(1, batch_size // n) * n
    tokens: list[list[int]] = []
    truncated: list[bool] = []
    drafted = accepted = forwards = 0
    for start in range(0, len(repeated), step):
        gen = generator if groups is None else groups[start // n : (start + step) // n]
        rows = repeated[start : start + step]
        kw = {"temperature": temperature, "top_p": top_p, "generator": gen, "pad_id": tokenizer.pad_id}
        if drafter is None:
            out = generate(model, rows, budget, eos_id=tokenizer.eos_id, sync_done=sync_done, **kw)
        else:
            out = speculative_generate(
                model, rows, budget, tokenizer.eos_id, drafter=drafter, sync_done=sync_done, **kw
            )
            drafted += sum(out.drafted)
            accepted += sum(out.accepted)
            forwards += len(rows) * (out.verify_steps + 1)
        tokens.extend(out.tokens)
        truncated.extend(out.truncated)
    texts = [tokenizer.decode(t) for t in tokens]
    return Samples(repeated, tokens, truncated, texts, drafted, accepted, forwards)


@dataclass
class RewardScores:
    """Rewards of N completions under K reward functions.

    Attributes:
        names: the recipe keys of the rewards (``[trainer.rewards.<name>]``), in order.
        weights: [K] weight of each.
        values: [N, K] float64, NaN where a reward returned None.
        total: [N] weighted sum over the rewards that applied (NaN when none did).
    """

    names: list[str]
    weights: torch.Tensor
    values: torch.Tensor
    total: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        from dsk_rl.grpo_loss import combine_rewards

        self.total = combine_rewards(self.values, self.weights)

    def row(self, i: int) -> dict[str, float | None]:
        """Rewards of completion ``i`` by name (None where not applicable)."""
        return {n: (None if math.isnan(v) else v) for n, v in zip(self.names, self.values[i].tolist(), strict=True)}


def score(
    rewards: dict[str, Any],
    prompts: Sequence[str],
    completions: Sequence[str],
    records: Sequence[dict[str, Any]],
    *,
    completion_ids: Sequence[Sequence[int]] | None = None,
    truncated: Sequence[bool] | None = None,
    max_completion_length: int | None = None,
    checker: Callable[[dict[str, Any], str], bool] | None = None,
    registry: Any = None,
) -> RewardScores:
    """Call every reward slot on the batch (:func:`dsk.api.runtime.score_rewards`, as the evaluation does):
    ``fn(config, prompts, completions, **columns)``; values [N, R] with NaN where a reward does not apply.

    Columns are the records' keys (one list each; a key missing from a record is None there, except ``prompt`` and
    ``completion``, which would clash with the reference completion of SFT data), plus ``completion_ids``,
    ``truncated``, and the scalars ``max_completion_length``, ``checker`` (the task's ``check``) and ``registry`` (the
    run's component registry, for rewards that look components up by name).

    Raises:
        ValueError: a reward returned a list of the wrong length or a non-number.
    """
    by_name = score_rewards(
        rewards, records, completions, completion_ids=completion_ids, truncated=truncated,
        max_completion_length=max_completion_length, checker=checker, registry=registry, prompts=prompts,
    )  # fmt: skip
    names = list(rewards)
    values = (
        torch.tensor([[math.nan if v is None else v for v in by_name[k]] for k in names], dtype=torch.float64)
        .reshape(len(names), len(completions))
        .T.contiguous()
    )
    weights = torch.tensor([float(getattr(rewards[k].config, "weight", 1.0)) for k in names], dtype=torch.float64)
    return RewardScores(names, weights, values)


@dataclass
class Packed:
    """Rows ``prompt + completion``, right-padded, for one causal forward (no attention mask needed: padding only
    follows real tokens, so a causal model never lets a real token see it).

    Attributes:
        input_ids: [N, S].
        logit_index: [N, C], position of the logit that predicts completion token c of row n (prompt_len - 1 + c;
            clamped inside the row for padding columns).
        targets: [N, C] completion tokens (pad where the completion is shorter than C).
        mask: [N, C] float, 1 on real completion tokens.
    """

    input_ids: torch.Tensor
    logit_index: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> Packed:
        return Packed(*(t.to(device) for t in (self.input_ids, self.logit_index, self.targets, self.mask)))

    def rows(self, index: torch.Tensor | slice) -> Packed:
        """A micro-batch of rows, trimmed to its own longest row."""
        ids, li, tg, m = (t[index] for t in (self.input_ids, self.logit_index, self.targets, self.mask))
        c = int(m.sum(1).max().item()) if m.numel() else 0
        c = max(c, 1)
        s = int(li[:, :c].max().item()) + 2 if li.numel() else ids.shape[1]
        return Packed(ids[:, : min(s, ids.shape[1])], li[:, :c], tg[:, :c], m[:, :c])


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], pad_id: int) -> Packed:
    """Lay out N (prompt, completion) pairs as right-padded rows (see :class:`Packed`)."""
    n = len(prompt_ids)
    p_len = torch.tensor([len(p) for p in prompt_ids], dtype=torch.long)
    c_len = torch.tensor([len(c) for c in completion_ids], dtype=torch.long)
    S = int((p_len + c_len).max())
    C = max(int(c_len.max()), 1)
    input_ids = torch.full((n, S), pad_id, dtype=torch.long)
    targets = torch.full((n, C), pad_id, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):  # building rows, not a per-token loop
        row = list(p) + list(c)
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        if len(c):
            targets[i, : len(c)] = torch.tensor(list(c), dtype=torch.long)
    cols = torch.arange(C)[None, :]  # (1, C)
    mask = (cols < c_len[:, None]).to(torch.float32)  # (N, C)
    logit_index = (p_len[:, None] - 1 + cols).clamp(max=S - 1)  # (N, C)
    return Packed(input_ids, logit_index, targets, mask)


def completion_logits(model: Any, packed: Packed) -> torch.Tensor:
    """Logits [N, C, V] that predict each completion token of ``packed`` (one causal forward)."""
    logits = model(packed.input_ids).logits  # (N, S, V)
    V = logits.shape[-1]
    return logits.gather(1, packed.logit_index[:, :, None].expand(-1, -1, V))


def length_groups(lengths: Sequence[int], overhead_tokens: int) -> list[list[int]]:
    """Split rows into groups of similar length for separate forwards: fewer padded tokens for a few more passes.

    A forward over a group costs about ``rows * longest`` token slots (each row is padded to the group's longest)
    plus a fixed ``overhead_tokens`` (the per-pass cost of launching every op, in token-slot units). Over the rows
    sorted by length, the split into consecutive groups that minimises the total is found exactly by dynamic
    programming over the distinct lengths (O(m^2), m <= the longest row). Returns the groups as lists of row indices
    into ``lengths``, shortest rows first; one group (all rows) when no split pays.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if len(order) <= 1:
        return [order] if order else []
    values: list[int] = []
    ends: list[int] = []  # ends[k]: how many sorted rows have length <= values[k]
    for n, i in enumerate(order, 1):
        if values and values[-1] == lengths[i]:
            ends[-1] = n
        else:
            values.append(lengths[i])
            ends.append(n)
    m = len(values)
    best = [0.0] + [math.inf] * m  # best[k]: the cheapest split of the rows up to distinct length k
    cut = [0] * (m + 1)
    for k in range(1, m + 1):
        for j in range(k):  # the last group: distinct lengths j+1 .. k
            rows = ends[k - 1] - (ends[j - 1] if j else 0)
            cost = best[j] + rows * values[k - 1] + overhead_tokens
            if cost < best[k]:
                best[k], cut[k] = cost, j
    bounds = []
    k = m
    while k > 0:
        bounds.append((ends[cut[k] - 1] if cut[k] else 0, ends[k - 1]))
        k = cut[k]
    return [order[a:b] for a, b in reversed(bounds)]

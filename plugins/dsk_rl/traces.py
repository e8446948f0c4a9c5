"""Verified traces: sample N completions per prompt, keep those the rewards accept, write an SFT dataset.

Shared by rejection sampling (R1 stage 3: the RL policy writes its own SFT data) and distillation (R1 §2.4: a
teacher writes the student's). Every row of the dataset says where it came from::

    {"prompt": "47+385=", "completion": "<think>…</think><answer>432</answer>", "answer": "432", ...record columns,
     "prompt_id": "train/17", "sample_index": 2, "rewards": {"accuracy": 1.0, "format": 1.0}, "reward": 2.0,
     "source": "runs/r1/stages/reason/checkpoints/step-60", "origin": "rejection_sampling"}

Rows mixed in from other data carry ``"origin": "mix:<task>"`` or ``"file:<path>"`` instead.

Many ranks (``parallel``): each data rank samples its share of the prompts (a prompt's samples stay on one rank,
each prompt from its own generator, so the traces do not depend on the rank count), and the kept rows and the
counts are gathered, so every rank returns the rows one process writes, in the same order.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsk_rl.rollout import Samples, encode_prompts, sample, score

__all__ = ["TraceStats", "generate_traces", "prompt_id", "select", "write_jsonl"]


def prompt_id(record: dict[str, Any], position: int) -> str:
    """A stable id of the prompt a trace answers: ``<split>/<index>`` of a task record, else its position."""
    if "split" in record and "index" in record:
        return f"{record['split']}/{record['index']}"
    return f"prompt/{position}"


@dataclass
class TraceStats:
    """What trace generation did (one ``kind = "traces"`` metrics row)."""

    prompts: int = 0
    sampled: int = 0
    accepted: int = 0
    truncated: int = 0
    duplicates: int = 0
    kept: int = 0
    prompts_with_trace: int = 0
    reward_mean: dict[str, float | None] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """Flat metrics-row keys: ``traces/<name>``, ``traces/reward/<reward>``."""
        out = {f"traces/{k}": v for k, v in asdict(self).items() if k != "reward_mean"}
        out["traces/accept_rate"] = self.accepted / self.sampled if self.sampled else 0.0
        out["traces/prompt_coverage"] = self.prompts_with_trace / self.prompts if self.prompts else 0.0
        out.update({f"traces/reward/{k}": v for k, v in self.reward_mean.items()})
        return out


def select(
    totals: Sequence[float],
    texts: Sequence[str],
    truncated: Sequence[bool],
    n: int,
    *,
    threshold: float,
    keep: str = "all",
    max_per_prompt: int = 0,
    dedupe: bool = True,
) -> tuple[list[int], dict[str, int]]:
    """Indices of the completions to keep, ``n`` consecutive completions per prompt.

    A completion is accepted when its weighted reward (None counting 0) is ``>= threshold`` and it ended with EOS
    (a truncated one would teach the model to stop mid-answer). Per prompt, ``best`` keeps the highest reward
    (best-of-n; the earliest sample wins a tie), ``all`` keeps every accepted one in sample order; duplicates of a
    kept completion of the same prompt are dropped; at most ``max_per_prompt`` (0: no cap) survive.

    Returns:
        ``(kept indices, counts)`` with counts ``accepted``, ``truncated``, ``duplicates``.
    """
    kept: list[int] = []
    counts = {"accepted": 0, "truncated": 0, "duplicates": 0}
    for start in range(0, len(texts), n):
        group = range(start, min(start + n, len(texts)))
        ok = []
        for i in group:
            if truncated[i]:
                counts["truncated"] += 1
                continue
            value = totals[i] if not math.isnan(totals[i]) else 0.0
            if value >= threshold:
                ok.append(i)
        counts["accepted"] += len(ok)
        if keep == "best":
            ok.sort(key=lambda i: (-(totals[i] if not math.isnan(totals[i]) else 0.0), i))
        seen: set[str] = set()
        chosen: list[int] = []
        for i in ok:
            if dedupe and texts[i] in seen:
                counts["duplicates"] += 1
                continue
            seen.add(texts[i])
            chosen.append(i)
        if keep == "best":
            chosen = chosen[:1]
        if max_per_prompt:
            chosen = chosen[:max_per_prompt]
        kept.extend(sorted(chosen))
    return kept, counts


@torch.no_grad()
def generate_traces(
    model: Any,
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    cfg: Any,
    *,
    checker: Callable[[dict[str, Any], str], bool] | None,
    generator: torch.Generator | Callable[[int], torch.Generator] | None,
    source: str,
    origin: str,
    chunk_prompts: int = 64,
    registry: Any = None,
    parallel: Any = None,
) -> tuple[list[dict[str, Any]], TraceStats]:
    """Sample ``cfg.samples_per_prompt`` completions per record, score them with ``cfg.rewards``, keep the accepted.

    Args:
        model: the policy or teacher.
        tokenizer: its tokenizer.
        records: prompt records (task records: ``prompt``, ``answer``, and the columns the checker reads).
        cfg: a :class:`dsk_rl.config.TraceConfig` (sampling, rewards, threshold, keep, dedupe).
        checker: the task's ``check(record, text)``, handed to the rewards.
        generator: the sampling generator, or ``index -> generator`` giving prompt ``index`` (its position in
            ``records``) its own, which makes the traces independent of batching and of the rank count.
        source: the checkpoint that wrote the traces (provenance).
        origin: the ``origin`` of each row (``rejection_sampling``, ``distill``).
        chunk_prompts: prompts sampled per batch of ``generate`` calls (bounds memory, not results).
        registry: the run's component registry (for the rewards).
        parallel: the run's parallel strategy; with several data ranks every rank calls this with the same
            records and gets the same rows back (module doc). None: one process.

    Returns:
        ``(rows, stats)``: the dataset rows (see the module doc) and the counts.
    """
    from dsk.api.runtime import done_across_ranks
    from dsk_rl.common import data_share

    n = cfg.samples_per_prompt
    rows: list[dict[str, Any]] = []
    stats = TraceStats(prompts=len(records))
    reward_sums: dict[str, list[float]] = {}
    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    first, last = data_share(parallel, len(records))
    share = -(-len(records) // world)
    # this rank's prompts, padded to the common share so every rank makes the same generation calls
    positions = list(range(first, last)) + [0] * (share - (last - first))
    sync_done = done_across_ranks(parallel)
    longest = max(len(p) for p in encode_prompts(tokenizer, records)) if records else 0
    for offset in range(0, share, chunk_prompts):
        chunk_positions = positions[offset : offset + chunk_prompts]
        real = max(0, min(len(chunk_positions), last - first - offset))  # prompts of this chunk that count
        chunk = [records[i] for i in chunk_positions]
        gens = [generator(i) for i in chunk_positions] if callable(generator) else generator
        samples = sample(
            model, tokenizer, encode_prompts(tokenizer, chunk), n, max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size, generator=gens,
            sync_done=sync_done, max_prompt_len=longest,
        )  # fmt: skip
        if real == 0:
            continue
        chunk = chunk[:real]
        samples = Samples(*(getattr(samples, f)[: real * n] for f in ("prompt_ids", "completion_ids", "truncated",
                                                                      "texts")))  # fmt: skip
        start = first + offset
        repeated = [r for r in chunk for _ in range(n)]
        scores = score(
            cfg.rewards, [r["prompt"] for r in repeated], samples.texts, repeated,
            completion_ids=samples.completion_ids, truncated=samples.truncated,
            max_completion_length=cfg.max_completion_length, checker=checker, registry=registry,
        )  # fmt: skip
        totals = scores.total.tolist()
        kept, counts = select(
            totals, samples.texts, samples.truncated, n, threshold=cfg.threshold, keep=cfg.keep,
            max_per_prompt=cfg.max_per_prompt, dedupe=cfg.dedupe,
        )  # fmt: skip
        stats.sampled += len(samples)
        stats.accepted += counts["accepted"]
        stats.truncated += counts["truncated"]
        stats.duplicates += counts["duplicates"]
        for k, name in enumerate(scores.names):
            col = scores.values[:, k]
            reward_sums.setdefault(name, []).extend(col[~torch.isnan(col)].tolist())
        covered = set()
        for i in kept:
            record = repeated[i]
            position = start + i // n
            covered.add(position)
            rows.append(
                {
                    **{k: v for k, v in record.items() if k not in ("prompt", "completion")},
                    "prompt": record["prompt"],
                    "completion": samples.texts[i],
                    "prompt_id": prompt_id(record, position),
                    "sample_index": i % n,
                    "rewards": scores.row(i),
                    "reward": None if math.isnan(totals[i]) else totals[i],
                    "source": source,
                    "origin": origin,
                }
            )
        stats.prompts_with_trace += len(covered)
    names = [k for k in cfg.rewards] if reward_sums or world > 1 else []
    sums = {k: (math.fsum(reward_sums.get(k, [])), len(reward_sums.get(k, []))) for k in names}
    if world > 1:
        rows, stats, sums = _gather(parallel, rows, stats, sums)
    stats.kept = len(rows)
    stats.reward_mean = {k: (total / count if count else None) for k, (total, count) in sums.items()}
    return rows, stats


def _gather(parallel: Any, rows: list[dict[str, Any]], stats: TraceStats, sums: dict[str, tuple[float, int]]):
    """Every data rank's rows in rank order (= prompt order), and the counts and reward sums added up."""
    counts = ["sampled", "accepted", "truncated", "duplicates", "prompts_with_trace"]
    flat = [float(getattr(stats, c)) for c in counts] + [v for k in sums for v in sums[k]]
    flat = parallel.all_reduce(torch.tensor(flat, dtype=torch.float64), "sum").tolist()
    for i, c in enumerate(counts):
        setattr(stats, c, int(flat[i]))
    names = list(sums)
    sums = {k: (flat[len(counts) + 2 * j], int(flat[len(counts) + 2 * j + 1])) for j, k in enumerate(names)}
    everyone: list[dict[str, Any]] = []
    for src in range(parallel.data_world_size):  # rows are JSON-like values made here, one broadcast per rank
        everyone.extend(parallel.broadcast_object(rows if parallel.data_rank == src else None, src=src))
    return everyone, stats, sums


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSONL atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path

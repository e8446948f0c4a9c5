"""Verified traces: sample N completions per prompt, keep those the rewards accept, write an SFT dataset.

Shared by rejection sampling (R1 stage 3: the RL policy writes its own SFT data) and distillation (R1 §2.4: a
teacher writes the student's). Every row of the dataset says where it came from::

    {"prompt": "47+385=", "completion": "<think>…</think><answer>432</answer>", "answer": "432", ...record columns,
     "prompt_id": "train/17", "sample_index": 2, "rewards": {"accuracy": 1.0, "format": 1.0}, "reward": 2.0,
     "source": "runs/r1/stages/reason/checkpoints/step-60", "origin": "rejection_sampling"}

Rows mixed in from other data carry ``"origin": "mix:<task>"`` or ``"file:<path>"`` instead.
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

from dsk_rl.rollout import encode_prompts, sample, score

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
    generator: torch.Generator | None,
    source: str,
    origin: str,
    chunk_prompts: int = 64,
    registry: Any = None,
) -> tuple[list[dict[str, Any]], TraceStats]:
    """Sample ``cfg.samples_per_prompt`` completions per record, score them with ``cfg.rewards``, keep the accepted.

    Args:
        model: the policy or teacher.
        tokenizer: its tokenizer.
        records: prompt records (task records: ``prompt``, ``answer``, and the columns the checker reads).
        cfg: a :class:`dsk_rl.config.TraceConfig` (sampling, rewards, threshold, keep, dedupe).
        checker: the task's ``check(record, text)``, handed to the rewards.
        generator: the sampling generator.
        source: the checkpoint that wrote the traces (provenance).
        origin: the ``origin`` of each row (``rejection_sampling``, ``distill``).
        chunk_prompts: prompts sampled per batch of ``generate`` calls (bounds memory, not results).

    Returns:
        ``(rows, stats)``: the dataset rows (see the module doc) and the counts.
    """
    n = cfg.samples_per_prompt
    rows: list[dict[str, Any]] = []
    stats = TraceStats(prompts=len(records))
    reward_sums: dict[str, list[float]] = {}
    for start in range(0, len(records), chunk_prompts):
        chunk = list(records[start : start + chunk_prompts])
        samples = sample(
            model, tokenizer, encode_prompts(tokenizer, chunk), n, max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature, top_p=cfg.top_p, batch_size=cfg.generation_batch_size, generator=generator,
        )  # fmt: skip
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
    stats.kept = len(rows)
    stats.reward_mean = {k: (sum(v) / len(v) if v else None) for k, v in reward_sums.items()}
    return rows, stats


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSONL atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path

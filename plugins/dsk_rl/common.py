"""Run plumbing shared by the post-training trainers, on top of the runtime in ``dsk.train``.

Building the policy (seeded, initialised from the previous stage), training records, checkpoints with the
runtime's atomic format, evaluation rows (greedy and sampled) and their summary columns, and the side channels of
the model's components (auxiliary losses, MoE step metrics); and the pieces the trainers share across ranks:
per-group sampling generators, the agreed stop of generation, and the share of a list of work items each data rank
takes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsk.api.runtime import RunContext, RunSetupError, build_run, save_checkpoint

__all__ = [
    "build_policy",
    "data_share",
    "eval_columns",
    "evaluate_row",
    "freeze_unused_heads",
    "group_generator",
    "mean",
    "moe_metrics",
    "save_run_checkpoint",
    "step_generator",
    "train_record_fn",
]


def train_record_fn(task: Any) -> Callable[[int], dict[str, Any]]:
    """``index -> record`` over the training split (a task's ``sample("train", i)``, or a sequence, cycled)."""
    if hasattr(task, "sample"):
        return lambda i: task.sample("train", i)
    if hasattr(task, "__len__") and hasattr(task, "__getitem__") and len(task):
        return lambda i: task[i % len(task)]
    raise RunSetupError(f"[data] {type(task).__name__} is neither a task (sample(split, i)) nor a sequence of records")


def build_policy(ctx: RunContext, tokenizer: Any, init_from: Path | str | None = None) -> torch.nn.Module:
    """The stage's model for sampling, through the build path (seeded by ``[dsk] seed``, its features applied) and
    loaded from ``init_from`` (default: the previous stage's last checkpoint, ``ctx.init_from``); no optimizer."""
    return build_run(ctx, init_from=init_from, with_task=False, with_optimizer=False, tokenizer=tokenizer).model


def freeze_unused_heads(model: torch.nn.Module) -> list[str]:
    """Freeze the MTP heads: a policy-gradient loss never reaches them (the policy samples with the main head only),
    so they would sit in the optimizer without gradients. Returns the frozen parameter names."""
    frozen = []
    mtp = getattr(model, "mtp", None)
    if mtp is not None:
        for name, p in mtp.named_parameters():
            p.requires_grad_(False)
            frozen.append(f"mtp.{name}")
    return frozen


def moe_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """``moe/maxvio`` (mean over MoE layers) and ``moe/maxvio_max`` of the step from the side channels' metrics
    (``BuiltRun.side.metrics()``), read before the bias update."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, list) or "/" not in key:
            continue
        metric, _, agg = key.partition("/")
        out[f"moe/{metric}" if agg == "mean" else f"moe/{metric}_{agg}"] = value
    return out


def step_generator(device: torch.device, seed: int, step: int, salt: int = 0) -> torch.Generator:
    """A sampling generator seeded from (seed, step): step k samples the same completions in a resumed run."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


def group_generator(device: torch.device, seed: int, step: int, group: int) -> torch.Generator:
    """The sampling generator of group ``group`` (its index in the whole step, over all ranks) of step ``step``.

    One per group, so a group's completions depend on (seed, step, group) alone: not on the rank count, the rank
    that holds the group, or the groups batched with it (splitmix64 of the three, so nearby triples do not
    collide).
    """
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + group * 0x94D049BB133111EB + 0x2545F491) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return torch.Generator(device=device).manual_seed(x % (2**63 - 1))


def data_share(parallel: Any, n: int) -> tuple[int, int]:
    """``(start, stop)`` of this data rank's contiguous share of ``n`` items (the last shares may be shorter).

    Shares have ``ceil(n / W)`` items, so a rank's share is where one process has those items, and the shares in
    rank order are the whole list.
    """
    world = int(getattr(parallel, "data_world_size", 1)) if parallel is not None else 1
    if world <= 1:
        return 0, n
    per = -(-n // world)
    start = min(n, int(parallel.data_rank) * per)
    return start, min(n, start + per)


def mean(values: list[Any]) -> float | None:
    """Mean of the finite values (None when there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


def evaluate_row(
    ctx: RunContext,
    model: torch.nn.Module,
    tokenizer: Any,
    task: Any,
    records: list[dict[str, Any]],
    step: int,
    *,
    max_new_tokens: int,
    batch_size: int = 256,
    rewards: dict[str, Any] | None = None,
    sampled_k: int = 0,
    temperature: float = 1.0,
    examples: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """Held-out accuracy and the mean of every reward, greedy and over ``sampled_k`` samples, as an ``eval`` row.

    ``eval/accuracy`` is the task's checker on the greedy completion; ``eval/<reward>`` is each reward's mean over
    the greedy completions it applies to (format compliance, language consistency...), so a stage shows what its
    rewards did to the policy's default behaviour. With ``sampled_k``: ``eval/sampled_accuracy`` and
    ``eval/sampled_<reward>``, the same means over ``sampled_k`` completions per record at ``temperature`` (what
    the policy does when it samples, as in R1's evaluation), and ``eval/pass@k`` from the same samples. A reward
    named ``accuracy`` is not scored: the checker gives that key. The row is written to ``metrics.jsonl`` and shown
    on the progress bar unless ``write`` is false.

    The evaluation is :func:`dsk.api.runtime.evaluate_task`'s: record i samples from its own generator, seeded
    from ``[dsk] seed`` and i, so an evaluation is the same at every step of a resumed run and never draws from, or
    moves, the global RNG, and the evaluations of one run share their random numbers (the difference between two
    steps is the policy's, not the draw's). Many ranks (``ctx.parallel``, set by the build path): every rank calls
    this with the same records; each generates its share (padded so every rank makes the same calls, each call's
    stop agreed) and the sums are all-reduced, so the row is one process's at 1/W of the cost. ``examples`` come
    from the writing rank's share (the first records).
    """
    from dsk.api.runtime import evaluate_task

    if not records:
        return {}
    result = evaluate_task(
        model, tokenizer, task, records, max_new_tokens=max_new_tokens, batch_size=batch_size, pass_k=sampled_k,
        temperature=temperature, seed=ctx.seed, examples=examples, parallel=getattr(ctx, "parallel", None),
        rewards=rewards, registry=ctx.registry,
    )  # fmt: skip
    row: dict[str, Any] = {"kind": "eval", "step": step, **({"stage": ctx.stage} if ctx.stage else {})}
    row.update((k, v) for k, v in result.items() if k != "examples")
    if write:
        ctx.metrics.write(row)
        ctx.reporter.update(step, row)
    if examples:
        row["examples"] = result.get("examples", [])
    return row


def eval_columns(rewards: dict[str, Any] | None, sampled_k: int) -> tuple[tuple[str, str, str], ...]:
    """The summary columns of the sampled evaluation: ``(key, label, format)`` of ``eval/sampled_accuracy`` and of
    each reward's sampled mean (none when ``sampled_k`` is 0)."""
    if not sampled_k:
        return ()
    names = [n for n in rewards or {} if n != "accuracy"]
    return (
        ("eval/sampled_accuracy", "sampled acc", ".1%"),
        *((f"eval/sampled_{n}", f"sampled {n}", ".3f") for n in names),
    )


def save_run_checkpoint(
    ctx: RunContext,
    step: int,
    *,
    trainer: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    tokenizer: Any,
    state: dict[str, Any],
) -> Path:
    """``checkpoints/step-N/`` in the runtime's format, readable by ``dsk generate`` and by the next stage."""
    tokenizer_json = json.loads(tokenizer.to_json())
    task_table = ctx.table("data")
    full = {
        "trainer": trainer,
        "stage": ctx.stage,
        "seed": ctx.seed,
        "task": task_table,
        "tokenizer": tokenizer_json,
        "model": ctx.table("model"),
        **state,
    }
    ckpt_cfg = ctx.section("checkpoint")
    return save_checkpoint(
        ctx.run_dir,
        step,
        model=model,
        optimizer=optimizer,
        state=full,
        config_extra={"tokenizer": tokenizer_json, "task": task_table, "step": step},
        keep=getattr(ckpt_cfg, "keep", None),
        save_delay=ctx.save_delay,
        write=ctx.is_writer,
    )

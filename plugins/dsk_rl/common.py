"""Run plumbing shared by the post-training trainers, on top of the runtime in ``dsk.train``.

Building the policy (seeded, initialised from the previous stage), training records, checkpoints with the
runtime's atomic format, evaluation rows, and the side channels of the model's components (auxiliary losses,
MoE step metrics).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dsk.api.runtime import RunContext, RunSetupError, build_run, save_checkpoint

__all__ = [
    "build_policy",
    "evaluate_row",
    "freeze_unused_heads",
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


def mean(values: list[Any]) -> float | None:
    """Mean of the finite values (None when there are none)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None


@torch.no_grad()
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
    examples: int = 0,
    write: bool = True,
) -> dict[str, Any]:
    """Greedy held-out accuracy, and the mean of every reward on the same completions, as an ``eval`` row.

    ``eval/accuracy`` is the task's checker on the greedy completion (what ``dsk.train.evaluate`` reports);
    ``eval/<reward>`` is each reward's mean over the completions it applies to (format compliance, language
    consistency...), so a stage shows what its rewards did to the policy's default behaviour, not only to samples.
    The row is written to ``metrics.jsonl`` and shown on the progress bar unless ``write`` is false.
    """
    from dsk_rl.rollout import encode_prompts, sample, score

    if not records:
        return {}
    started = time.perf_counter()
    samples = sample(
        model, tokenizer, encode_prompts(tokenizer, records), 1, max_new_tokens=max_new_tokens, temperature=0.0,
        top_p=1.0, batch_size=batch_size, generator=None,
    )  # fmt: skip
    correct = [bool(task.check(r, t)) for r, t in zip(records, samples.texts, strict=True)]
    row: dict[str, Any] = {"kind": "eval", "step": step, **({"stage": ctx.stage} if ctx.stage else {})}
    row["eval/accuracy"] = sum(correct) / len(correct)
    row["eval/samples"] = len(correct)
    row["eval/new_tokens_mean"] = sum(len(c) for c in samples.completion_ids) / len(correct)
    row["eval/truncated"] = sum(samples.truncated) / len(correct)
    if rewards:
        scores = score(
            rewards, [r["prompt"] for r in records], samples.texts, records, completion_ids=samples.completion_ids,
            truncated=samples.truncated, max_completion_length=max_new_tokens, checker=task.check,
            registry=ctx.registry,
        )  # fmt: skip
        for k, name in enumerate(scores.names):
            col = scores.values[:, k]
            valid = col[~torch.isnan(col)]
            row[f"eval/{name}"] = float(valid.mean()) if valid.numel() else None
    row["eval/seconds"] = time.perf_counter() - started
    if write:
        ctx.metrics.write(row)
        ctx.reporter.update(step, row)
    if examples:
        row["examples"] = [
            {"prompt": r["prompt"], "completion": t, "correct": c}
            for r, t, c in list(zip(records, samples.texts, correct, strict=True))[:examples]
        ]
    return row


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

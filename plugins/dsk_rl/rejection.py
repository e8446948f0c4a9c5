"""Rejection sampling + SFT (``[trainer] type = "rejection_sampling"``): DeepSeek-R1 stage 3.

1. The policy (the previous stage's weights) samples ``samples_per_prompt`` completions for each of ``num_prompts``
   training prompts; the rewards judge them; accepted ones (threshold, best-of-n or all, deduplicated, EOS-terminated)
   are written to ``traces.jsonl`` with provenance (prompt id, sample index, rewards, source checkpoint).
2. Other data is mixed in: ``mix_task`` records (R1's ~200k non-reasoning samples; here, e.g., answers without a
   chain of thought) and ``mix_files`` rows.
3. The registered ``sft`` trainer fine-tunes on the file, starting from the policy or, as in R1, from an earlier
   checkpoint (``sft_init = "stage:pretrain"``: R1 fine-tunes DeepSeek-V3-Base, not the RL checkpoint).
4. The stage reports the held-out accuracy of the policy before and of the fine-tuned model after.

Many ranks: each data rank samples its share of the prompts (each prompt from its own generator, seeded from
(seed, prompt index)) and the accepted set is gathered (:func:`dsk_rl.traces.generate_traces`), so the SFT data
is one process's; the writing rank writes it and every rank waits for the file before the SFT reads it.
Evaluations share the test records out the same way.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch

from dsk.api.runtime import (
    RunContext,
    RunFailed,
    build_run,
    latest_checkpoint,
    load_checkpoint,
    read_jsonl,
    test_records,
)
from dsk_rl.common import (
    build_policy,
    eval_columns,
    evaluate_row,
    group_generator,
    save_run_checkpoint,
    train_record_fn,
)
from dsk_rl.config import RejectionSamplingConfig
from dsk_rl.sft import resolve_checkpoint, run_sft, sft_steps
from dsk_rl.traces import generate_traces, write_jsonl

__all__ = ["RejectionSamplingTrainer", "mixed_rows"]

TRACES_FILE = "traces.jsonl"
#: the ``step`` of :func:`dsk_rl.common.group_generator` for the traces' generators (a stream of its own)
TRACE_STREAM = -17


def mixed_rows(cfg: RejectionSamplingConfig) -> list[dict[str, Any]]:
    """Rows of the other data mixed into the SFT set, each with its ``origin``."""
    rows: list[dict[str, Any]] = []
    if cfg.mix_task is not None and cfg.mix_count:
        task = cfg.mix_task.build()
        for i in range(cfg.mix_count):
            record = task.sample("train", i)
            rows.append({**record, "prompt_id": f"mix/{i}", "origin": f"mix:{cfg.mix_task.name}"})
    for path in cfg.mix_files:
        for i, row in enumerate(read_jsonl(path, "sft")):
            rows.append({**row, "prompt_id": f"file/{i}", "origin": f"file:{path}"})
    return rows


class RejectionSamplingTrainer:
    """Rejection sampling then SFT (kind ``trainer``); built as ``RejectionSamplingTrainer(config)``."""

    name: ClassVar[str] = "rejection_sampling"

    def __init__(self, config: RejectionSamplingConfig):
        self.config = config

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Write the traces (unless resuming the SFT), fine-tune on them, evaluate; returns the stage summary."""
        cfg = self.config
        started = time.perf_counter()
        policy_init = ctx.init_from
        if policy_init is None and cfg.init_checkpoint:
            policy_init = resolve_checkpoint(ctx, cfg.init_checkpoint)
        built = build_run(ctx, init_from=policy_init, with_optimizer=False)  # the policy that samples the traces
        tokenizer, task = built.tokenizer, built.task
        data_path = ctx.run_dir / TRACES_FILE
        eval_records = test_records(task, cfg.eval_samples)
        resume_sft = None
        if (
            ctx.resume_from is not None
            and load_checkpoint(ctx.resume_from, with_optimizer=False).state.get("trainer") == "sft"
            and data_path.is_file()
        ):
            resume_sft = ctx.resume_from  # the traces are written; continue the fine-tuning exactly
        before: dict[str, Any] = {}
        trace_row: dict[str, Any] = {}
        if resume_sft is None:
            ctx.metrics.truncate_after(-1)  # the stage starts over: its traces are regenerated identically
            policy = built.model
            ctx.reporter.message(
                f"rejection sampling: {cfg.num_prompts} prompts x {cfg.samples_per_prompt} samples "
                f"from {policy_init or 'the initial weights'}"
            )
            before = evaluate_row(
                ctx, policy, tokenizer, task, eval_records, 0, max_new_tokens=cfg.eval_max_new_tokens,
                rewards=cfg.rewards, sampled_k=cfg.eval_sampled_k, temperature=cfg.eval_temperature,
            )  # fmt: skip
            record_at = train_record_fn(task)
            records = [record_at(i) for i in range(cfg.num_prompts)]
            device = torch.device(ctx.device)
            rows, stats = generate_traces(
                policy, tokenizer, records, cfg, checker=getattr(task, "check", None),
                generator=lambda i: group_generator(device, ctx.seed, TRACE_STREAM, i),
                source=str(policy_init) if policy_init else "initial weights", origin=self.name,
                registry=ctx.registry, parallel=built.parallel,
            )  # fmt: skip
            mix = mixed_rows(cfg)
            if ctx.is_writer:
                write_jsonl(data_path, rows + mix)
            built.parallel.barrier()  # every rank reads the file the writer wrote
            trace_row = {"kind": "traces", "step": 0, **stats.row(), "traces/mixed": len(mix)}
            if ctx.stage:
                trace_row["stage"] = ctx.stage
            ctx.metrics.write(trace_row)
            ctx.reporter.message(
                f"kept {stats.kept} of {stats.sampled} completions ({stats.accepted} accepted, {stats.duplicates} "
                f"duplicates, {stats.truncated} truncated) + {len(mix)} mixed rows -> {data_path}"
            )
            if not rows and not mix:
                raise RunFailed(
                    f"no completion reached trainer.threshold = {cfg.threshold}; nothing to fine-tune on. Lower the "
                    "threshold, sample more (samples_per_prompt), or start from a stronger policy.",
                    None,
                )
            del policy, built
        n_rows = sum(1 for _ in open(data_path, encoding="utf-8"))
        steps = sft_steps(cfg, n_rows, getattr(ctx.parallel, "data_world_size", 1))
        if cfg.sft_init:
            init = resolve_checkpoint(ctx, cfg.sft_init)
        else:
            init = ctx.init_from or (resolve_checkpoint(ctx, cfg.init_checkpoint) if cfg.init_checkpoint else None)
        if steps > 0:
            summary = run_sft(ctx, data_path, cfg, steps=steps, init_from=init, resume_from=resume_sft)
        else:
            model = build_policy(ctx, tokenizer, init_from=init)
            path = save_run_checkpoint(
                ctx, 0, trainer=self.name, model=model, optimizer=None, tokenizer=tokenizer, state={"steps": 0}
            )
            if ctx.parallel is not None:
                ctx.parallel.barrier()  # the checkpoint is on disk before any rank looks for it
            summary = {"step": 0, "checkpoint": str(path)}
        final = latest_checkpoint(ctx.run_dir)
        after: dict[str, Any] = {}
        if eval_records and final is not None:
            model = build_policy(ctx, tokenizer, init_from=final)
            after = evaluate_row(
                ctx, model, tokenizer, task, eval_records, int(summary.get("step", 0)),
                max_new_tokens=cfg.eval_max_new_tokens, rewards=cfg.rewards, sampled_k=cfg.eval_sampled_k,
                temperature=cfg.eval_temperature, examples=3,
            )  # fmt: skip
        return self._summary(summary, trace_row, before, after, n_rows, steps, started)

    def _summary(self, sft, trace_row, before, after, n_rows, steps, started) -> dict[str, Any]:
        out = {k: v for k, v in sft.items() if not k.startswith("eval/")}
        out.update({"trainer": self.name, "status": "completed", "steps": steps, "sft_rows": n_rows})
        out.update({k: v for k, v in trace_row.items() if k.startswith("traces/")})
        for key, value in before.items():
            if key.startswith("eval/") and key not in ("eval/samples", "eval/seconds"):
                out[f"{key}_start"] = value
        for key, value in after.items():
            if key.startswith("eval/") or key == "examples":
                out[key] = value
        if after:  # the sampled evaluation's figures as summary columns, after the SFT's own
            columns = [tuple(c) for c in out.get("columns") or []]
            columns += [c for c in eval_columns(self.config.rewards, self.config.eval_sampled_k) if c not in columns]
            out["columns"] = [list(c) for c in columns]
        out["wall_s"] = time.perf_counter() - started
        return out

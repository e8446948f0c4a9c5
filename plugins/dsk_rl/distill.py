"""Distillation (``[trainer] type = "distill"``, run by ``dsk distill``): DeepSeek-R1 §2.4 on tiny models.

1. The teacher checkpoint samples ``samples_per_prompt`` traces per training prompt; the rewards keep the verified
   ones (``traces.jsonl``, with provenance), exactly as rejection sampling does.
2. The student (the recipe's ``[model]``, usually much smaller) learns them:

   - ``mode = "sequence"``: plain SFT on the traces (R1-Distill: "SFT only, no RL"), through the runtime's ``sft``
     trainer;
   - ``mode = "logit"``: the same rows, but the loss mixes the SFT cross-entropy with the forward KL from the
     teacher's next-token distribution at every completion position (``kd_weight``, temperature ``kd_temperature``;
     Hinton's T^2 scaling keeps the gradient scale independent of T). Needs the teacher's tokenizer.

3. Teacher and student are evaluated on the same held-out problems; the summary reports both accuracies, their
   ratio and both parameter counts.

Many ranks: the teacher's traces are split over the data ranks by prompt (each prompt from its own generator)
and gathered, so the trace file is one process's (written by the writing rank); the logit run reads the global
batch of ``batch_size`` rows per rank on every rank and keeps its own rows, each rank's loss weighted by its
share of the step's targets (``BuiltRun.loss_weights``), so its losses are one process's with the global batch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from dsk.api.runtime import (
    IGNORE_INDEX,
    BatchIterator,
    CheckpointError,
    ExampleStream,
    RunContext,
    RunFailed,
    RunSetupError,
    TrainerRun,
    build_run,
    encode_record,
    latest_checkpoint,
    load_pretrained,
    load_tokenizer,
    read_jsonl,
    test_records,
    tokens_per_s,
    training_loss,
)
from dsk_rl.common import build_policy, eval_columns, evaluate_row, group_generator, mean, train_record_fn
from dsk_rl.config import DistillConfig
from dsk_rl.sft import resolve_checkpoint, run_sft, sft_steps
from dsk_rl.traces import generate_traces, write_jsonl

__all__ = ["DistillTrainer", "forward_kl", "load_teacher"]

TRACES_FILE = "traces.jsonl"
#: the ``step`` of :func:`dsk_rl.common.group_generator` for the teacher's trace generators
TRACE_STREAM = -29


def load_teacher(path: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The teacher model (eval mode, frozen) and its tokenizer (None when its checkpoint names none).

    Raises:
        RunSetupError: the directory is not a checkpoint dsk can load.
    """
    try:
        model = load_pretrained(path)
    except CheckpointError as exc:
        raise RunSetupError(f"teacher {path}: {exc}") from None
    tokenizer = None
    try:
        meta = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if meta.get("tokenizer") is not None:
            tokenizer = load_tokenizer(meta["tokenizer"])
    except (OSError, ValueError):
        tokenizer = None
    return model.to(device).eval().requires_grad_(False), tokenizer


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Mean over masked positions of ``T^2 KL(p_teacher || p_student)`` at temperature T (GKD with beta = 0).

    student_logits, teacher_logits [B, T, V]; mask [B, T] (1 = a target position) -> scalar. The T^2 factor keeps
    the gradient's scale the same for any temperature (Hinton et al. 2015).
    """
    s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T)
    m = mask.to(kl.dtype)
    return (kl * m).sum() / m.sum().clamp(min=1.0) * temperature**2


class DistillTrainer:
    """Teacher traces -> student (kind ``trainer``); built as ``DistillTrainer(config)``, run by ``run(ctx)``."""

    name: ClassVar[str] = "distill"

    def __init__(self, config: DistillConfig):
        self.config = config

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Write the teacher's verified traces (unless resuming), train the student, evaluate both."""
        cfg = self.config
        started = time.perf_counter()
        device = torch.device(ctx.device)
        # the student's run: its tokenizer, task and seeded model come from the build path like every trainer's
        built = build_run(ctx, with_optimizer=False)
        tokenizer, task, parallel = built.tokenizer, built.task, built.parallel
        del built
        eval_records = test_records(task, cfg.eval_samples)
        teacher_path = resolve_checkpoint(ctx, cfg.teacher)
        teacher, teacher_tok = load_teacher(teacher_path, device)
        teacher_params = _count(teacher)
        teacher_tok = teacher_tok or tokenizer
        if cfg.mode == "logit" and teacher_tok.to_json() != tokenizer.to_json():
            raise RunSetupError(
                "trainer.mode = 'logit' compares next-token distributions, so teacher and student need the same "
                f"tokenizer; {teacher_path} uses another one. Use mode = 'sequence' or the teacher's tokenizer."
            )
        data_path = ctx.run_dir / TRACES_FILE
        resuming = ctx.resume_from is not None and data_path.is_file()
        teacher_eval: dict[str, Any] = {}
        trace_row: dict[str, Any] = {}
        if cfg.teacher_eval and eval_records:
            teacher_eval = evaluate_row(
                ctx,
                teacher,
                teacher_tok,
                task,
                eval_records,
                0,
                max_new_tokens=cfg.eval_max_new_tokens,
                rewards=cfg.rewards,
                write=False,
            )
        if not resuming:
            ctx.metrics.truncate_after(-1)
            record_at = train_record_fn(task)
            records = [record_at(i) for i in range(cfg.num_prompts)]
            ctx.reporter.message(f"distill: {cfg.num_prompts} prompts x {cfg.samples_per_prompt} teacher samples")
            rows, stats = generate_traces(
                teacher, teacher_tok, records, cfg, checker=getattr(task, "check", None),
                generator=lambda i: group_generator(device, ctx.seed, TRACE_STREAM, i), source=str(teacher_path),
                origin=self.name, registry=ctx.registry, parallel=parallel,
            )  # fmt: skip
            if not rows:
                raise RunFailed(f"the teacher {teacher_path} wrote no accepted trace; nothing to distill", None)
            if ctx.is_writer:
                write_jsonl(data_path, rows)
            parallel.barrier()  # every rank reads the file the writer wrote
            trace_row = {"kind": "traces", "step": 0, **stats.row(), **({"stage": ctx.stage} if ctx.stage else {})}
            if teacher_eval:
                trace_row["teacher/eval/accuracy"] = teacher_eval.get("eval/accuracy")
            ctx.metrics.write(trace_row)
            ctx.reporter.message(f"kept {stats.kept} traces of {stats.sampled} samples -> {data_path}")
        n_rows = sum(1 for _ in open(data_path, encoding="utf-8"))
        steps = sft_steps(cfg, n_rows, getattr(ctx.parallel, "data_world_size", 1))
        if cfg.student_init == "previous":
            student_init = ctx.init_from
        elif cfg.student_init == "fresh":
            student_init = None
        else:
            student_init = resolve_checkpoint(ctx, cfg.student_init)
        if cfg.mode == "sequence":
            del teacher
            result = run_sft(ctx, data_path, cfg, steps=steps, init_from=student_init, resume_from=ctx.resume_from)
        else:
            result = _LogitRun(self, ctx, teacher, tokenizer, data_path, steps, student_init).run()
        final = latest_checkpoint(ctx.run_dir)
        student_eval: dict[str, Any] = {}
        student = build_policy(ctx, tokenizer, init_from=final)
        if eval_records:
            student_eval = evaluate_row(
                ctx, student, tokenizer, task, eval_records, int(result.get("step", steps)),
                max_new_tokens=cfg.eval_max_new_tokens, rewards=cfg.rewards, sampled_k=cfg.eval_sampled_k,
                temperature=cfg.eval_temperature, examples=3,
            )  # fmt: skip
        out = {k: v for k, v in result.items() if not k.startswith("eval/")}
        out.update({"trainer": self.name, "status": "completed", "steps": steps, "mode": cfg.mode, "traces": n_rows})
        out.update({k: v for k, v in trace_row.items() if k.startswith("traces/")})
        out["teacher"] = str(teacher_path)
        out["teacher/parameters"] = teacher_params
        out["student/parameters"] = _count(student)
        out["parameters"] = out["student/parameters"]
        if "eval/accuracy" in teacher_eval:
            out["teacher/eval/accuracy"] = teacher_eval["eval/accuracy"]
        for key, value in student_eval.items():
            if key.startswith("eval/") or key == "examples":
                out[key] = value
        if student_eval:  # the sampled evaluation's figures as summary columns, after the SFT's own
            columns = [tuple(c) for c in out.get("columns") or []]
            columns += [c for c in eval_columns(cfg.rewards, cfg.eval_sampled_k) if c not in columns]
            out["columns"] = [list(c) for c in columns]
        t_acc, s_acc = out.get("teacher/eval/accuracy"), out.get("eval/accuracy")
        if t_acc and s_acc is not None:
            out["student/teacher_accuracy_ratio"] = s_acc / t_acc
        out["wall_s"] = time.perf_counter() - started
        return out


def _count(model: torch.nn.Module) -> int:
    """Distinct parameters of a model (tied weights once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class _LogitRun(TrainerRun):
    """Logit distillation on the shared loop: SFT cross-entropy mixed with the forward KL from the teacher."""

    cfg: DistillConfig

    def __init__(self, trainer, ctx, teacher, tokenizer, data_path, steps, student_init):
        super().__init__(trainer, ctx)
        self.teacher, self.tokenizer = teacher, tokenizer
        self.data_path, self.steps, self.student_init = data_path, steps, student_init

    def total_steps(self) -> int:
        return self.steps

    def setup(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        built = self.use(
            build_run(ctx, init_from=self.student_init, with_task=False, tokenizer=self.tokenizer)
        )  # the student, its features and the stage's [optimizer]
        rows = read_jsonl(self.data_path, "sft")
        # every data rank reads the global batch (batch_size rows per rank) and keeps its own (built.local_rows)
        self.batches = BatchIterator(
            ExampleStream(rows, seed=ctx.seed), built.tokenizer,
            batch_size=cfg.batch_size * built.parallel.data_world_size, max_len=cfg.seq_len,
            encode=lambda r: encode_record(self.tokenizer, {"prompt": r["prompt"], "completion": r["completion"]}),
        )  # fmt: skip
        if ctx.resume_from is not None:
            self._resume(ctx.resume_from)

    def restore(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])

    def train_step(self) -> dict[str, Any]:
        cfg, model, built = self.cfg, self.model, self.built
        step = self.step + 1
        started = time.perf_counter()
        lr = built.set_lr(step, self.steps, max_warmup=self.steps)
        batch = built.local_rows(next(self.batches))
        input_ids = batch["input_ids"].to(self.device)  # (B, T)
        labels = batch["labels"].to(self.device)  # (B, T), aligned: the loss shifts
        target = labels[:, 1:] != IGNORE_INDEX  # logits at t-1 predict the token at t
        # this rank's share of the step's targets on all ranks: the ranks' mean gradient is one process's
        (weight,) = built.loss_weights([int(target.sum())])
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = training_loss(model, input_ids, labels, side=built.side)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids).logits
        kd = forward_kl(out.output.logits[:, :-1], teacher_logits[:, :-1], target, cfg.kd_temperature)
        w = cfg.kd_weight
        loss = out.loss - w * out.lm_loss + w * kd  # (1 - w) CE + w KD, MTP and aux losses kept
        (loss * weight).backward()
        parts = {"loss": loss.detach() * weight, "lm_loss": out.lm_loss.detach() * weight, "kd": kd.detach() * weight}
        parts = built.mean_over_ranks(parts)  # the step's losses over all ranks' targets
        update = built.update(parts["loss"], step, foreach=False)
        finite = update.finite
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.skipped += 1
        self.step = step
        elapsed = time.perf_counter() - started
        tokens = int(built.global_sum([int(target.sum())])[0])
        self.tokens_seen += tokens
        row = {"kind": "train", "step": step, **({"stage": self.ctx.stage} if self.ctx.stage else {})}
        row.update(
            {
                "loss": float(parts["loss"]) if finite else float("nan"),
                "lm_loss": float(parts["lm_loss"]),
                "kd_loss": float(parts["kd"]),
                "lr": lr,
                "grad_norm": float(update.grad_norm),
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                "step_s": elapsed,
                "skipped": not finite,
                "nonfinite_skipped": self.skipped,
            }
        )
        return row

    def evaluate(self, examples: int = 0) -> dict[str, Any]:
        return {}  # the distill trainer evaluates the student (and the teacher) on the task after this loop

    def save(self, reason: str) -> Path:
        state = {"steps": self.steps, "data": self.batches.state_dict()}
        return self.write_checkpoint(reason, state, tokenizer=self.tokenizer)

    def nonfinite_message(self, path: Path) -> str:
        return (
            f"the distillation loss was non-finite for {self.in_a_row} steps in a row (trainer.max_nonfinite = "
            f"{self.cfg.max_nonfinite}); stopped with the last good weights in {path}. Lower optimizer.lr."
        )

    def summary_metrics(self, train: list[dict[str, Any]], timed: list[dict[str, Any]]) -> dict[str, Any]:
        tail = train[-max(1, len(train) // 10) :]
        return {
            "final_loss": mean([r.get("loss") for r in tail]),
            "final_kd_loss": mean([r.get("kd_loss") for r in tail]),
            "tokens_per_s": tokens_per_s(timed),
        }

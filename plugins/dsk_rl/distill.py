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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from dsk.data.batching import IGNORE_INDEX, BatchIterator, ExampleStream, encode_record
from dsk.data.jsonl import read_jsonl
from dsk.train.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, set_rng_state
from dsk.train.context import RunContext, RunFailed, RunInterrupted, RunSetupError
from dsk.train.evaluate import test_records
from dsk.train.loop import apply_update, skip_update
from dsk.train.optim import build_adamw, load_optimizer_state
from dsk.train.schedule import lr_at
from dsk_rl.common import build_policy, evaluate_row, mean, save_run_checkpoint, step_generator, train_record_fn
from dsk_rl.config import DistillConfig
from dsk_rl.sft import resolve_checkpoint, run_sft, sft_steps
from dsk_rl.traces import generate_traces, write_jsonl

__all__ = ["DistillTrainer", "forward_kl", "load_teacher"]

TRACES_FILE = "traces.jsonl"


def load_teacher(path: Path, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The teacher model (eval mode, frozen) and its tokenizer (None when its checkpoint names none).

    Raises:
        RunSetupError: the directory is not a checkpoint dsk can load.
    """
    from dsk.data.tokenizers import load_tokenizer
    from dsk.model.hf import CheckpointError, load_pretrained

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
        tokenizer = ctx.build_tokenizer()
        task = ctx.build_task()
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
                generator=step_generator(device, ctx.seed, 0, salt=29), source=str(teacher_path), origin=self.name,
            )  # fmt: skip
            if not rows:
                raise RunFailed(f"the teacher {teacher_path} wrote no accepted trace; nothing to distill", None)
            write_jsonl(data_path, rows)
            trace_row = {"kind": "traces", "step": 0, **stats.row(), **({"stage": ctx.stage} if ctx.stage else {})}
            if teacher_eval:
                trace_row["teacher/eval/accuracy"] = teacher_eval.get("eval/accuracy")
            ctx.metrics.write(trace_row)
            ctx.reporter.message(f"kept {stats.kept} traces of {stats.sampled} samples -> {data_path}")
        n_rows = sum(1 for _ in open(data_path, encoding="utf-8"))
        steps = sft_steps(cfg, n_rows)
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
        student = build_policy(ctx, tokenizer.vocab_size, init_from=final)
        if eval_records:
            student_eval = evaluate_row(
                ctx, student, tokenizer, task, eval_records, int(result.get("step", steps)),
                max_new_tokens=cfg.eval_max_new_tokens, rewards=cfg.rewards, examples=3,
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


class _LogitRun:
    """Logit distillation loop: SFT cross-entropy mixed with the forward KL from the teacher (resumable)."""

    def __init__(self, trainer, ctx, teacher, tokenizer, data_path, steps, student_init):
        self.trainer, self.ctx, self.teacher, self.tokenizer = trainer, ctx, teacher, tokenizer
        self.cfg: DistillConfig = trainer.config
        self.data_path, self.steps, self.student_init = data_path, steps, student_init
        self.device = torch.device(ctx.device)
        self.step = 0
        self.in_a_row = self.skipped = 0
        self.last_checkpoint: Path | None = None
        self.last_saved_step = -1

    def setup(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        self.model = build_policy(ctx, self.tokenizer.vocab_size, init_from=self.student_init)
        self.optimizer = build_adamw(self.model, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        rows = read_jsonl(self.data_path, "sft")
        self.batches = BatchIterator(
            ExampleStream(rows, seed=ctx.seed), self.tokenizer, batch_size=cfg.batch_size, max_len=cfg.seq_len,
            encode=lambda r: encode_record(self.tokenizer, {"prompt": r["prompt"], "completion": r["completion"]}),
        )  # fmt: skip
        if ctx.resume_from is not None:
            ckpt = load_checkpoint(ctx.resume_from)
            if ckpt.state.get("trainer") != self.trainer.name:
                raise RunSetupError(f"{ckpt.path}: written by trainer {ckpt.state.get('trainer')!r}, not 'distill'")
            load_model_weights(self.model, ckpt.model_state, str(ckpt.path))
            load_optimizer_state(self.optimizer, ckpt.optimizer_tensors, ckpt.optimizer_meta, str(ckpt.path))
            self.batches.load_state_dict(ckpt.state["data"])
            set_rng_state(ckpt.state["rng"])
            self.step = ckpt.step
            self.last_checkpoint, self.last_saved_step = ckpt.path, ckpt.step
            ctx.metrics.truncate_after(self.step)

    def train_step(self) -> dict[str, Any]:
        cfg, model = self.cfg, self.model
        step = self.step + 1
        started = time.perf_counter()
        lr = lr_at(
            step, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=min(cfg.warmup_steps, self.steps),
            total_steps=self.steps, schedule=cfg.schedule,
        )  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = next(self.batches)
        input_ids = batch["input_ids"].to(self.device)  # (B, T)
        labels = batch["labels"].to(self.device)  # (B, T), aligned: the model shifts
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        out = model(input_ids, labels)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids).logits
        target = labels[:, 1:] != IGNORE_INDEX  # logits at t-1 predict the token at t
        kd = forward_kl(out.logits[:, :-1], teacher_logits[:, :-1], target, cfg.kd_temperature)
        w = cfg.kd_weight
        loss = out.loss - w * out.lm_loss + w * kd  # (1 - w) CE + w KD, MTP and aux losses kept
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=False)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        if finite:
            apply_update(self.optimizer, model)
            self.in_a_row = 0
        else:
            skip_update(self.optimizer, model)
            self.in_a_row += 1
            self.skipped += 1
        self.step = step
        elapsed = time.perf_counter() - started
        tokens = int(target.sum())
        row = {"kind": "train", "step": step, **({"stage": self.ctx.stage} if self.ctx.stage else {})}
        row.update(
            {
                "loss": float(loss.detach()) if finite else float("nan"),
                "lm_loss": float(out.lm_loss.detach()),
                "kd_loss": float(kd.detach()),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                "step_s": elapsed,
                "skipped": not finite,
            }
        )
        return row

    def save(self, reason: str) -> Path:
        path = save_run_checkpoint(
            self.ctx, self.step, trainer=self.trainer.name, model=self.model, optimizer=self.optimizer,
            tokenizer=self.tokenizer, state={"reason": reason, "steps": self.steps, "data": self.batches.state_dict()},
        )  # fmt: skip
        self.last_checkpoint, self.last_saved_step = path, self.step
        return path

    def run(self) -> dict[str, Any]:
        ctx, cfg = self.ctx, self.cfg
        self.setup()
        started = time.perf_counter()
        log_every = getattr(ctx.section("logging"), "every", 1)
        save_every = getattr(ctx.section("checkpoint"), "every", 0)
        ctx.reporter.start(self.steps, "distill (logit)" + (f" [{ctx.stage}]" if ctx.stage else ""), self.step)
        losses: list[float] = []
        try:
            while self.step < self.steps:
                if ctx.interrupt.requested:
                    path = self.save("interrupt") if self.last_saved_step != self.step else self.last_checkpoint
                    raise RunInterrupted(f"interrupted at step {self.step}; saved {path}", ctx.interrupt.signum, path)
                row = self.train_step()
                losses.append(row["loss"])
                if self.step % log_every == 0 or self.step == self.steps or row["skipped"]:
                    ctx.metrics.write(row)
                ctx.pm.hook.on_step_end(ctx=ctx, step=self.step, metrics=row)
                ctx.reporter.update(self.step, row)
                if self.in_a_row >= cfg.max_nonfinite:
                    raise RunFailed(f"non-finite loss for {self.in_a_row} steps in a row", self.save("nonfinite"))
                if save_every and self.step % save_every == 0 and self.step < self.steps:
                    self.save("interval")
            if self.last_saved_step != self.step:
                self.save("final")
        finally:
            ctx.reporter.stop()
        tail = losses[-max(1, len(losses) // 10) :]
        return {
            "stage": ctx.stage,
            "step": self.step,
            "final_loss": mean(tail),
            "nonfinite_skipped": self.skipped,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "train_s": time.perf_counter() - started,
        }

"""The next-token trainers: ``pretrain`` (every token a target) and ``sft`` (prompt tokens masked out of the loss).

One optimizer step:

1. ``grad_accum`` micro-batches of ``batch_size`` rows from the resumable batch iterator;
2. per micro-batch ``loss = lm + mtp + aux`` (``ModelOutput.loss``), weighted by its share of the step's target
   tokens so that accumulation equals one big batch, and back-propagated;
3. the global gradient norm is clipped; a non-finite loss or norm skips the update (counted; ``max_nonfinite`` in a
   row stop the run);
4. ``optimizer.step()`` at the warm-up + cosine rate, then the components' step metrics (per-layer MaxVio) are read
   and ``after_optimizer_step`` runs (router bias updates);
5. a ``metrics.jsonl`` row, the ``on_step_end`` hook, the progress bar; evaluation and checkpoints on their cadence.

Evaluation: greedy accuracy (and pass@k) on the test problems of a task with prompts; on text data (``{"text"}``
records, e.g. ``task/jsonl``) the held-out loss instead: ``eval/loss``, the mean next-token cross-entropy of the
first ``eval_samples`` test records (training's LM loss, without MTP and auxiliary terms), and ``eval/ppl`` =
exp(``eval/loss``).

Exact resume: the checkpoint holds weights, router biases, optimizer moments, the data position and the RNG
states; the learning rate is a function of the step; so a resumed run repeats the uninterrupted run's arithmetic.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from dsk.api.runtime import (
    IGNORE_INDEX,
    BatchIterator,
    ExampleStream,
    RunContext,
    RunSetupError,
    SideChannels,
    TrainerRun,
    build_run,
    document_causal_mask,
    encode_example,
    evaluate_loss,
    evaluate_task,
    loss_from_output,
    remove_stale_temporaries,
    test_records,
    test_text_records,
    tokens_per_s,
)
from dsk_trainers.config import LMTrainerConfig

__all__ = ["LMTrainer", "PretrainTrainer", "SFTTrainer", "encoder_for", "moe_metrics", "train_stream"]


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
def encoder_for(mode: str, tokenizer: Any):
    """``record -> (ids, loss_mask)`` for a trainer mode.

    - ``sft``: ``[BOS] prompt completion [EOS]`` with targets on the completion and EOS only;
    - ``pretrain``: the same tokens, every one a target but BOS (the model also learns to model prompts).

    Prompt and completion are encoded separately in both modes, so the prompt tokens match those of evaluation.
    Records with only ``text`` are plain documents (every token a target in both modes).
    """

    def encode(record: dict[str, Any]) -> tuple[list[int], list[int]]:
        if "prompt" in record and "completion" in record:
            ids, mask = encode_example(tokenizer, record["prompt"], record["completion"])
            if mode == "pretrain":
                head = 1 if tokenizer.bos_id is not None else 0
                mask = [0] * head + [1] * (len(ids) - head)
            return ids, mask
        if "text" in record:
            return encode_example(tokenizer, record["text"])
        raise RunSetupError(f"a data record has keys {sorted(record)}; expected 'text' or 'prompt' and 'completion'")

    return encode


def train_stream(task: Any, seed: int) -> ExampleStream:
    """The training records of a data source: ``task.sample("train", i)`` for a task, else a shuffled sequence."""
    if hasattr(task, "sample"):
        return ExampleStream(lambda i: task.sample("train", i))
    if hasattr(task, "__len__") and hasattr(task, "__getitem__"):
        return ExampleStream(task, seed=seed)
    raise RunSetupError(f"[data] {type(task).__name__} is neither a task (sample(split, i)) nor a sequence of records")


def first_train_record(task: Any) -> dict[str, Any] | None:
    """The first training record of a data source (None when it has none to give)."""
    try:
        if hasattr(task, "sample"):
            return task.sample("train", 0)
        if hasattr(task, "__len__") and hasattr(task, "__getitem__") and len(task):
            return task[0]
    except (ValueError, IndexError, KeyError):  # an empty split: training reports it
        return None
    return None


def moe_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The components' step metrics (``BuiltRun.side.metrics()``) as metrics-row keys: ``moe/layer{i}/maxvio``,
    ``moe/mtp{k}/maxvio`` and the mean ``moe/maxvio`` and max ``moe/maxvio_max`` over all MoE layers; list-valued
    metrics (loads) are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            continue
        if "/" in key:  # the aggregates "<metric>/mean", "<metric>/max"
            metric, _, agg = key.partition("/")
            out[f"moe/{metric}" if agg == "mean" else f"moe/{metric}_{agg}"] = value
            continue
        path, _, metric = key.rpartition(".")
        parts = path.split(".")
        if parts[0] == "layers":
            out[f"moe/layer{parts[1]}/{metric}"] = value
        elif parts[0] == "mtp" and len(parts) > 2:
            out[f"moe/mtp{parts[2]}/{metric}"] = value
        else:
            out[f"{path}/{metric}"] = value
    return out


#: side channels with no component: the auxiliary losses are added by BuiltRun.forward_backward, stage by stage
_NO_SIDE = SideChannels()


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class LMTrainer:
    """Next-token trainer (kind ``trainer``); built as ``LMTrainer(config)``, run by ``run(ctx)``."""

    name: ClassVar[str] = "lm"
    mode: ClassVar[str] = "pretrain"

    def __init__(self, config: LMTrainerConfig):
        self.config = config

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Train for ``config.steps`` optimizer steps (continuing ``ctx.resume_from`` if set); returns the summary."""
        return _Run(self, ctx).run()


class PretrainTrainer(LMTrainer):
    """``type = "pretrain"``: every token is a target."""

    name = "pretrain"
    mode = "pretrain"


class SFTTrainer(LMTrainer):
    """``type = "sft"``: prompt tokens are masked out of the loss."""

    name = "sft"
    mode = "sft"


class _Run(TrainerRun):
    """State of one trainer run (one stage); the loop is :class:`dsk.train.loop.TrainerRun`'s."""

    trainer: LMTrainer
    cfg: LMTrainerConfig
    summary_columns = (("moe/maxvio", "maxvio", ".3f"),)

    # -- set-up ------------------------------------------------------------------------------------------------
    def _check_sizes(self) -> None:
        cfg, model_cfg = self.cfg, self.ctx.section("model")
        if model_cfg is not None and cfg.seq_len > model_cfg.max_seq_len:
            raise RunSetupError(
                f"trainer.seq_len = {cfg.seq_len} is larger than model.max_seq_len = {model_cfg.max_seq_len}"
            )

    def setup(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        self._check_sizes()
        built = self.use(build_run(ctx))  # model from [model] (seeded), features, strategy, [optimizer]
        self.tokenizer, self.task = built.tokenizer, built.task
        # every data rank reads the same global batch of batch_size rows per rank and keeps its own rows
        # (built.local_rows): the data position is the same on every rank, so any rank count resumes it
        self.batches = BatchIterator(
            train_stream(self.task, ctx.seed),
            self.tokenizer,
            batch_size=cfg.batch_size * built.parallel.data_world_size,
            max_len=cfg.seq_len,
            pack=cfg.packing,
            encode=encoder_for(self.trainer.mode, self.tokenizer),
        )
        self.eval_records = test_records(self.task, cfg.eval_samples)
        self.loss_records = [] if self.eval_records else self._held_out_text()
        if ctx.is_writer:
            remove_stale_temporaries(ctx.run_dir)
        if ctx.resume_from is not None:
            self._resume(ctx.resume_from)

    def _held_out_text(self) -> list[dict[str, Any]]:
        """The test records of the held-out loss when the data is text; says once when it has no test split."""
        records = test_text_records(self.task, self.cfg.eval_samples)
        if records or self.cfg.eval_samples <= 0:
            return records
        first = first_train_record(self.task)
        if first is not None and "text" in first and "prompt" not in first and self.ctx.is_writer:
            self.ctx.reporter.message(
                "note: the text data has no test split, so no held-out loss (eval/loss) is reported; give the "
                "data one to measure it (task/jsonl: data.test_path or data.test_percent)"
            )
        return []

    def restore(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["data"])

    # -- one optimizer step ------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        """Run optimizer step ``self.step + 1``; returns its metrics row."""
        cfg, model, built = self.cfg, self.model, self.built
        step = self.step + 1
        started = time.perf_counter()
        lr = built.set_lr(step, cfg.steps)
        micro = [built.local_rows(next(self.batches)) for _ in range(cfg.grad_accum)]
        # Each micro-batch's mean loss is weighted by its share of the step's targets on all data ranks (a row's
        # first label is never scored): the weighted sum is the mean over all targets of the step, as one batch of
        # batch_size * grad_accum * data ranks rows would give (the strategy averages the ranks' gradients).
        n_targets = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
        total_targets = max(1.0, built.global_sum([sum(n_targets)])[0])
        world = built.parallel.data_world_size
        aux_weight = 1.0 / len(micro)  # averaged over the data ranks by the strategy, like the gradients
        model.train()
        self.optimizer.zero_grad(set_to_none=True)
        inject = step in cfg.debug_nonfinite_steps
        batches = []
        tokens = 0
        for batch in micro:
            # labels are aligned with input_ids (-100: not a target); the model shifts them (dsk.model.transformer).
            # Packed rows attend within their own example only. Positions stay 0..T-1 for the whole row: RoPE
            # scores depend on i - j only, so an example's offset inside the row changes nothing.
            doc_ids = batch["doc_ids"]
            mask = document_causal_mask(doc_ids).to(self.device) if cfg.packing else None
            batches.append(
                {"input_ids": batch["input_ids"].to(self.device), "labels": batch["labels"].to(self.device),
                 "mask": mask}
            )  # fmt: skip
            tokens += int((doc_ids >= 0).sum())

        def loss_fn(out: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            # The token losses (LM, and MTP, which shares its 1/T denominator) take the batch's share of the step's
            # targets on all data ranks (built.loss_weights: a row's first label is never scored); the weighted sum
            # is the mean over all targets of the step, as one batch of batch_size * grad_accum * data ranks rows
            # would give, and a pipeline's chunk of a micro-batch takes its own share. The auxiliary loss, a mean
            # over the micro-batch's sequences, takes an equal share (aux_weight; every micro-batch holds
            # batch_size rows).
            weight = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) * world / total_targets
            out = loss_from_output(self.built.base_model, out, batch["labels"], side=_NO_SIDE)
            tokens_loss = out.lm_loss if out.mtp_loss is None else out.lm_loss + out.mtp_loss  # out.loss's order
            shares = {k: v.detach().float() * weight for k, v in out.parts().items() if k in ("lm_loss", "mtp_loss")}
            loss = tokens_loss * weight
            return (loss * float("nan") if inject else loss), shares

        parts = built.forward_backward(batches, loss_fn, aux_weight=aux_weight)
        parts = built.mean_over_ranks(parts)  # the step's loss over all ranks' targets, as one process reports it
        tokens = int(built.global_sum([tokens])[0])
        loss_total = parts["loss"] * (float("nan") if inject else 1.0)
        update = built.update(loss_total, step, read_metrics=moe_metrics)
        finite, grad_norm, moe = update.finite, update.grad_norm, update.metrics
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.skipped += 1
        self.step = step
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        row: dict[str, Any] = {"kind": "train", "step": step}
        if self.ctx.stage is not None:
            row["stage"] = self.ctx.stage
        row.update({k: float(v) for k, v in parts.items()})
        if not finite:
            row["loss"] = float("nan")
        row.update(
            {
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_total": self.tokens_seen,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                "step_s": elapsed,
                "skipped": not finite,
                "nonfinite_skipped": self.skipped,
            }
        )
        row.update(moe)
        return row

    # -- evaluation, checkpoints ---------------------------------------------------------------------------------
    def evaluate(self, examples: int = 0) -> dict[str, Any]:
        cfg = self.cfg
        if not self.eval_records and not self.loss_records:
            return {}
        with self.built.evaluation_model() as (model, parallel):  # a pipeline: a whole copy on the writer
            result = None
            if model is not None and self.eval_records:
                result = evaluate_task(
                    model, self.tokenizer, self.task, self.eval_records,
                    max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch_size, pass_k=cfg.pass_k,
                    temperature=cfg.pass_k_temperature, seed=self.ctx.seed * 1_000_003 + self.step,
                    examples=examples, parallel=parallel,
                )  # fmt: skip
            elif model is not None:  # text data: the held-out loss
                result = evaluate_loss(
                    model, self.loss_records, encode=encoder_for(self.trainer.mode, self.tokenizer),
                    pad_id=self.tokenizer.pad_id, max_len=cfg.seq_len, batch_size=cfg.eval_batch_size,
                    parallel=parallel,
                )  # fmt: skip
        if parallel is not self.built.parallel:
            result = self.built.parallel.broadcast_object(result)
        sample = result.pop("examples", None)
        row = {"kind": "eval", "step": self.step, **({"stage": self.ctx.stage} if self.ctx.stage else {}), **result}
        self.ctx.metrics.write(row)
        self.ctx.reporter.update(self.step, row)
        if sample is not None:
            row = {**row, "examples": sample}
        return row

    def save(self, reason: str) -> Path:
        state = {"steps": self.cfg.steps, "data": self.batches.state_dict()}
        return self.write_checkpoint(reason, state, tokenizer=self.tokenizer)

    # -- the loop ----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        threads = torch.get_num_threads()
        if self.cfg.cpu_threads is not None:
            torch.set_num_threads(self.cfg.cpu_threads)
        try:
            return super().run()
        finally:
            torch.set_num_threads(threads)  # the setting is process-wide: leave it as it was found

    def nonfinite_message(self, path: Path) -> str:
        step, first = self.step, self.step - self.in_a_row + 1
        return (
            f"the loss or gradient was non-finite for {self.in_a_row} optimizer steps in a row "
            f"(steps {first}-{step}; trainer.max_nonfinite = {self.cfg.max_nonfinite}); stopped. Those updates "
            f"were skipped, so {path} holds the weights of the last good step. Lower optimizer.lr or "
            "raise optimizer.warmup_steps, then resume or restart."
        )

    def summary_metrics(self, train: list[dict[str, Any]], timed: list[dict[str, Any]]) -> dict[str, Any]:
        tail = train[-max(1, len(train) // 10) :]
        return {
            "final_loss": _mean([r.get("loss") for r in tail]),
            "last_loss": train[-1].get("loss") if train else None,
            "final_lm_loss": _mean([r.get("lm_loss") for r in tail]),
            "moe/maxvio": _mean([r.get("moe/maxvio") for r in tail]),
            "tokens_per_s": tokens_per_s(timed),
        }

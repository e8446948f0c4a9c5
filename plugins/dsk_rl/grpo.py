"""The GRPO trainer (``[trainer] type = "grpo"``): DeepSeek-R1-Zero's reinforcement learning on verifiable tasks.

One rollout step:

1. take ``prompts_per_step`` training prompts (the record at index ``step * prompts_per_step + j``: the data position
   is a function of the step, so a resumed run sees the same prompts);
2. sample ``G = num_generations`` completions of each with the KV-cached batched sampler, each group from its own
   generator seeded by (seed, step, group) (:func:`dsk_rl.common.group_generator`);
3. score them with every ``[trainer.rewards.<name>]`` (None = not applicable), sum with the weights, and turn the
   sums into group-relative advantages (:func:`dsk_rl.grpo_loss.group_advantages`);
4. ``num_iterations`` optimizer updates on the batch: per micro-batch one causal forward of prompt + completion,
   the clipped surrogate (+ beta * k3 KL to a frozen reference) aggregated by ``loss_type`` and back-propagated;
   the first pass's log-probs are the old log-probs of the later passes (so rho = 1 on the first pass, TRL's rule);
5. a metrics row (reward mean/std per reward, frac_reward_zero_std, clip ratios, KL, entropy, completion lengths,
   truncation ratio), the completions table under ``completions/``, evaluation and checkpoints on their cadence.

Steps count rollouts; the learning-rate schedule runs over ``steps * num_iterations`` optimizer updates.

Many ranks: data rank r of W takes groups ``r * P/W .. (r+1) * P/W - 1`` of the step (``P = prompts_per_step``, a
multiple of W; a group's G completions stay on one rank), samples them (each group from its own generator, so
the completions do not depend on the rank count; generation's stop agreed across ranks, so a sharded model never
hangs), and scores them. The reward table (and the completion lengths) are gathered, so advantages, including
``scale_rewards = "batch"``, and every metric are one process's. Gradients are the mean over the data ranks (the
strategy's reduction): ``dapo`` divides by the step's active tokens over all ranks (all-reduced) times W, so it
equals one process exactly; ``grpo``, ``bnpo`` and ``dr_grpo`` normalise per micro-batch, as TRL does per process,
so they equal one process when each rank's micro-batches are one process's (``P/W * G`` a multiple of
``micro_batch_size``). Every rank runs the same micro-batches' forwards and backwards: one whose rows all carry no
signal on this rank while another rank trains on it runs a zero-weighted one-row pass (a sharded model's
collectives). The KL reference is an unwrapped copy of the policy taken before the strategy wraps it.

Exact resume: weights, optimizer moments, router biases and RNG states come from the checkpoint, prompts and
sampling generators are functions of the step, and the KL reference is saved beside the checkpoints.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from dsk.api.runtime import (
    RunContext,
    RunSetupError,
    TrainerRun,
    build_run,
    done_across_ranks,
    find_drafter,
    list_checkpoints,
    load_model_weights,
    model_state_for_saving,
    test_records,
    tokens_per_s,
)
from dsk_rl.common import (
    data_share,
    eval_columns,
    evaluate_row,
    freeze_unused_heads,
    group_generator,
    mean,
    moe_metrics,
    train_record_fn,
)
from dsk_rl.config import GRPOConfig
from dsk_rl.grpo_loss import aggregate, clipped_surrogate, group_advantages, token_entropy, token_logprobs
from dsk_rl.rollout import (
    Packed,
    RewardScores,
    completion_logits,
    encode_prompts,
    length_groups,
    pack,
    sample,
    score,
)
from dsk_rl.sft import resolve_checkpoint

__all__ = ["GRPOTrainer", "write_completions_table"]

REFERENCE_DIR = "reference"
COMPLETIONS_DIR = "completions"


class GRPOTrainer:
    """Group Relative Policy Optimization (kind ``trainer``); built as ``GRPOTrainer(config)``, run by ``run(ctx)``."""

    name: ClassVar[str] = "grpo"

    def __init__(self, config: GRPOConfig):
        self.config = config

    def run(self, ctx: RunContext) -> dict[str, Any]:
        """Train for ``config.steps`` rollout steps (continuing ``ctx.resume_from`` if set); returns the summary."""
        return _GRPORun(self, ctx).run()


def write_completions_table(
    directory: Path,
    step: int,
    records: list[dict[str, Any]],
    texts: list[str],
    scores: RewardScores,
    advantages: torch.Tensor,
    truncated: list[bool],
    limit: int,
) -> Path:
    """``completions/step-N.jsonl`` (one row per completion) and ``step-N.md`` (the same as a table).

    Rows come from whole groups, first to last, so a reader sees a prompt's completions side by side.
    """
    directory.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(min(limit, len(texts))):
        rows.append(
            {
                "step": step,
                "prompt": records[i]["prompt"],
                "completion": texts[i],
                "answer": records[i].get("answer"),
                "rewards": scores.row(i),
                "reward": None if torch.isnan(scores.total[i]) else float(scores.total[i]),
                "advantage": float(advantages[i]),
                "truncated": bool(truncated[i]),
            }
        )
    jsonl = directory / f"step-{step:06d}.jsonl"
    tmp = jsonl.with_name(f".{jsonl.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, jsonl)

    def cell(value: Any) -> str:
        text = "-" if value is None else f"{value:.3g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    head = ["prompt", "completion", *scores.names, "reward", "advantage"]
    lines = [f"# step {step}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["prompt"], r["completion"], *(r["rewards"][n] for n in scores.names), r["reward"], r["advantage"]]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    (directory / f"step-{step:06d}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl


class _GRPORun(TrainerRun):
    """State of one GRPO run (one stage); the loop is :class:`dsk.train.loop.TrainerRun`'s."""

    trainer: GRPOTrainer
    cfg: GRPOConfig
    summary_columns = (("reward_final", "reward", ".3f"),)

    def __init__(self, trainer: GRPOTrainer, ctx: RunContext):
        super().__init__(trainer, ctx)
        self.ref_step = 0
        if self.cfg.eval_samples:  # the sampled evaluation's figures in the summary and on the progress bar
            self.summary_columns = (*self.summary_columns, *eval_columns(self.cfg.rewards, self.cfg.eval_sampled_k))

    # -- set-up ------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        ctx, cfg = self.ctx, self.cfg
        init = ctx.init_from
        if init is None and cfg.init_checkpoint:
            init = resolve_checkpoint(ctx, cfg.init_checkpoint)
        self.ref = None

        def prepare(model: torch.nn.Module) -> None:
            # the MTP heads are frozen before the optimizer is built: a policy-gradient loss never reaches them
            freeze_unused_heads(model)
            if cfg.beta > 0:
                # the KL reference: a plain copy taken before the parallel strategy wraps or shards the policy,
                # so its forwards are local on every rank
                self.ref = copy.deepcopy(model).eval().requires_grad_(False)

        built = self.use(build_run(ctx, init_from=init, prepare=prepare))
        world = built.parallel.data_world_size
        if cfg.prompts_per_step % world:
            raise RunSetupError(
                f"trainer.prompts_per_step = {cfg.prompts_per_step} does not split over the {world} data-parallel "
                f"ranks (a group's completions stay on one rank): make it a multiple of {world}"
            )
        if cfg.rollout_drafter is not None:
            if world > 1:
                raise RunSetupError(
                    f"trainer.rollout_drafter = {cfg.rollout_drafter!r} runs on one process: a drafter's own "
                    f"forwards are not kept in step over the {world} data-parallel ranks; unset it for this run"
                )
            try:
                find_drafter(self.model, cfg.rollout_drafter)
            except ValueError as exc:
                raise RunSetupError(f"trainer.rollout_drafter: {exc}") from None
        self.tokenizer, self.task = built.tokenizer, built.task
        if not callable(getattr(self.task, "check", None)):
            raise RunSetupError("GRPO needs a [data] task with a checker (check(record, text)) for its rewards")
        self.record_at = train_record_fn(self.task)
        self.eval_records = test_records(self.task, cfg.eval_samples)
        if ctx.resume_from is not None:
            self._resume(ctx.resume_from)
        elif self.ref is not None:
            self._save_reference()

    def _reference_path(self, step: int) -> Path:
        return self.ctx.run_dir / REFERENCE_DIR / f"step-{step}.safetensors"

    def _save_reference(self) -> None:
        """Keep the KL reference of step ``ref_step`` on disk (atomically), so a resumed run uses the same one."""
        from safetensors.torch import save_file

        if not self.ctx.is_writer:
            return
        path = self._reference_path(self.ref_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(model_state_for_saving(self.ref), str(tmp))
        os.replace(tmp, path)

    def restore(self, state: dict[str, Any]) -> None:
        self.start_eval = dict(state.get("start_eval") or {})
        if self.ref is not None:
            from safetensors.torch import load_file

            self.ref_step = int(state.get("ref_step", 0))
            ref_path = self._reference_path(self.ref_step)
            if not ref_path.is_file():
                raise RunSetupError(f"{ref_path}: the KL reference of this run is missing, so it cannot resume exactly")
            load_model_weights(self.ref, load_file(str(ref_path)), str(ref_path))

    # -- one rollout step --------------------------------------------------------------------------------------
    def rollout(self, step: int):
        """Records, samples and rewards of this rank's groups of rollout step ``step`` (1-based).

        The step's prompts are the records ``(step - 1) * P .. step * P - 1``; this data rank holds its share of
        them (:func:`dsk_rl.common.data_share`), each group sampled from its own generator.
        """
        cfg, parallel = self.cfg, self.built.parallel
        first = (step - 1) * cfg.prompts_per_step
        start, stop = data_share(parallel, cfg.prompts_per_step)
        step_prompts = [self.record_at(first + j) for j in range(cfg.prompts_per_step)]
        prompts = step_prompts[start:stop]
        longest = max(len(p) for p in encode_prompts(self.tokenizer, step_prompts))  # the same budget on every rank
        generators = [group_generator(self.device, self.ctx.seed, step, j) for j in range(start, stop)]
        samples = sample(
            self.model, self.tokenizer, encode_prompts(self.tokenizer, prompts), cfg.num_generations,
            max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
            batch_size=cfg.generation_batch_size, generator=generators, sync_done=done_across_ranks(parallel),
            max_prompt_len=longest, drafter=cfg.rollout_drafter,
        )  # fmt: skip
        records = [r for r in prompts for _ in range(cfg.num_generations)]
        scores = score(
            cfg.rewards, [r["prompt"] for r in records], samples.texts, records,
            completion_ids=samples.completion_ids, truncated=samples.truncated,
            max_completion_length=cfg.max_completion_length, checker=self.task.check, registry=self.ctx.registry,
        )  # fmt: skip
        return records, samples, scores

    def _gather_rows(self, local_NC: torch.Tensor) -> torch.Tensor:
        """The step's rows of every data rank in rank order, [W * N, C] float64 (every rank holds N rows)."""
        parallel = self.built.parallel
        world = parallel.data_world_size
        local_NC = local_NC.to("cpu", torch.float64)
        if world == 1:
            return local_NC
        n = local_NC.shape[0]
        full = torch.zeros((world * n, local_NC.shape[1]), dtype=torch.float64)
        full[parallel.data_rank * n : (parallel.data_rank + 1) * n] = local_NC
        return parallel.all_reduce(full, "sum")  # x + 0 is exact (NaN stays NaN): the rows themselves

    def _length_groups(self, idx: torch.Tensor, samples: Any) -> list[torch.Tensor]:
        """The rows ``idx`` of a micro-batch in groups of similar length, one pass each (``group_by_length``)."""
        if idx.numel() == 0:
            return []
        if not self.cfg.group_by_length or idx.numel() == 1:
            return [idx]
        rows = idx.tolist()
        lengths = [len(samples.prompt_ids[i]) + len(samples.completion_ids[i]) for i in rows]
        return [idx[g] for g in length_groups(lengths, self.cfg.length_group_overhead)]

    def _idle_pass(self, packed: Packed, chunk: torch.Tensor) -> None:
        """A zero-weighted forward and backward of one row, for a micro-batch another rank trains on while this one
        has no row with a signal in it: a sharded model's forward and backward are collectives that every rank
        must join. In eval mode, so it adds no router load and no auxiliary loss; its gradient is exactly 0."""
        mb = packed.rows(chunk[:1]).to(self.device)
        self.model.eval()
        try:
            (completion_logits(self.model, mb).sum() * 0.0).backward()
        finally:
            self.model.train()

    def train_step(self) -> dict[str, Any]:
        """Run rollout step ``self.step + 1``; returns its metrics row (global: the same on every rank)."""
        cfg, model, parallel = self.cfg, self.model, self.built.parallel
        world = parallel.data_world_size
        step = self.step + 1
        started = time.perf_counter()
        records, samples, scores = self.rollout(step)
        gen_s = time.perf_counter() - started
        N = len(samples)  # this rank's completions
        K = len(scores.names)
        lengths = torch.tensor([len(c) for c in samples.completion_ids], dtype=torch.float64)
        truncated = torch.tensor(samples.truncated)
        # the step's reward table and completion lengths on every rank: advantages and metrics are one process's
        table = self._gather_rows(torch.cat([scores.values, lengths[:, None], truncated.double()[:, None]], 1))
        step_scores = RewardScores(scores.names, scores.weights, table[:, :K])
        adv = group_advantages(step_scores.total, cfg.num_generations, cfg.scale_rewards, cfg.reward_eps)
        first_row = parallel.data_rank * N if world > 1 else 0
        advantages = adv.advantages[first_row : first_row + N]
        packed = pack(samples.prompt_ids, samples.completion_ids, self.tokenizer.pad_id)
        if cfg.mask_truncated_completions:
            # DAPO overlong filtering: a truncated completion says nothing about its answer, so it leaves the loss
            packed.mask = packed.mask * (~truncated).to(packed.mask.dtype)[:, None]
        chunks = [torch.arange(s, min(s + cfg.micro_batch_size, N)) for s in range(0, N, cfg.micro_batch_size)]
        # Rows whose loss is identically zero are left out of the forward: with beta = 0 a completion with advantage
        # 0 (a group whose rewards are all equal, frac_reward_zero_std) contributes -0 * rho per token, and a
        # masked-out completion contributes nothing. The normalisers still count them (aggregate's batch_size and
        # local_tokens), so the loss and the update are exactly those of the full batch, for less compute.
        has_tokens = packed.mask.sum(1) > 0
        signal = has_tokens if cfg.beta > 0 else has_tokens & (advantages != 0)
        active = [chunk[signal[chunk]] for chunk in chunks]
        chunk_tokens = [packed.mask[chunk].sum() for chunk in chunks]
        # Each micro-batch's rows that run are split into groups of similar length, one forward and backward each
        # (group_by_length): fewer padded token slots for a few more passes. The losses are sums over rows with the
        # micro-batch's normalisers, so the split leaves the loss and the update unchanged.
        pieces = [self._length_groups(idx, samples) for idx in active]
        # N_glob of the dapo normaliser (the whole step's active tokens, all ranks) and the micro-batches that run
        # on some rank, in one all-reduce
        counts = torch.tensor([float(packed.mask.sum())] + [float(idx.numel()) for idx in active], dtype=torch.float64)
        if world > 1:
            counts = parallel.all_reduce(counts, "sum")
            # every rank runs as many passes per micro-batch as the rank with the most groups (collectives)
            most = parallel.all_reduce(torch.tensor([float(len(p)) for p in pieces], dtype=torch.float64), "max")
            empty = torch.zeros(0, dtype=torch.long)
            pieces = [p + [empty] * (int(n) - len(p)) for p, n in zip(pieces, most.tolist(), strict=True)]
        n_active = counts[0].to(packed.mask.dtype)
        runs = [bool(c > 0) for c in counts[1:].tolist()]
        flat = [(c, k, piece) for c, chunk_pieces in enumerate(pieces) for k, piece in enumerate(chunk_pieces)]
        stats = _StepStats()
        ref_logps = None
        if self.ref is not None and n_active > 0:
            ref_logps = self._reference_logps(packed, [piece for _, _, piece in flat])
        old_logps: list[torch.Tensor | None] = [None] * len(flat)
        grad_norm = torch.tensor(0.0)
        finite = True
        moe: dict[str, float] = {}
        for it in range(cfg.num_iterations):
            opt_step = (step - 1) * cfg.num_iterations + it + 1
            lr = self.built.set_lr(opt_step, cfg.steps * cfg.num_iterations)
            self.optimizer.zero_grad(set_to_none=True)
            if n_active == 0:
                # every completion masked out (e.g. all truncated with mask_truncated_completions): no signal, so no
                # forward, no update; the loss of the step is 0 (TRL's test of the same case)
                continue
            model.train()
            loss_total = torch.zeros((), device=self.device)
            for f, (c, k, idx) in enumerate(flat):
                if not runs[c]:
                    continue
                if idx.numel() == 0:
                    self._idle_pass(packed, chunks[c])  # another rank trains on this pass of micro-batch c
                    continue
                mb = packed.rows(idx).to(self.device)
                logits = completion_logits(model, mb)  # (B, C, V)
                logp = token_logprobs(logits, mb.targets)  # (B, C)
                if old_logps[f] is None:
                    old_logps[f] = logp.detach()  # pi_old = the policy before this batch's first update
                old = old_logps[f][:, : logp.shape[1]]
                token = clipped_surrogate(
                    logp, old, advantages[idx].to(self.device), epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                    delta=cfg.delta, ref_logp_BT=None if ref_logps is None else ref_logps[f].to(self.device),
                    beta=cfg.beta,
                )  # fmt: skip
                loss = aggregate(
                    token.loss, mb.mask, cfg.loss_type, max_completion_length=cfg.max_completion_length,
                    num_items_in_batch=n_active.to(self.device), grad_accum_steps=len(chunks),
                    num_processes=world, batch_size=len(chunks[c]), local_tokens=chunk_tokens[c],
                )  # fmt: skip
                aux = self.built.side.aux_loss(torch.float32)
                total = loss if aux is None else loss + aux * (len(idx) / N)
                total.backward()
                loss_total = loss_total + loss.detach()
                # the clip ratios' denominator is the micro-batch's active tokens: counted with its first pass
                share = chunk_tokens[c] if k == 0 else torch.zeros_like(chunk_tokens[c])
                stats.add(token, mb.mask, logits if it == 0 else None, aux, share)
            if not any(runs):
                # no completion carries a signal on any rank: the gradient is exactly zero, and AdamW still applies
                # its momentum, as it would after a full zero-gradient backward
                for p in self.params:
                    p.grad = torch.zeros_like(p)
            update = self.built.update(loss_total, opt_step, foreach=False, read_metrics=moe_metrics)
            finite, grad_norm = update.finite, update.grad_norm
            if not finite:
                break  # the rest of this batch's passes would start from the same bad point
            moe = update.metrics
            stats.losses.append(float(loss_total))
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            self.skipped += 1
        if self.ref is not None and cfg.ref_update_every and step % cfg.ref_update_every == 0:
            # R1: "the reference policy is replaced by the latest policy every 400 steps"
            self._refresh_reference()
            self.ref_step = step
            self._save_reference()
        self.step = step
        tokens = sum(len(p) + len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids, strict=True))
        losses, metrics, tokens = stats.reduce(parallel, tokens)
        self.tokens_seen += tokens
        elapsed = time.perf_counter() - started
        row = self._row(
            step, step_scores, adv, table[:, K], table[:, K + 1] > 0, losses, metrics, lr, grad_norm, finite,
            tokens, elapsed, gen_s,
        )  # fmt: skip
        row.update(moe)
        if cfg.rollout_drafter is not None:  # speculative rollouts (one process: these are the step's)
            row["rollout/acceptance_rate"] = samples.accepted / samples.drafted if samples.drafted else None
            generated = sum(len(c) for c in samples.completion_ids)
            row["rollout/tokens_per_forward"] = generated / samples.forwards if samples.forwards else None
        self._last_batch = (records, samples, scores, advantages)
        return row

    def _refresh_reference(self) -> None:
        """The KL reference becomes the current policy (on every rank; gathered where the policy is sharded)."""
        parallel = self.built.parallel
        if parallel.world_size == 1:
            self.ref.load_state_dict(self.built.base_model.state_dict())
            return
        state = parallel.model_state_dict(self.built.base_model)  # collective; the whole state on the writer
        if state is None:  # the strategy keeps the whole model on every rank
            state = model_state_for_saving(self.built.base_model)
        else:
            state = parallel.broadcast_object(state if parallel.is_writer else None)
        load_model_weights(self.ref, state, "the policy")

    @torch.no_grad()
    def _reference_logps(self, packed: Packed, chunks: list[torch.Tensor]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for idx in chunks:
            if idx.numel() == 0:
                out.append(None)
                continue
            mb = packed.rows(idx).to(self.device)
            out.append(token_logprobs(completion_logits(self.ref, mb), mb.targets))
        return out

    def _row(
        self, step, scores, adv, lengths, truncated, losses, metrics, lr, grad_norm, finite, tokens, elapsed, gen_s
    ) -> dict[str, Any]:
        """The step's metrics row from the step's (all ranks') rewards, advantages and completion lengths."""
        terminated = lengths[~truncated]
        total = scores.total
        row: dict[str, Any] = {"kind": "train", "step": step}
        if self.ctx.stage is not None:
            row["stage"] = self.ctx.stage
        row.update(
            {
                "loss": (sum(losses) / len(losses)) if losses else 0.0,
                "reward": _nanmean(total),
                "reward_std": _nanmean(adv.group_std),
                "frac_reward_zero_std": float(adv.zero_std.double().mean()),
            }
        )
        for k, name in enumerate(scores.names):
            col = scores.values[:, k]
            row[f"rewards/{name}/mean"] = _nanmean(col)
            row[f"rewards/{name}/std"] = _nanstd(col)
        row.update(metrics)
        row.update(
            {
                "completions/mean_length": float(lengths.mean()),
                "completions/min_length": float(lengths.min()),
                "completions/max_length": float(lengths.max()),
                "completions/mean_terminated_length": float(terminated.mean()) if len(terminated) else None,
                "completions/clipped_ratio": float(truncated.double().mean()),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens": tokens,
                "tokens_total": self.tokens_seen,
                "tokens_per_s": tokens / elapsed if elapsed > 0 else None,
                "step_s": elapsed,
                "generate_s": gen_s,
                "skipped": not finite,
                "nonfinite_skipped": self.skipped,
            }
        )
        if not finite:
            row["loss"] = float("nan")
        return row

    # -- evaluation, checkpoints ---------------------------------------------------------------------------------
    def evaluate(self, examples: int = 0) -> dict[str, Any]:
        return evaluate_row(
            self.ctx, self.model, self.tokenizer, self.task, self.eval_records, self.step,
            max_new_tokens=self.cfg.max_completion_length, batch_size=self.cfg.generation_batch_size,
            rewards=self.cfg.rewards, sampled_k=self.cfg.eval_sampled_k, temperature=self.cfg.eval_temperature,
            examples=examples,
        )  # fmt: skip

    def save(self, reason: str) -> Path:
        state = {
            "steps": self.cfg.steps,
            "ref_step": self.ref_step,
            "start_eval": self.start_eval,
            "data": {"prompts_consumed": self.step * self.cfg.prompts_per_step},
        }
        path = self.write_checkpoint(reason, state, tokenizer=self.tokenizer)
        self._prune_references()
        return path

    def _prune_references(self) -> None:
        """Drop saved references no checkpoint can resume to (older than the oldest kept checkpoint's)."""
        if self.ref is None or not self.ctx.is_writer:
            return
        kept = list_checkpoints(self.ctx.run_dir)
        if not kept:
            return
        oldest = kept[0][0]
        refs = sorted(int(p.stem.split("-")[1]) for p in (self.ctx.run_dir / REFERENCE_DIR).glob("step-*.safetensors"))
        needed = max([r for r in refs if r <= oldest], default=None)
        for r in refs:
            if needed is not None and r < needed:
                self._reference_path(r).unlink(missing_ok=True)

    # -- the loop's hooks (dsk.train.loop.TrainerRun) ----------------------------------------------------------
    def before_loop(self) -> None:
        if self.step == 0 and self.eval_records:
            self.start_eval = self.evaluate()  # the base policy's accuracy, the reference point of the run

    def log_row(self, row: dict[str, Any]) -> None:
        super().log_row(row)
        if self.cfg.log_completions and self.ctx.is_writer:  # the writing rank's groups: the step's first ones
            records, samples, scores, advantages = self._last_batch
            write_completions_table(
                self.ctx.run_dir / COMPLETIONS_DIR, self.step, records, samples.texts, scores, advantages,
                samples.truncated, self.cfg.log_completions,
            )  # fmt: skip

    def nonfinite_message(self, path: Path) -> str:
        return (
            f"the GRPO loss or gradient was non-finite for {self.in_a_row} steps in a row (trainer."
            f"max_nonfinite = {self.cfg.max_nonfinite}); stopped with the last good weights in {path}. Lower "
            "optimizer.lr or raise optimizer.warmup_steps."
        )

    def summary_metrics(self, train: list[dict[str, Any]], timed: list[dict[str, Any]]) -> dict[str, Any]:
        head = train[: max(1, len(train) // 10)]
        tail = train[-max(1, len(train) // 10) :]
        return {
            "final_loss": mean([r.get("loss") for r in tail]),
            "reward_start": mean([r.get("reward") for r in head]),
            "reward_final": mean([r.get("reward") for r in tail]),
            "tokens_per_s": tokens_per_s(timed),
            "step_s": mean([r.get("step_s") for r in timed]),
        }


def _nanmean(x: torch.Tensor) -> float | None:
    valid = x[~torch.isnan(x)]
    return float(valid.mean()) if valid.numel() else None


def _nanstd(x: torch.Tensor) -> float | None:
    valid = x[~torch.isnan(x)]
    return float(valid.std()) if valid.numel() > 1 else None


class _StepStats:
    """Token-level statistics of a step, summed over micro-batches and passes (host syncs once, at the end)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.losses: list[float] = []

    def _acc(self, key: str, total: torch.Tensor, count: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0) + total.detach().double().cpu()
        self.counts[key] = self.counts.get(key, 0) + count.detach().double().cpu()

    @torch.no_grad()
    def add(
        self, token: Any, mask: torch.Tensor, logits: torch.Tensor | None, aux: torch.Tensor | None,
        chunk_tokens: torch.Tensor,
    ) -> None:  # fmt: skip
        """Accumulate a micro-batch. Clip ratios are over all active tokens of the micro-batch (the rows left out
        have advantage 0 and cannot be clipped); KL and entropy over the tokens of the rows that ran."""
        m = mask.to(torch.float64)
        n = m.sum()
        self._acc("clip_ratio/low_mean", (token.low_clipped.double() * m).sum(), chunk_tokens)
        self._acc("clip_ratio/high_mean", (token.high_clipped.double() * m).sum(), chunk_tokens)
        region = (token.low_clipped | token.high_clipped).double()
        self._acc("clip_ratio/region_mean", (region * m).sum(), chunk_tokens)
        if token.kl is not None:
            self._acc("kl", (token.kl.double() * m).sum(), n)
        if logits is not None:
            self._acc("entropy", (token_entropy(logits).double() * m).sum(), n)
        if aux is not None:
            self._acc("aux_loss", aux.double(), torch.ones((), dtype=torch.float64))

    def metrics(self) -> dict[str, float]:
        return {k: float(self.sums[k] / self.counts[k].clamp(min=1)) for k in self.sums}

    KEYS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl", "entropy", "aux_loss")

    def reduce(self, parallel: Any, tokens: int) -> tuple[list[float], dict[str, float], int]:
        """``(losses, metrics, tokens)`` of the step over all data ranks, in one all-reduce.

        A pass's loss is the mean of the ranks' (each rank's loss is weighted so that the mean is one process's);
        every ratio is its numerator summed over the ranks over its denominator summed; tokens are summed. In one
        process: the rank's own values.
        """
        world = parallel.data_world_size
        if world == 1:
            return list(self.losses), self.metrics(), tokens
        zero = torch.zeros((), dtype=torch.float64)
        sums = [self.sums.get(k, zero) for k in self.KEYS]
        counts = [self.counts.get(k, zero) for k in self.KEYS]
        present = [float(k in self.sums) for k in self.KEYS]
        flat = torch.cat(
            [
                torch.tensor(self.losses, dtype=torch.float64) / world,
                torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in sums + counts]),
                torch.tensor(present + [float(tokens)], dtype=torch.float64),
            ]
        )
        flat = parallel.all_reduce(flat, "sum")
        n = len(self.losses)
        losses = flat[:n].tolist()
        k = len(self.KEYS)
        s, c, p = flat[n : n + k], flat[n + k : n + 2 * k], flat[n + 2 * k : n + 3 * k]
        metrics = {key: float(s[i] / c[i].clamp(min=1)) for i, key in enumerate(self.KEYS) if p[i] > 0}
        return losses, metrics, int(flat[-1])

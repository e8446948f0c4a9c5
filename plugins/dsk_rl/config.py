"""Configs of the post-training trainers (torch-free: imported by ``dsk recipe validate``).

``[trainer] type = "grpo"``, ``"rejection_sampling"`` or ``"distill"``; rewards are keyed tables whose ``type``
defaults to the key::

    [trainer]
    type = "grpo"
    steps = 60
    num_generations = 8

    [trainer.rewards.accuracy]
    weight = 1.0
    [trainer.rewards.format]
    weight = 1.0

The optimizer and its schedule are the ``[optimizer]`` section of the stage (recipe schema 2), shared by every trainer;
these trainers declare RL defaults for it (:class:`OptimConfig`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, model_validator

from dsk.api import BaseConfig, ResolvedSlot, Slot, SlotField, SlotMap, SlotMapField

__all__ = ["DistillConfig", "GRPOConfig", "OptimConfig", "RejectionSamplingConfig", "SamplingConfig"]


class OptimConfig(BaseConfig):
    """Device and the non-finite stop of the post-training trainers; the optimizer is the ``[optimizer]`` section.

    ``optimizer_defaults`` are the RL defaults (TRL's: constant rate 1e-4 without warm-up, betas (0.9, 0.99), no
    weight decay), applied under whatever the recipe's ``[optimizer]`` sets.
    """

    optimizer_defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-4,
        "min_lr": 1e-5,
        "warmup_steps": 0,
        "schedule": "constant",
        "betas": [0.9, 0.99],
        "weight_decay": 0.0,
    }

    device: str = Field("auto", description="torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1...")
    max_nonfinite: int = Field(
        5, ge=1, description="stop after this many optimizer steps in a row with a non-finite loss or gradient"
    )


class SamplingConfig(BaseConfig):
    """How completions are sampled from the policy (KV-cached, batched)."""

    max_completion_length: int = Field(48, ge=1, description="L: most tokens generated per completion (EOS included)")
    temperature: float = Field(1.0, ge=0, description="sampling temperature (R1-Zero: 1.0; 0 = greedy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (1 = off)")
    generation_batch_size: int = Field(
        256, ge=1, description="completions generated together in one batched KV-cached call (memory bound)"
    )


class EvalConfig(BaseConfig):
    """Greedy accuracy on the task's held-out test split, the rewards' means on the same completions, and the same
    figures over sampled completions (``eval/sampled_*``)."""

    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after the run)")
    eval_samples: int = Field(200, ge=0, description="distinct test problems per evaluation (0: no evaluation)")
    eval_sampled_k: int = Field(
        4,
        ge=0,
        description="completions sampled per test problem at eval_temperature for eval/sampled_accuracy, "
        "eval/sampled_<reward> and eval/pass@k (0: greedy only); an evaluation generates k + 1 completions per "
        "problem instead of 1 (eval_samples = 200, k = 4: 800 sampled ones besides the 200 greedy)",
    )
    eval_temperature: float = Field(
        1.0, gt=0, description="sampling temperature of the eval_sampled_k completions (R1 measures at 1.0)"
    )


class GRPOConfig(OptimConfig, SamplingConfig, EvalConfig):
    """Group Relative Policy Optimization (DeepSeekMath §4.1; R1-Zero and R1's RL stages)."""

    steps: int = Field(50, ge=1, description="rollout steps: each samples a batch, scores it and updates the policy")
    prompts_per_step: int = Field(
        16, ge=1, description="distinct prompts per rollout step (a multiple of the data-parallel ranks)"
    )
    num_generations: int = Field(8, ge=2, description="G: completions sampled per prompt (one group)")
    rollout_drafter: str | None = Field(
        None,
        description='speculative rollouts: the drafter a model component offers under this name (e.g. "mtp") '
        "proposes tokens and the policy verifies them, keeping exactly the sampling distribution; logs "
        "rollout/acceptance_rate and rollout/tokens_per_forward (one process only; unset: plain sampling)",
    )
    micro_batch_size: int = Field(
        64, ge=1, description="completions per forward/backward; a step accumulates all its micro-batches"
    )
    group_by_length: bool = Field(
        True,
        description="split each micro-batch's rows into groups of similar length, one forward/backward each, where "
        "that saves more padded token slots than length_group_overhead per extra pass (the update is unchanged)",
    )
    length_group_overhead: int = Field(
        512,
        ge=1,
        description="the fixed cost of one more forward/backward pass, in token slots, that group_by_length weighs",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="mu: optimizer updates per rollout batch; the old log-probs of the first pass are reused",
    )
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="aggregation of the token losses: grpo | bnpo | dr_grpo | dapo (see docs/post-training.md)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="divide the centred rewards by the group std, the batch std, or nothing (Dr. GRPO)"
    )
    epsilon: float = Field(0.2, gt=0, description="lower clip bound: rho >= 1 - epsilon")
    epsilon_high: float | None = Field(
        None, gt=0, description="upper clip bound 1 + epsilon_high (unset: epsilon; DAPO clip-higher: 0.28)"
    )
    delta: float | None = Field(
        None, gt=1, description="two-sided clip: cap the unclipped ratio at delta (INTELLECT-2)"
    )
    beta: float = Field(0.0, ge=0, description="k3 KL coefficient to the frozen reference (R1-Zero: 0.001)")
    ref_update_every: int = Field(
        0, ge=0, description="copy the policy into the reference every N steps (R1: 400; 0 = never)"
    )
    mask_truncated_completions: bool = Field(
        False, description="leave completions that hit max_completion_length out of the loss (DAPO overlong filter)"
    )
    reward_eps: float = Field(1e-4, gt=0, description="epsilon added to the std in the advantage")
    log_completions: int = Field(
        8, ge=0, description="sample completions written to completions/ in the run directory per logged step"
    )
    init_checkpoint: str | None = Field(
        None,
        description="weights the policy starts from when no previous stage gives them: a checkpoint directory (or a "
        "run: its latest) or 'stage:<name>' of this run",
    )
    rewards: Annotated[dict[str, ResolvedSlot], SlotMap("reward")] = SlotMapField(
        "reward", description="[trainer.rewards.<name>] tables: type defaults to the key; weight in each"
    )

    @model_validator(mode="after")
    def _check_rewards(self):
        if not self.rewards:
            raise ValueError("GRPO needs at least one reward: add a [trainer.rewards.accuracy] table")
        if self.loss_type == "dr_grpo" and self.max_completion_length < 1:
            raise ValueError("dr_grpo needs max_completion_length >= 1")
        return self


class SFTPhaseConfig(OptimConfig):
    """The supervised fine-tuning that follows trace generation (rejection sampling, sequence distillation)."""

    steps: int = Field(200, ge=0, description="optimizer steps of the SFT on the accepted traces (0: no SFT)")
    batch_size: int = Field(32, ge=1, description="rows per SFT optimizer step")
    seq_len: int = Field(128, ge=2, description="most tokens per SFT row (longer examples are truncated)")
    epochs_max: float = Field(
        0.0, ge=0, description="if > 0, cap the SFT steps at this many passes over the data (V3/R1: 2 epochs)"
    )
    eval_max_new_tokens: int = Field(64, ge=1, description="most tokens generated per test prompt in evaluation")


class TraceConfig(SamplingConfig):
    """How traces are drawn and filtered by reward."""

    num_prompts: int = Field(256, ge=1, description="training prompts to sample traces for")
    samples_per_prompt: int = Field(4, ge=1, description="N: completions sampled per prompt (best-of-N)")
    threshold: float = Field(
        1.0, description="keep a completion when its weighted reward sum is >= threshold (None rewards count 0)"
    )
    keep: Literal["all", "best"] = Field(
        "all",
        description="all: every accepted completion (RFT/STaR); best: only the highest-reward one per prompt (best-of-n)",
    )
    max_per_prompt: int = Field(0, ge=0, description="keep at most this many accepted completions per prompt (0: all)")
    dedupe: bool = Field(True, description="drop completions identical to one already kept for the same prompt")
    rewards: Annotated[dict[str, ResolvedSlot], SlotMap("reward")] = SlotMapField(
        "reward", description="[trainer.rewards.<name>] tables that judge each completion"
    )

    @model_validator(mode="after")
    def _needs_rewards(self):
        if not self.rewards:
            raise ValueError("rejection needs at least one reward: add a [trainer.rewards.accuracy] table")
        return self


class RejectionSamplingConfig(TraceConfig, SFTPhaseConfig, EvalConfig):
    """Rejection sampling + SFT (R1 stage 3): sample N per prompt, keep the accepted ones, fine-tune on them."""

    mix_task: Annotated[ResolvedSlot | None, Slot("task")] = SlotField(
        "task", default=None, description="a second task whose records are mixed into the SFT data (non-reasoning)"
    )
    mix_count: int = Field(0, ge=0, description="records of mix_task added to the SFT data")
    mix_files: list[str] = Field(
        default_factory=list, description="JSONL files of {prompt, completion} rows mixed into the SFT data"
    )
    init_checkpoint: str | None = Field(
        None,
        description="weights of the sampling policy when no previous stage gives them: a checkpoint directory (or a "
        "run: its latest) or 'stage:<name>' of this run",
    )
    sft_init: str | None = Field(
        None,
        description="weights the SFT starts from: unset = the sampling policy; a checkpoint or 'stage:<name>' "
        "(DeepSeek-R1 fine-tunes the base model, not the RL checkpoint: 'stage:pretrain')",
    )

    @model_validator(mode="after")
    def _check_mix(self):
        if self.mix_count and self.mix_task is None:
            raise ValueError("mix_count > 0 needs a [trainer.mix_task] table naming the task to mix in")
        return self


class DistillConfig(TraceConfig, SFTPhaseConfig, EvalConfig):
    """Distillation (R1 §2.4): a teacher checkpoint writes verified traces, the student ([model]) learns them."""

    teacher: str = Field(
        "",
        description="teacher checkpoint: a directory (dsk or HF format, or a run whose latest checkpoint is taken) or "
        "'stage:<name>' for an earlier stage of this run; `dsk distill --teacher` sets it",
    )
    student_init: str = Field(
        "previous",
        description="weights the student ([model]) starts from: 'previous' (the previous stage's, e.g. a student "
        "pre-training stage; a fresh init when there is none), 'fresh' (seeded init), a checkpoint or 'stage:<name>'",
    )
    mode: Literal["sequence", "logit"] = Field(
        "sequence",
        description="sequence: SFT on the teacher's accepted traces (R1-Distill); logit: also match the teacher's "
        "next-token distribution on them (forward KL)",
    )
    kd_weight: float = Field(
        1.0, ge=0, description="logit mode: weight of KL(teacher || student); the SFT loss keeps weight 1 - kd_weight"
    )
    kd_temperature: float = Field(1.0, gt=0, description="logit mode: softmax temperature of both distributions")
    teacher_eval: bool = Field(True, description="also measure the teacher's test accuracy for the summary")

    @model_validator(mode="after")
    def _check_kd(self):
        if not self.teacher:
            raise ValueError("distill needs a teacher: set trainer.teacher (or pass dsk distill --teacher CKPT)")
        if self.kd_weight > 1:
            raise ValueError(f"kd_weight = {self.kd_weight}: must be in [0, 1]")
        return self

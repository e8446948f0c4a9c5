"""Hook implementations of dsk_rl: registers the post-training trainers by lazy name (torch-free)."""

from dsk import hookimpl
from dsk_rl.config import DistillConfig, GRPOConfig, RejectionSamplingConfig


@hookimpl
def register_trainers(register):
    """Register the trainers (kind ``trainer``): ``grpo``, ``rejection_sampling`` and ``distill``."""
    register(
        "trainer",
        "grpo",
        "dsk_rl.grpo:GRPOTrainer",
        config=GRPOConfig,
        summary="GRPO: G sampled completions per prompt, group-relative advantages, clipped surrogate + k3 KL",
    )
    register(
        "trainer",
        "rejection_sampling",
        "dsk_rl.rejection:RejectionSamplingTrainer",
        config=RejectionSamplingConfig,
        summary="sample N per prompt, keep what the rewards accept (deduplicated, with provenance), then SFT",
    )
    register(
        "trainer",
        "distill",
        "dsk_rl.distill:DistillTrainer",
        config=DistillConfig,
        summary="a teacher checkpoint writes verified traces; the student learns them by SFT (+ optional logit KD)",
    )


@hookimpl
def register_commands(cli):
    """Add ``dsk distill`` (its module is torch-free; the run imports torch when it starts)."""
    from dsk_rl.cli import distill

    cli.add_command(distill)

"""Hook implementations of dsk_rewards: registers the built-in rewards by lazy name (torch-free)."""

from dsk import hookimpl
from dsk_rewards.config import AccuracyConfig, FormatConfig, LanguageConsistencyConfig, OverlongConfig, StepsConfig


@hookimpl
def register_rewards(register):
    """Register the rewards (kind ``reward``): accuracy, format, language_consistency, overlong, steps."""
    register(
        "reward",
        "accuracy",
        "dsk_rewards.rewards:accuracy",
        config=AccuracyConfig,
        summary="the task's checker on the completion: 1 if right, 0 if wrong, None without a reference answer",
    )
    register(
        "reward",
        "format",
        "dsk_rewards.rewards:format_reward",
        config=FormatConfig,
        summary="1 for exactly <think>…</think><answer>…</answer>, else 0",
    )
    register(
        "reward",
        "language_consistency",
        "dsk_rewards.rewards:language_consistency",
        config=LanguageConsistencyConfig,
        summary="share of chain-of-thought words in the prompt's target language (DeepSeek-R1)",
        aliases=("language",),
    )
    register(
        "reward",
        "overlong",
        "dsk_rewards.rewards:overlong",
        config=OverlongConfig,
        summary="DAPO soft overlong punishment: 0, then linearly to -1 over the last tokens before max_length",
        aliases=("length",),
    )
    register(
        "reward",
        "steps",
        "dsk_rewards.rewards:steps",
        config=StepsConfig,
        summary="process reward: share of the chain of thought's arithmetic steps that are right",
        aliases=("process",),
    )

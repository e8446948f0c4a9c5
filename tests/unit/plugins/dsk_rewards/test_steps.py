"""The process reward reads the built-in traces back, symbolic, spelled or mixed, and recomputes every step."""

import pytest
from dsk_rewards.config import StepsConfig
from dsk_rewards.rewards import steps
from dsk_rewards.steps import check_steps


@pytest.mark.parametrize(
    ("trace", "expected"),
    [
        ("7+5=12 4+8+1=13 0+3+1=4", (3, 3)),
        ("seven plus five is one two, four plus eight plus one is one three", (2, 2)),
        ("four plus one is six, eight plus five is one three", (1, 2)),  # right answer, wrong first step
        ("9+1=10, zero plus five plus one is six", (2, 2)),  # a mixed-language trace
        ("sieben plus fünf ist eins zwei", (1, 1)),
        ("siete más cinco es uno dos", (1, 1)),
        ("12*4=48 12*30=360 48+360=408", (3, 3)),
        ("23*7=161 161%11=7", (2, 2)),
        ("3-7=-4 -4%11=7", (2, 2)),  # modular subtraction: Python's residue
        ("trois moins sept égale moins quatre", (1, 1)),
        ("12/4=3 6/4=2", (1, 2)),  # exact rational division
        ("7+5=", (0, 1)),  # a step without its result
        ("garbage 7+", (0, 1)),
        ("", (0, 0)),
    ],
)
def test_check_steps_recomputes_every_step(trace, expected):
    assert check_steps(trace) == expected


def test_steps_reward_scores_the_think_block_only():
    completions = [
        "<think>7+5=12 4+8+1=13</think><answer>132</answer>",
        "<think>7+5=12 4+8+1=14</think><answer>142</answer>",
        "<answer>132</answer>",
        "<think>let me think</think><answer>1</answer>",
    ]
    assert steps(StepsConfig(), ["p"] * 4, completions) == [1.0, 0.5, None, None]  # no step to check: None
    assert steps(StepsConfig(all_or_nothing=True), ["p"] * 2, completions[:2]) == [1.0, 0.0]


def test_every_built_in_trace_checks_out():
    from dsk_tasks.arithmetic import ArithmeticTask
    from dsk_tasks.config import ArithmeticConfig, CountdownConfig, ModularConfig
    from dsk_tasks.countdown import CountdownTask
    from dsk_tasks.modular import ModularTask

    langs = {"languages": ["sym", "en", "fr", "de", "es"], "language_mix_rate": 0.5}
    tasks = [ArithmeticTask(ArithmeticConfig(**langs)), CountdownTask(CountdownConfig(**langs)),
             ModularTask(ModularConfig(**langs))]  # fmt: skip
    for task in tasks:
        records = [task.sample("train", i) for i in range(60)]
        scores = steps(StepsConfig(), [r["prompt"] for r in records], [r["completion"] for r in records])
        assert scores == [1.0] * len(records), (
            task.name,
            [r["completion"] for r, s in zip(records, scores, strict=True) if s != 1],
        )

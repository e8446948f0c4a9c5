"""Template of a ``reward`` plugin: an exact-answer reward that returns None where it cannot judge."""

SUMMARY = "exact-answer reward: the <answer> block against the record's answer, None without one"
MODULE = "reward"
TABLE = "[trainer.rewards.$comp]"
IMPL_NAME = "exact_answer"
CONTRACT = "`dsk.testing.contracts.data.check_reward`"

CONFIG = '''\
"""Options of the $comp reward: a [trainer.rewards.<name>] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Scores of a right and of a wrong (or missing) answer, and the reward's weight in the trainer's sum."""

    # every reward config has `weight`: the trainer optimises sum(weight * reward) over [trainer.rewards.*]
    weight: float = Field(1.0, description="weight of this reward in the weighted sum the trainer optimises")
    correct: float = Field(1.0, description="reward of a completion whose answer equals the reference")
    wrong: float = Field(0.0, description="reward of a wrong answer, or of a completion without one <answer> block")
    ignore_case: bool = Field(False, description="compare answers case-insensitively")
'''

IMPL = '''\
"""The $comp reward: is the completion's <answer> the record's answer?

Contract (docs/plugins.md, "reward"): called as `fn(config, prompts, completions, **columns)` with one
column value per completion (`answer` among them); returns one float per completion, or None where it
cannot judge (a record without a reference answer), which the trainers leave out of group statistics. It never
changes its inputs, and each completion is judged on its own. Change `judge` to make it yours.
"""

import re

from .config import $Config

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def judge(config: $Config, completion: str, reference) -> float | None:
    """The reward of one completion against its reference answer (None: no reference)."""
    if reference is None:
        return None
    found = _ANSWER.findall(completion)
    if len(found) != 1:
        return config.wrong
    got, want = found[0].strip(), str(reference).strip()
    if config.ignore_case:
        got, want = got.lower(), want.lower()
    return config.correct if got == want else config.wrong


def exact_answer(config: $Config, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
    """One value per completion: `correct` / `wrong`, None where the record has no `answer`."""
    answers = columns.get("answer")
    if not isinstance(answers, (list, tuple)) or len(answers) != len(completions):
        answers = [None] * len(completions)
    return [judge(config, text, ref) for text, ref in zip(completions, answers, strict=True)]
'''

TEST = '''\
"""$comp against dsk's reward contract suite (length, None handling, determinism, per-completion)."""

from dsk.testing.contracts.data import check_reward
from dsk.testing.contracts.model import check_config_round_trip, check_registration

from $pkg import plugin
from $pkg.config import $Config
from $pkg.reward import exact_answer

PROMPTS = ["1+1=", "2+2=", "3+3=", "name?"]
COMPLETIONS = ["<answer>2</answer>", "<think>4</think><answer>5</answer>", "6", "<answer>x</answer>"]
ANSWERS = ["2", "4", "6", None]


def test_meets_the_reward_contract():
    check_reward(
        exact_answer, $Config(), PROMPTS, COMPLETIONS, judged=[a is not None for a in ANSWERS], answer=ANSWERS
    )


def test_scores_right_wrong_and_unjudged():
    assert exact_answer($Config(wrong=-1.0), PROMPTS, COMPLETIONS, answer=ANSWERS) == [1.0, -1.0, -1.0, None]


def test_config_round_trip():
    check_config_round_trip($Config, {"correct": 2.0, "ignore_case": True})


def test_registered_as_reward():
    check_registration(plugin, "reward", "$comp")
'''

RECIPE = {
    "trainer": (
        'type = "grpo"\nsteps = 2\nprompts_per_step = 4\nnum_generations = 4\nmicro_batch_size = 16\n'
        "max_completion_length = 16\neval_samples = 4"
    ),
    "trainer.rewards.$comp": "weight = 1.0",
    "optimizer": "lr = 1e-3\nwarmup_steps = 0",
}

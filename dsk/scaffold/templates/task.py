"""Template of a ``task`` plugin: a seeded, verifiable toy task (reverse a string of digits)."""

SUMMARY = "reverse a string of digits: a seeded verifiable task with disjoint train and test splits"
MODULE = "task"
TABLE = "[data]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.data.check_task`"

CONFIG = '''\
"""Options of the $comp task: the [data] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field, model_validator


class $Config(BaseConfig):
    """Strings of min_len..max_len digits to write backwards."""

    seed: int = Field(0, description="seed of the record generator (the splits do not depend on it)")
    min_len: int = Field(2, ge=1, le=20, description="fewest digits of a problem")
    max_len: int = Field(4, ge=1, le=20, description="most digits of a problem")
    test_percent: int = Field(10, ge=1, le=90, description="percent of the problems (by a hash) in the test split")
    test_size: int = Field(100, ge=1, description="distinct test problems of records('test')")

    @model_validator(mode="after")
    def _lengths(self):
        if self.min_len > self.max_len:
            raise ValueError(f"min_len = {self.min_len} is larger than max_len = {self.max_len}")
        return self
'''

IMPL = '''\
"""The $comp task: write a string of digits backwards ("reverse 4821=" -> "<answer>1284</answer>").

Contract (docs/plugins.md, "task"): built as `$Class(config)`; `sample(split, i)` is a pure function of
(config, split, i) returning a JSON record {prompt, completion, answer, ...}; `records(split, n)`; train and test
never share a problem (a problem's split comes from a hash of its canonical key alone, never from the seed); and
`check(record, completion)` accepts the right answer, rejects a wrong one and never raises. Change `draw`, the
prompt and `check` to make it yours.
"""

import hashlib
import random
import re

from .config import $Config

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_MAX_DRAWS = 10_000


def stable_hash(text: str) -> int:
    """The same 64-bit hash in every process (Python's hash() of a str is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class $Class:
    """Seeded digit-reversal problems with disjoint splits and an exact-answer checker."""

    name = "$comp"

    def __init__(self, config: $Config | None = None):
        self.config = config if config is not None else $Config()

    def split_of(self, key: str) -> str:
        """The split of a problem, from a hash of its key alone."""
        return "test" if stable_hash(f"{self.name}|{key}") % 100 < self.config.test_percent else "train"

    def draw(self, rng: random.Random) -> str:
        """One random problem: its digits."""
        n = rng.randint(self.config.min_len, self.config.max_len)
        return "".join(rng.choice("0123456789") for _ in range(n))

    def sample(self, split: str, index: int) -> dict:
        """The record at `index` of `split` (draws until a problem of that split comes up)."""
        if split not in ("train", "test") or index < 0:
            raise ValueError(f"sample({split!r}, {index}): split must be 'train' or 'test', index >= 0")
        rng = random.Random(stable_hash(f"{self.name}|{self.config.seed}|{split}|{index}"))
        for _ in range(_MAX_DRAWS):
            digits = self.draw(rng)
            if self.split_of(digits) == split:
                break
        else:
            raise ValueError(f"{self.name}: no {split} problem in {_MAX_DRAWS} draws; widen min_len..max_len")
        answer = digits[::-1]
        return {
            "task": self.name,
            "split": split,
            "index": index,
            "key": digits,
            "prompt": f"reverse {digits}=",
            "completion": f"<answer>{answer}</answer>",
            "answer": answer,
        }

    def records(self, split: str, n: int | None = None) -> list[dict]:
        """`n` records: train is sample(0..n-1); test is `n` (default test_size) distinct problems."""
        if split == "train":
            if n is None:
                raise ValueError("records('train') needs n")
            return [self.sample("train", i) for i in range(n)]
        n = self.config.test_size if n is None else n
        out, seen, i = [], set(), 0
        while len(out) < n:
            if i >= 50 * n + 1000:
                raise ValueError(f"{self.name}: fewer than {n} distinct test problems; lower n or widen the lengths")
            record = self.sample(split, i)
            i += 1
            if record["key"] not in seen:
                seen.add(record["key"])
                out.append(record)
        return out

    def check(self, record: dict, completion: str) -> bool:
        """Whether the completion's single <answer> block holds the reference answer; False on anything else."""
        found = _ANSWER.findall(completion) if isinstance(completion, str) else []
        if len(found) != 1 or completion.count("<answer>") != 1:
            return False
        return found[0].strip() == str(record.get("answer", "")).strip()
'''

TEST = '''\
"""$comp against dsk's task contract suite (pure records, disjoint splits, a checker that never raises)."""

from dsk.testing.contracts.data import check_task
from dsk.testing.contracts.model import check_config_round_trip, check_registration

from $pkg import plugin
from $pkg.config import $Config
from $pkg.task import $Class


def test_meets_the_task_contract():
    check_task($Class($Config(seed=3)), n=120)


def test_answer_is_the_reversed_digits():
    record = $Class($Config()).sample("train", 0)
    assert record["answer"] == record["key"][::-1]
    assert $Class($Config()).check(record, f"<think>reverse</think><answer>{record['answer']}</answer>")


def test_config_round_trip():
    check_config_round_trip($Config, {"seed": 1, "min_len": 3, "max_len": 5})


def test_registered_as_task():
    check_registration(plugin, "task", "$comp")
'''

RECIPE = {
    "data": 'type = "$comp"\nmin_len = 2\nmax_len = 4\ntest_size = 20',
}

"""Modular arithmetic: residues in range, Python's % for negatives, reduced answers only."""

from .helpers import make


def test_answers_are_residues_of_the_drawn_problem():
    task = make("modular", modulus=13, max_operand=50)
    for record in task.records("train", 500):
        a, b, op = record["a"], record["b"], record["op"]
        value = a + b if op == "+" else a - b if op == "-" else a * b
        assert int(record["answer"]) == value % 13
        assert 0 <= int(record["answer"]) < 13
        assert record["prompt"] == f"({a}{op}{b})%13="


def test_subtraction_follows_python_modulo():
    task = make("modular", ops=["-"], modulus=11, max_operand=10)
    negative = next(r for r in task.records("train", 200) if r["a"] < r["b"])
    a, b = negative["a"], negative["b"]
    assert f"{a}-{b}={a - b} {a - b}%11=" in negative["completion"]
    assert int(negative["answer"]) == (a - b) % 11


def test_an_unreduced_answer_is_wrong():
    task = make("modular", modulus=11)
    record = task.sample("train", 0)
    assert not task.check(record, f"<answer>{int(record['answer']) + 11}</answer>")


def test_random_guessing_is_right_about_one_time_in_p():
    # The reason this task exists: a random policy gets reward, so GRPO groups have variance from step one.
    import random

    task = make("modular", modulus=7, trace=False)
    rng = random.Random(0)
    records = task.records("train", 2000)
    hits = sum(task.check(r, f"<answer>{rng.randrange(7)}</answer>") for r in records)
    assert abs(hits / len(records) - 1 / 7) < 0.03


def test_spelled_prompt():
    record = make("modular", languages=["de"]).sample("train", 0)
    assert record["prompt"].endswith("modulo 11 ist")

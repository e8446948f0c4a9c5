"""Pre-training on text (``task/jsonl`` ``{"text"}`` rows) reports the held-out loss and perplexity of its test split
at each evaluation: ``eval/loss``, the mean next-token cross-entropy over the test records' tokens, checked against
a float64 recomputation from the saved checkpoint, and ``eval/ppl`` = exp(``eval/loss``)."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest

from dsk.testing import run_dsk
from tests.unit.train.helpers import tiny_model

SEQ_LEN = 40
N_TEST = 12

RECIPE = (
    tiny_model(48)
    + """\
[data]
type = "jsonl"
path = "{root}/train.jsonl"
{test}

[trainer]
type = "pretrain"
steps = 10
batch_size = 8
seq_len = 40
eval_every = 5
eval_samples = 12

[optimizer]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 2

[logging]
progress = false
"""
)


def sentences() -> list[str]:
    """A learnable text: short sentences of one pattern over a small vocabulary, each once, in a fixed order."""
    subjects = ["the cat", "a dog", "the bird", "my friend", "the child", "an old man"]
    verbs = ["sees", "likes", "finds", "wants", "holds"]
    objects = ["the ball", "a red box", "the tree", "some bread", "the moon"]
    rows = [f"{s} {v} {o}." for s, v, o in itertools.product(subjects, verbs, objects)]
    random.Random(0).shuffle(rows)
    return rows


def write_rows(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A 10-step pre-training run on 138 train and 12 test sentences (evaluations at steps 5 and 10)."""
    root = tmp_path_factory.mktemp("heldout")
    texts = sentences()
    write_rows(root / "train.jsonl", texts[N_TEST:])
    write_rows(root / "test.jsonl", texts[:N_TEST])
    recipe = root / "text.toml"
    recipe.write_text(RECIPE.format(root=root, test=f'test_path = "{root}/test.jsonl"'), encoding="utf-8")
    result = run_dsk(["train", str(recipe), "--run-dir", str(root / "run"), "--json"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return json.loads(result.stdout), [r for r in rows if r["kind"] == "eval"], texts[:N_TEST]


def reference_loss(checkpoint: str, texts: list[str]) -> float:
    """Mean next-token cross-entropy of the checkpoint's model over the targets of ``texts``, in float64:
    ``[BOS] text [EOS]`` cut to SEQ_LEN tokens, every token but BOS a target, one text at a time (no padding)."""
    import torch

    from dsk.api.runtime import load_pretrained, load_tokenizer

    model = load_pretrained(checkpoint, dtype=torch.float64).eval()
    meta = json.loads((Path(checkpoint) / "config.json").read_text())
    tok = load_tokenizer(meta["tokenizer"])
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = ([tok.bos_id] + tok.encode(text) + [tok.eos_id])[:SEQ_LEN]
            logits = model(torch.tensor([ids])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits[:-1], dim=-1)  # position t-1 predicts token t
            total -= float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
            count += len(ids) - 1
    return total / count


def test_every_eval_row_has_a_finite_held_out_loss_and_its_perplexity(text_run):
    summary, evals, _ = text_run
    assert [r["step"] for r in evals] == [5, 10]
    for row in evals:
        assert math.isfinite(row["eval/loss"]) and row["eval/loss"] > 0
        assert row["eval/ppl"] == pytest.approx(math.exp(row["eval/loss"]), rel=1e-12)
        assert row["eval/samples"] == N_TEST
        assert "eval/accuracy" not in row  # text rows have nothing to prompt with
    stage = summary["stages"][0]
    assert stage["eval/loss"] == evals[-1]["eval/loss"] and stage["eval/ppl"] == evals[-1]["eval/ppl"]
    assert summary["eval/loss"] == evals[-1]["eval/loss"]


def test_the_held_out_loss_is_the_checkpoints_mean_token_cross_entropy_on_the_test_records(text_run):
    summary, evals, test_texts = text_run
    assert summary["checkpoint"].endswith("step-10")  # written after the final evaluation, same weights
    expected = reference_loss(summary["checkpoint"], test_texts)
    assert evals[-1]["eval/loss"] == pytest.approx(expected, abs=1e-4)
    tokens = sum(min(len(t) + 2, SEQ_LEN) - 1 for t in test_texts)  # char tokenizer: one token per character
    assert evals[-1]["eval/tokens"] == tokens


def test_the_held_out_loss_goes_down_on_a_learnable_text(text_run):
    _, evals, _ = text_run
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"] - 0.1


def test_text_without_a_test_split_says_so_once_and_reports_no_held_out_loss(tmp_path):
    write_rows(tmp_path / "train.jsonl", sentences())
    recipe = tmp_path / "text.toml"
    text = RECIPE.format(root=tmp_path, test="").replace("steps = 10", "steps = 2").replace("eval_every = 5", "")
    recipe.write_text(text, encoding="utf-8")
    result = run_dsk(["train", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert result.output.count("no test split") == 1 and "eval/loss" in result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and not any("eval/loss" in r for r in rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "eval/loss" not in summary["stages"][0]

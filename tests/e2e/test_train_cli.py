"""End-to-end ``dsk train`` / ``dsk eval`` through the CLI (in-process, CliRunner) on a tiny recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsk.testing import isolated_plugin_manager, run_dsk
from dsk.train.checkpoint import list_checkpoints, load_checkpoint
from dsk.train.metrics import read_metrics
from tests.unit.train.helpers import TINY_RECIPE, write_recipe


def dsk(*args):
    """Run ``dsk`` in-process with the built-in plugins only."""
    return run_dsk([str(a) for a in args], pm=isolated_plugin_manager())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short training run shared by the tests of this module: (recipe path, run dir, CliResult)."""
    tmp = tmp_path_factory.mktemp("train")
    recipe = write_recipe(tmp)
    run_dir = tmp / "run"
    result = dsk("train", recipe, "--run-dir", run_dir, "--json", "--set", "trainer.steps=16",
                 "--set", "trainer.eval_every=8")  # fmt: skip
    return recipe, run_dir, result


def test_train_exits_0_and_prints_the_summary_as_json(trained):
    _, run_dir, result = trained
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert summary == json.loads((run_dir / "summary.json").read_text())
    stage = summary["stages"][0]
    assert stage["step"] == 16 and stage["trainer"] == "pretrain"
    assert 0.0 <= summary["eval/accuracy"] <= 1.0
    assert summary["checkpoint"].endswith("step-16")


def test_the_loss_falls(trained):
    _, run_dir, _ = trained
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_metrics_rows_have_the_named_fields(trained):
    _, run_dir, _ = trained
    rows = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 17))
    for row in train:
        for key in ("step", "loss", "lr", "tokens_per_s", "grad_norm", "nonfinite_skipped", "moe/maxvio",
                    "moe/layer1/maxvio", "lm_loss", "mtp_loss"):  # fmt: skip
            assert key in row, key
        assert math.isfinite(row["loss"]) and row["nonfinite_skipped"] == 0
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16]
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in evals)


def test_run_directory_holds_resolved_recipe_and_checkpoints(trained):
    from dsk.recipe.load import tomllib

    _, run_dir, _ = trained
    resolved = tomllib.loads((run_dir / "resolved.toml").read_text())
    assert resolved["trainer"]["steps"] == 16 and resolved["trainer"]["type"] == "pretrain"
    assert resolved["model"]["ffn"]["router"]["type"] == "noaux_tc"
    assert [s for s, _ in list_checkpoints(run_dir)] == [12, 16]  # every = 4, keep = 2
    ckpt = load_checkpoint(run_dir)
    assert ckpt.step == 16
    assert {"rng", "data", "tokenizer", "model", "task"} <= set(ckpt.state)
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_eval_reads_the_checkpoint_alone(trained):
    _, run_dir, _ = trained
    result = dsk("eval", run_dir / "checkpoints" / "step-16", "--samples", "4", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["eval/samples"] == 4 and payload["task"]["type"] == "arithmetic"
    assert 0.0 <= payload["eval/accuracy"] <= 1.0


def test_eval_with_an_unknown_task_option_exits_2(trained):
    _, run_dir, _ = trained
    result = dsk("eval", run_dir, "--set", "max_digitz=3")
    assert result.exit_code == 2
    assert "unknown option 'max_digitz'" in result.output and "Traceback" not in result.output


def _eval_by_hand(ckpt, n: int, k: int, temperature: float, budget: int) -> dict:
    """What ``dsk eval --samples n --pass-k k`` reports, computed without it: the checkpoint loaded, each test
    record generated alone (greedy, and k samples from the record's own generator), the task's checker and the
    built-in reward functions called directly on the completions."""
    from dsk_rewards.config import FormatConfig, LanguageConsistencyConfig
    from dsk_rewards.rewards import format_reward, language_consistency
    from dsk_tasks.arithmetic import ArithmeticTask
    from dsk_tasks.config import ArithmeticConfig

    from dsk.data.tokenizers import load_tokenizer
    from dsk.model.generate import generate
    from dsk.model.hf import load_pretrained
    from dsk.testing import builtin_registry
    from dsk.train.evaluate import _record_generator, test_records

    config = json.loads((ckpt / "config.json").read_text())
    tokenizer = load_tokenizer(config["tokenizer"])
    model = load_pretrained(ckpt, registry=builtin_registry())
    task_table = {k: v for k, v in config["task"].items() if k != "type"}
    task = ArithmeticTask(ArithmeticConfig(**task_table))
    records = test_records(task, n)
    greedy, sampled = [], []
    for i, record in enumerate(records):
        prompt = [tokenizer.bos_id, *tokenizer.encode(record["prompt"])]
        kw = {"eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id}
        greedy += [(record, tokenizer.decode(generate(model, [prompt], budget, temperature=0.0, **kw).tokens[0]))]
        gen = [_record_generator(torch.device("cpu"), 0, i)]
        out = generate(model, [prompt] * k, budget, temperature=temperature, generator=gen, **kw)
        sampled += [(record, tokenizer.decode(t)) for t in out.tokens]

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    expected = {}
    for prefix, rows in (("", greedy), ("sampled_", sampled)):
        prompts, texts = [r["prompt"] for r, _ in rows], [t for _, t in rows]
        languages = [r["language"] for r, _ in rows]
        expected[f"eval/{prefix}accuracy"] = mean([float(task.check(r, t)) for r, t in rows])
        expected[f"eval/{prefix}format"] = mean(format_reward(FormatConfig(), prompts, texts))
        expected[f"eval/{prefix}language_consistency"] = mean(
            language_consistency(LanguageConsistencyConfig(), prompts, texts, language=languages)
        )
    return expected


def test_eval_reports_the_rewards_of_the_greedy_and_of_the_sampled_completions(trained):
    _, run_dir, _ = trained
    ckpt = run_dir / "checkpoints" / "step-16"
    result = dsk("eval", ckpt, "--samples", "4", "--pass-k", "3", "--temperature", "1", "--max-new-tokens", "12",
                 "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["rewards"] == ["format", "language_consistency"]  # what the arithmetic task declares
    assert payload["pass_k"] == 3 and payload["temperature"] == 1.0
    expected = _eval_by_hand(ckpt, 4, 3, 1.0, 12)
    for key, value in expected.items():
        assert (payload[key] is None) == (value is None), key
        if value is not None:
            assert payload[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert payload["eval/sampled_language_consistency"] is not None  # some samples reason in <think>
    assert 0.0 <= payload["eval/pass@3"] <= 1.0


def test_eval_without_pass_k_has_no_sampled_keys_and_reward_picks_the_rewards(trained):
    _, run_dir, _ = trained
    result = dsk("eval", run_dir, "--samples", "4", "--max-new-tokens", "12", "--reward", "format", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["rewards"] == ["format"] and "eval/format" in payload
    assert "eval/language_consistency" not in payload
    assert not [key for key in payload if "sampled" in key or "pass@" in key]
    text = dsk("eval", run_dir, "--samples", "4", "--max-new-tokens", "12", "--pass-k", "2")
    assert text.exit_code == 0, text.output
    for column in ("greedy accuracy", "format", "pass@2", "sampled accuracy", "sampled format"):
        assert column in text.stdout, (column, text.stdout)


def test_eval_with_an_unknown_reward_exits_2_naming_it(trained):
    _, run_dir, _ = trained
    result = dsk("eval", run_dir, "--samples", "2", "--reward", "format", "--reward", "fromat_typo")
    assert result.exit_code == 2
    assert "--reward fromat_typo" in result.output and "unknown reward 'fromat_typo'" in result.output
    assert "available rewards: accuracy, format" in result.output and "Traceback" not in result.output


def test_a_used_run_dir_is_refused_without_resume_and_left_untouched(trained):
    recipe, run_dir, _ = trained
    before = (run_dir / "metrics.jsonl").read_text()
    result = dsk("train", recipe, "--run-dir", run_dir, "--set", "trainer.steps=16", "--set", "trainer.eval_every=8")
    assert result.exit_code == 2
    assert "already holds a run" in result.output and "--resume" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_resume_with_another_recipe_is_refused(trained):
    recipe, run_dir, _ = trained
    result = dsk("train", recipe, "--run-dir", run_dir, "--resume", "--set", "trainer.steps=20")
    assert result.exit_code == 2 and "different recipe" in result.output


def test_resume_of_a_completed_run_changes_nothing(trained):
    recipe, run_dir, _ = trained
    before = (run_dir / "metrics.jsonl").read_text()
    result = dsk("train", recipe, "--run-dir", run_dir, "--resume", "--set", "trainer.steps=16",
                 "--set", "trainer.eval_every=8")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "already completed" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == before


def test_bad_recipe_exits_2_with_key_path_and_no_traceback(tmp_path):
    recipe = write_recipe(tmp_path)
    result = dsk("train", recipe, "--set", "trainer.stepz=3", "--run-dir", tmp_path / "run")
    assert result.exit_code == 2
    assert "trainer.stepz" in result.output and "did you mean 'steps'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "run").exists()


def test_resume_needs_a_run_dir(tmp_path):
    result = dsk("train", write_recipe(tmp_path), "--resume")
    assert result.exit_code == 2 and "--resume needs --run-dir" in result.output


def test_dry_run_writes_nothing(tmp_path):
    result = dsk("train", write_recipe(tmp_path), "--run-dir", tmp_path / "run", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stages"][0]["trainer"] == "pretrain"
    assert not (tmp_path / "run").exists()


def test_non_finite_losses_are_skipped_counted_and_stop_the_run_with_a_good_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "run"
    result = dsk(
        "train", recipe, "--run-dir", run_dir, "--set", "trainer.debug_nonfinite_steps=[2, 4, 5, 6]",
        "--set", "trainer.max_nonfinite=3", "--set", "checkpoint.every=3", "--set", "checkpoint.keep=5",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "non-finite for 3 optimizer steps in a row" in result.output and "steps 4-6" in result.output
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped"] for r in rows] == [False, True, False, True, True, True]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 1, 2, 3, 4]
    assert rows[1]["loss"] is None  # NaN is written as null
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    last = load_checkpoint(run_dir)
    assert last.step == 6 and last.state["reason"] == "nonfinite"
    good = load_checkpoint(run_dir / "checkpoints" / "step-3")
    for name, tensor in last.model_state.items():  # steps 4-6 were skipped: the weights are those of step 3
        assert torch.isfinite(tensor).all() and torch.equal(tensor, good.model_state[name]), name


STAGES = (
    TINY_RECIPE
    + """
[[stages]]
name = "pretrain"

[[stages]]
name = "sft"
[stages.trainer]
type = "sft"
steps = 4
batch_size = 8
seq_len = 40
eval_samples = 4
[stages.optimizer]
lr = 1e-3
warmup_steps = 0
"""
)


def test_stages_run_in_order_each_from_the_previous_checkpoint(tmp_path):
    recipe = write_recipe(tmp_path, STAGES.replace("steps = 12", "steps = 8"))
    run_dir = tmp_path / "run"
    result = dsk("train", recipe, "--run-dir", run_dir, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [(s["stage"], s["trainer"], s["status"]) for s in summary["stages"]] == [
        ("pretrain", "pretrain", "completed"), ("sft", "sft", "completed"),
    ]  # fmt: skip
    pre = [r for r in read_metrics(run_dir / "stages" / "pretrain" / "metrics.jsonl") if r["kind"] == "train"]
    sft = [r for r in read_metrics(run_dir / "stages" / "sft" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(pre) == 8 and len(sft) == 4 and all(r["stage"] == "sft" for r in sft)
    # the SFT stage starts from the pre-trained weights: its first loss is far below a fresh model's
    assert sft[0]["lm_loss"] < 0.8 * pre[0]["lm_loss"]
    assert load_checkpoint(run_dir / "stages" / "sft").state["trainer"] == "sft"


def test_a_later_stage_alone_needs_the_previous_one(tmp_path):
    recipe = write_recipe(tmp_path, STAGES)
    result = dsk("train", recipe, "--run-dir", tmp_path / "run", "--stage", "sft")
    assert result.exit_code == 2 and "has not completed" in result.output
    result = dsk("train", recipe, "--run-dir", tmp_path / "run2", "--stage", "rl")
    assert result.exit_code == 2 and "no such stage" in result.output


def test_resume_on_a_directory_without_a_run_starts_one(tmp_path):
    result = dsk("train", write_recipe(tmp_path), "--run-dir", tmp_path / "run", "--resume", "--set", "trainer.steps=2")
    assert result.exit_code == 0, result.output
    assert "holds no run yet; starting a new one" in result.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"

"""Post-training through the CLI on tiny models: GRPO, rejection sampling + SFT, distillation.

One tiny base model is pre-trained once for the module (modular arithmetic, answers in ``<answer>`` tags); the
tests then run the post-training trainers on top of it with ``dsk train`` / ``dsk distill``, in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsk.testing import run_dsk
from tests.unit.train.helpers import tiny_model

pytestmark = [pytest.mark.xdist_group("post_training")]

MODEL = (
    tiny_model(32)
    + """\
[data]
type = "modular"
modulus = 5
max_operand = 9
ops = ["+"]
trace = false
test_size = 5

[logging]
progress = false
"""
)

BASE = """\
[dsk]
extends = ["model.toml"]

[trainer]
type = "pretrain"
steps = 60
batch_size = 32
seq_len = 24
eval_samples = 0

[optimizer]
lr = 1e-2
min_lr = 1e-3
warmup_steps = 5
"""

# Six fixed training prompts (a JSONL task), so "the reward on its training prompts" is measured on the same prompts
PROMPTS = [(1, 1), (4, 4), (2, 4), (3, 0), (0, 2), (3, 4)]

GRPO = """\
[dsk]
extends = ["model.toml"]

[data]
type = "jsonl"
path = "{root}/prompts.jsonl"

[trainer]
type = "grpo"
steps = 30
prompts_per_step = 16
num_generations = 8
max_completion_length = 6
eval_samples = 0
log_completions = 4
init_checkpoint = "{base}"

[optimizer]
lr = 5e-3
warmup_steps = 3

[trainer.rewards.accuracy]
[trainer.rewards.format]
require_think = false
weight = 0.2
"""

REJECTION = """\
[dsk]
extends = ["model.toml"]

[trainer]
type = "rejection_sampling"
num_prompts = 24
samples_per_prompt = 6
max_completion_length = 6
threshold = 1.0
steps = 8
batch_size = 16
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6
init_checkpoint = "{base}"
mix_count = 5

[optimizer]
lr = 1e-3

[trainer.mix_task]
type = "modular"
modulus = 7
trace = false

[trainer.rewards.accuracy]
"""

STUDENT = """\
[dsk]
extends = ["model.toml"]

[model]
dim = 16
n_layers = 1
first_k_dense = 1
tie_embeddings = true

[model.attention]
type = "mla"
n_heads = 1
q_lora_rank = 8
kv_lora_rank = 8
qk_nope_head_dim = 4
qk_rope_head_dim = 4
v_head_dim = 4

[model.dense_ffn]
type = "dense"
hidden_dim = 16

[trainer]
type = "distill"
num_prompts = 24
samples_per_prompt = 4
max_completion_length = 6
threshold = 1.0
steps = 10
batch_size = 16
seq_len = 24
eval_samples = 5
eval_max_new_tokens = 6

[optimizer]
lr = 1e-2

[trainer.rewards.accuracy]
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def summary_of(result) -> dict:
    assert result.exit_code == 0, result.output + repr(result.exception)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A directory with model.toml and a pre-trained base checkpoint (trained once for the module)."""
    root = tmp_path_factory.mktemp("post_training")
    write(root, "model.toml", MODEL)
    rows = [{"prompt": f"({a}+{b})%5=", "completion": f"<answer>{(a + b) % 5}</answer>", "answer": str((a + b) % 5)}
            for a, b in PROMPTS]  # fmt: skip
    write(root, "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = summary_of(
        run_dsk(["train", str(write(root, "base.toml", BASE)), "--run-dir", str(root / "base"), "--json"])
    )
    return root, Path(summary["checkpoint"])


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_grpo_through_the_cli_raises_the_reward_on_its_prompts_and_changes_every_trained_parameter(workspace):
    root, base = workspace
    recipe = write(root, "grpo.toml", GRPO.format(base=base, root=root))
    summary = summary_of(run_dsk(["train", str(recipe), "--run-dir", str(root / "grpo"), "--json"]))
    stage = summary["stages"][0]
    assert stage["trainer"] == "grpo" and stage["step"] == 30
    rows = [json.loads(line) for line in (root / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    accuracy = [r["rewards/accuracy/mean"] for r in train]
    assert sum(accuracy[-5:]) / 5 > accuracy[0] + 0.15, accuracy
    for key in ("frac_reward_zero_std", "clip_ratio/region_mean", "entropy", "completions/clipped_ratio",
                "rewards/format/mean", "rewards/format/std", "completions/mean_length"):  # fmt: skip
        assert key in train[-1], key
    before, after = tensors(base), tensors(Path(stage["checkpoint"]))
    trained = [k for k in before if not k.startswith("mtp.") and before[k].is_floating_point()]
    unchanged = [k for k in trained if (before[k] == after[k]).all()]
    assert trained and not unchanged, unchanged
    assert all((before[k] == after[k]).all() for k in before if k.startswith("mtp."))  # MTP heads are frozen in RL
    table = (root / "grpo" / "completions" / "step-000030.jsonl").read_text().splitlines()
    assert len(table) == 4 and {"prompt", "completion", "rewards", "advantage"} <= set(json.loads(table[0]))


def test_rejection_sampling_keeps_only_accepted_unique_traces_with_provenance_then_fine_tunes(workspace):
    root, base = workspace
    recipe = write(root, "rejection.toml", REJECTION.format(base=base))
    summary = summary_of(run_dsk(["train", str(recipe), "--run-dir", str(root / "rs"), "--json"]))
    stage = summary["stages"][0]
    assert stage["trainer"] == "rejection_sampling" and stage["step"] == 8 and "eval/accuracy" in stage
    rows = [json.loads(line) for line in (root / "rs" / "traces.jsonl").read_text().splitlines()]
    sampled = [r for r in rows if r["origin"] == "rejection_sampling"]
    mixed = [r for r in rows if r["origin"] == "mix:modular"]
    assert sampled and len(mixed) == 5
    assert stage["traces/kept"] == len(sampled) <= stage["traces/accepted"] <= stage["traces/sampled"] == 24 * 6
    pairs = [(r["prompt_id"], r["completion"]) for r in sampled]
    assert len(pairs) == len(set(pairs))  # no duplicate completion of a prompt
    for r in sampled:
        assert r["rewards"] == {"accuracy": 1.0} and r["reward"] == 1.0
        assert r["completion"] == f"<answer>{r['answer']}</answer>"  # accepted = the task's checker says right
        assert r["source"] == str(base) and isinstance(r["sample_index"], int) and r["prompt_id"].startswith("train/")
    assert (root / "rs" / "checkpoints" / "step-8" / "model.safetensors").is_file()


def test_distill_trains_a_smaller_student_on_verified_teacher_traces(workspace):
    root, base = workspace
    recipe = write(root, "student.toml", STUDENT)
    summary = summary_of(
        run_dsk(
            [
                "distill",
                str(recipe),
                "--teacher",
                str(base),
                "--unset",
                "model.mtp",
                "--run-dir",
                str(root / "distill"),
                "--json",
            ]
        )  # fmt: skip
    )
    stage = summary["stages"][0]
    assert stage["trainer"] == "distill" and stage["mode"] == "sequence" and stage["traces"] > 0
    assert stage["student/parameters"] * 4 <= stage["teacher/parameters"]
    assert "eval/accuracy" in stage and "teacher/eval/accuracy" in stage
    logit = summary_of(
        run_dsk(
            [
                "distill",
                str(recipe),
                "--teacher",
                str(base),
                "--run-dir",
                str(root / "distill-logit"),
                "--set",
                "trainer.mode=logit",
                "--set",
                "trainer.kd_weight=0.5",
                "--json",
            ]
        )  # fmt: skip
    )
    rows = [json.loads(line) for line in (root / "distill-logit" / "metrics.jsonl").read_text().splitlines()]
    kd = [r["kd_loss"] for r in rows if r["kind"] == "train"]
    assert len(kd) == 10 and kd[-1] < kd[0]  # the student moves towards the teacher's distribution
    assert logit["stages"][0]["mode"] == "logit"


def test_distill_refuses_a_recipe_without_a_distill_trainer(workspace):
    root, _ = workspace
    result = run_dsk(["distill", str(root / "base.toml")])
    assert result.exit_code == 2 and "distill" in result.stderr


def test_distill_teacher_option_reaches_every_distill_stage(workspace):
    root, base = workspace
    text = STUDENT.replace('[trainer]\ntype = "distill"', '[[stages]]\nname = "kd"\n[stages.trainer]\ntype = "distill"')
    staged = write(root, "staged.toml", text.replace("[trainer.rewards.accuracy]", "[stages.trainer.rewards.accuracy]"))
    result = run_dsk(["distill", str(staged), "--teacher", str(base), "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = result.stdout[result.stdout.index("[[stages]]") :]  # the resolved recipe, stages last
    assert f'teacher = "{base}"' in resolved

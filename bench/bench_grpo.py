"""One GRPO step (generation + rewards + loss + update): dsk's ``grpo`` trainer vs TRL's ``GRPOTrainer``.

Both sides train the same model from the same weights: dsk's tiny DeepSeek-V3 (MLA + DeepSeekMoE with noaux_tc +
MTP, the shape of ``recipes/base/tiny-dsv3.toml``, ~0.3M parameters), first pre-trained briefly on 2-digit additions
with ``dsk train`` so that it writes well-formed, EOS-terminated completions that are sometimes right (GRPO is always
run on a pre-trained or SFT model; from random weights every reward is 0 and neither side would learn anything).
TRL loads the same checkpoint as the identical HF ``DeepseekV3ForCausalLM`` (written by ``dsk.model.hf.save_hf``;
nothing is downloaded), with the dsk char tokenizer rebuilt as a ``PreTrainedTokenizerFast`` (same ids, BOS added).

Same prompts (2-digit additions), group size G, prompts per step, completion budget L, temperature 1, the same
accuracy reward (the task's checker), ``loss_type = "dapo"``, beta = 0, one update per generation batch, AdamW
(lr 1e-4, betas (0.9, 0.99), no weight decay, clip 1.0), float32 on CPU, no gradient checkpointing.

What dsk does differently: batched KV-cached sampling with MLA's compressed cache, one forward over prompt +
completion for the loss, and completions whose advantage is exactly 0 (groups whose rewards are all equal, logged
as ``frac_reward_zero_std``) are left out of the forward and backward, which leaves the update unchanged (the
normalisers still count them; see docs/post-training.md). TRL computes them.

Timing: per-step wall time (median over the timed steps, after warm-up); dsk runs before and after the peer and
its steps are pooled, so drifting load from other processes hits both sides, in the default row and in the row that
computes every completion alike. ``ratio = peer / dsk``.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

TARGET = ">= 2x"

MODEL = {
    "dim": 64,
    "n_layers": 3,
    "first_k_dense": 1,
    "max_seq_len": 96,
    "attention": {
        "type": "mla",
        "n_heads": 4,
        "q_lora_rank": 32,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
    },  # fmt: skip
    "dense_ffn": {"type": "dense", "hidden_dim": 192},
    "ffn": {
        "type": "moe",
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "expert_hidden_dim": 32,
        "router": {"type": "noaux_tc", "top_k": 2, "n_groups": 2, "topk_groups": 1},
    },  # fmt: skip
    "mtp": {"type": "mtp", "depth": 1},
}
DATA = {"type": "arithmetic", "min_digits": 2, "max_digits": 2, "ops": ["+"]}


def _settings(quick: bool) -> dict[str, int]:
    if quick:
        return {"prompts": 4, "G": 4, "L": 32, "steps": 3, "warmup": 1, "pretrain": 60}
    return {"prompts": 16, "G": 8, "L": 32, "steps": 8, "warmup": 2, "pretrain": 250}


def _pretrain(tmp: Path, s: dict[str, int]) -> Path:
    """A briefly pre-trained checkpoint (``dsk train``, in-process)."""
    import tomli_w

    from dsk.testing import run_dsk

    recipe = {
        "dsk": {"seed": 0},
        "model": copy.deepcopy(MODEL),
        "data": dict(DATA),
        "trainer": {
            "type": "pretrain",
            "steps": s["pretrain"],
            "batch_size": 64,
            "seq_len": 40,
            "eval_samples": 0,
            "device": "cpu",
        },  # fmt: skip
        "optimizer": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
        "logging": {"progress": False},
    }
    path = tmp / "pretrain.toml"
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    result = run_dsk(["train", str(path), "--run-dir", str(tmp / "pretrain"), "--json"])
    if result.exit_code != 0:
        raise RuntimeError(f"pre-training for the benchmark failed: {result.output}")
    return Path(json.loads(result.stdout)["checkpoint"])


def _grpo_table(s: dict[str, int], init: Path) -> dict[str, Any]:
    return {
        "dsk": {"seed": 0},
        "model": copy.deepcopy(MODEL),
        "data": dict(DATA),
        "trainer": {
            "type": "grpo",
            "steps": 1000,
            "prompts_per_step": s["prompts"],
            "num_generations": s["G"],
            "max_completion_length": s["L"],
            "micro_batch_size": s["prompts"] * s["G"],
            "generation_batch_size": s["prompts"] * s["G"],
            "loss_type": "dapo",
            "beta": 0.0,
            "eval_samples": 0,
            "log_completions": 0,
            "device": "cpu",
            "init_checkpoint": str(init),
            "rewards": {"accuracy": {}},
        },  # fmt: skip
        "optimizer": {"lr": 1e-4, "betas": [0.9, 0.99], "grad_clip": 1.0},
        "logging": {"progress": False},
    }


class _Quiet:
    is_terminal = False

    def print(self, *args: Any, **kwargs: Any) -> None:
        pass


def _dsk_run(tmp: Path, table: dict[str, Any]):
    """A set-up GRPO run of dsk (the trainer's own step function, no CLI around it)."""
    from dsk_rl.grpo import _GRPORun

    from dsk.plugins import make_plugin_manager
    from dsk.recipe import Recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.train.context import RunContext
    from dsk.train.metrics import MetricsWriter
    from dsk.train.progress import Reporter

    pm = make_plugin_manager(allow={"dsk"})
    registry = build_registry(pm)
    result = validate_recipe(Recipe(data=table), registry, check=True)
    ctx = RunContext(
        run_dir=tmp / "dsk", sections=result.resolved, registry=registry, pm=pm,
        metrics=MetricsWriter(tmp / "dsk" / "metrics.jsonl"), reporter=Reporter(_Quiet(), enabled=False), seed=0,
    )  # fmt: skip
    run = _GRPORun(result.resolved["trainer"].build(), ctx)
    run.setup()
    return run, registry


def _time_dsk(run: Any, registry: Any, n: int) -> tuple[list[float], list[dict[str, Any]]]:
    """Step times and metrics rows of ``n`` steps."""
    times, rows = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        rows.append(run.train_step())
        times.append(time.perf_counter() - t0)
    return times, rows


def _rollout_share(rows: list[dict[str, Any]]) -> float:
    """The generation's share of the step time (``generate_s / step_s``) over ``rows``."""
    return sum(r["generate_s"] for r in rows) / sum(r["step_s"] for r in rows)


def _time_dsk_all_rows(run: Any, registry: Any, n: int) -> tuple[list[float], list[dict[str, Any]]]:
    """Step times with every completion forwarded (zero advantages nudged to 1e-3, so none is left out): what
    dsk's step costs without the zero-signal shortcut, for an honest split of the ratio.

    The nudge is a normal float on purpose: at 1e-30 the gradients of those rows are denormal, and CPU arithmetic on
    denormals is ~10-100x slower, which doubled this row's time (measured: 0.37-0.45 s against 0.20 s) for a cost no
    real run has. The update itself is not compared, only its time."""
    import dsk_rl.grpo as grpo

    original = grpo.group_advantages

    def nudged(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        out.advantages = torch.where(out.advantages == 0, torch.full_like(out.advantages, 1e-3), out.advantages)
        return out

    grpo.group_advantages = nudged
    try:
        return _time_dsk(run, registry, n)
    finally:
        grpo.group_advantages = original


def _hf_tokenizer(dsk_tokenizer: Any):
    """The dsk char tokenizer as a ``PreTrainedTokenizerFast``: same ids, one token per character or markup tag,
    ``<bos>`` prepended (as dsk encodes prompts), decoded without separators."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for i in range(dsk_tokenizer.vocab_size):
        vocab.setdefault(dsk_tokenizer.decode([i], skip_special=False), i)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>" if "<unk>" in vocab else None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )
    # the markup tags stay ordinary tokens: decoding with skip_special_tokens (as TRL does) must keep them
    return hf


def _time_trl(model: Any, tokenizer: Any, task: Any, s: dict[str, int], tmp: Path) -> tuple[list[float], float]:
    """Step times of TRL's GRPOTrainer and its mean frac_reward_zero_std."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    records = [task.sample("train", i) for i in range(s["prompts"] * (s["steps"] + s["warmup"] + 2))]
    by_prompt = {r["prompt"]: r for r in records}
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in records])

    def accuracy(prompts, completions, **kwargs):
        return [1.0 if task.check(by_prompt[p], c) else 0.0 for p, c in zip(prompts, completions, strict=True)]

    stamps: list[float] = []
    zero_std: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "frac_reward_zero_std" in logs:
                zero_std.append(float(logs["frac_reward_zero_std"]))

    config = GRPOConfig(
        output_dir=str(tmp / "trl"), per_device_train_batch_size=s["prompts"] * s["G"], num_generations=s["G"],
        steps_per_generation=1, gradient_accumulation_steps=1, max_completion_length=s["L"], temperature=1.0,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.99,
        max_grad_norm=1.0, beta=0.0, loss_type="dapo", num_iterations=1, max_steps=s["steps"] + s["warmup"],
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, seed=0, log_completions=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=[accuracy], args=config, train_dataset=dataset, processing_class=tokenizer,
        callbacks=[Stamp()],
    )  # fmt: skip
    trainer.train()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return steps[s["warmup"] :], (sum(zero_std) / len(zero_std) if zero_std else float("nan"))


def run(quick: bool = False) -> list[dict[str, Any]]:
    """One row: a GRPO step of dsk against TRL on the same DeepSeek-V3 weights (see the module doc)."""
    import logging

    from transformers import DeepseekV3ForCausalLM
    from transformers.utils import logging as hf_logging

    from dsk.model.hf import save_hf

    hf_logging.set_verbosity_error()  # the MTP layer HF does not model is reported as unexpected keys
    logging.getLogger("transformers").setLevel(logging.ERROR)
    s = _settings(quick)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        init = _pretrain(tmp, s)
        run_, registry = _dsk_run(tmp, _grpo_table(s, init))
        n_params = sum(p.numel() for p in run_.model.parameters())
        hf_dir = save_hf(run_.model, tmp / "hf")  # the weights GRPO starts from, before any dsk step
        peer_model = DeepseekV3ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
        tokenizer = _hf_tokenizer(run_.tokenizer)
        dsk_times, default_rows = _time_dsk(run_, registry, s["warmup"] + s["steps"])
        dsk_times, default_rows = dsk_times[s["warmup"] :], default_rows[s["warmup"] :]
        all_rows, full_rows = _time_dsk_all_rows(run_, registry, s["steps"])
        peer_times, peer_zero = _time_trl(peer_model, tokenizer, run_.task, s, tmp / "trl")
        more_times, more_rows = _time_dsk(run_, registry, s["steps"])
        dsk_times, default_rows = dsk_times + more_times, default_rows + more_rows
        more_times, more_rows = _time_dsk_all_rows(run_, registry, s["steps"])
        all_rows, full_rows = all_rows + more_times, full_rows + more_rows
        # speculative rollouts (trainer.rollout_drafter = "mtp"): the MTP head drafts, the policy verifies, the
        # completions keep exactly plain sampling's distribution; from the same starting weights
        spec_table = _grpo_table(s, init)
        spec_table["trainer"]["rollout_drafter"] = "mtp"
        spec_run, _ = _dsk_run(tmp / "spec", spec_table)
        _time_dsk(spec_run, registry, s["warmup"])
        spec_times, spec_rows = _time_dsk(spec_run, registry, s["steps"])
    dsk, peer, full = statistics.median(dsk_times), statistics.median(peer_times), statistics.median(all_rows)
    spec = statistics.median(spec_times)
    settings = f"{s['prompts']} prompts x G={s['G']}, L={s['L']}, {n_params:,} params, fp32 CPU"
    dsk_zero = statistics.mean(r["frac_reward_zero_std"] for r in default_rows)
    zero = f"frac_reward_zero_std dsk {dsk_zero:.2f} / trl {peer_zero:.2f}"
    accept = statistics.mean(r["rollout/acceptance_rate"] or 0.0 for r in spec_rows)
    per_forward = statistics.mean(r["rollout/tokens_per_forward"] or 0.0 for r in spec_rows)
    return [
        {"bench": "grpo", "case": f"step_vs_trl ({settings}; {zero}; rollout {_rollout_share(default_rows):.0%} of "
         "the step)", "dsk": dsk, "peer": peer, "ratio": peer / dsk, "target": TARGET, "unit": "s/step"},
        {"bench": "grpo", "case": f"step_vs_trl_every_row_computed ({settings}; rollout {_rollout_share(full_rows):.0%} of the "
         "step)", "dsk": full, "peer": peer, "ratio": peer / full, "target": "info", "unit": "s/step"},
        {"bench": "grpo", "case": f"step_vs_trl_speculative_rollouts (rollout_drafter = mtp; acceptance "
         f"{accept:.2f}, {per_forward:.2f} tokens per forward; rollout {_rollout_share(spec_rows):.0%} of the step)",
         "dsk": spec, "peer": peer, "ratio": peer / spec, "target": "info", "unit": "s/step"},
    ]  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    import sys

    for row in run(quick="--quick" in sys.argv):
        print(row)

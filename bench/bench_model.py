"""Whole-model training step vs HF transformers, and MTP speculative decoding vs plain greedy decoding.

Rows:
* ``train_step``: one optimizer step (forward with labels, backward, AdamW step) of a small DeepSeek-V3-style model
  (MLA + DeepSeekMoE with noaux_tc group-limited routing, one dense layer first), float32, CPU. ``peer`` =
  ``transformers.DeepseekV3ForCausalLM`` with the same config and the same weights (dsk loads the HF checkpoint the
  peer saved) on the same batch; ``dsk`` also runs its sequence-wise balance loss and the router bias update, which
  the peer lacks. Each side steps the optimizer its training loop builds (dsk: ``build_adamw``, fused where torch
  has the kernel; peer: ``torch.optim.AdamW``), same hyper-parameters. Steps interleaved over 15 rounds;
  ``dsk``/``peer`` are medians, ``ratio`` the median of the per-round ``peer / dsk`` (target >= 1.5).
* ``speculative_decode``: tokens/s generating the same greedy tokens with ``speculative_generate`` and the MTP
  drafter (``dsk``) and with plain KV-cached ``generate`` (``peer``), batch 1 and a batch of 8 prompts of
  different lengths, for the ``recipes/base/tiny-dsv3.toml`` model with 3 and 8 layers and 1 or 2 MTP depths,
  each after a short training on a deterministic sequence (a fixed random permutation of the vocabulary walked as
  a cycle) so that the MTP heads have something to predict; the case names the draft acceptance (real text is
  harder: the paper reports 85-90 % for DeepSeek-V3's second token, §5.4.3) and the measured ceiling
  ``(1 + drafts) t1 / (t_verify + t_draft)`` (:func:`decode_costs`). ``ratio = peer / dsk`` times (the paper:
  1.8x tokens per second).
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def _interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    between_rounds: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Wall times of each function over ``repeats`` rounds, the functions interleaved within every round;
    ``between_rounds`` (untimed) runs after each round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
        if between_rounds is not None:
            between_rounds()
    return times


def _median_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in _interleaved_times(fns, repeats, warmup).items()}


def _train_step_rows(quick: bool) -> list[dict]:
    import transformers
    from dsk_optim.adamw import build_adamw
    from dsk_optim.config import AdamWConfig

    import dsk
    from dsk.model.loss import collect_side_channels, training_loss

    # DeepSeek-V3's routing topology scaled down: fine-grained experts, half of the groups kept per token.
    dim, layers, experts, top_k, groups, batch, seq = (64, 3, 16, 4, 4, 4, 64) if quick else (128, 4, 64, 6, 8, 8, 128)
    cfg = transformers.DeepseekV3Config(
        vocab_size=512,
        hidden_size=dim,
        intermediate_size=3 * dim,
        moe_intermediate_size=dim // 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        n_routed_experts=experts,
        n_shared_experts=1,
        num_experts_per_tok=top_k,
        n_group=groups,
        topk_group=groups // 2,
        first_k_dense_replace=1,
        q_lora_rank=dim // 2,
        kv_lora_rank=dim // 2,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=1024,
        routed_scaling_factor=2.5,
    )
    torch.manual_seed(0)
    peer = transformers.DeepseekV3ForCausalLM(cfg).train()
    with tempfile.TemporaryDirectory() as tmp:
        peer.save_pretrained(tmp)
        model = dsk.load_pretrained(tmp).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    # each side with its own trainer's optimizer: dsk's build_adamw (fused kernel where torch has one) and the
    # torch AdamW defaults an HF training loop uses; same lr, betas, eps and weight decay
    opt_dsk = build_adamw(AdamWConfig(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01), model)
    side = collect_side_channels(model)  # as the build path does, once
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def dsk_step() -> None:
        loss = training_loss(model, ids, ids, side=side).loss
        opt_dsk.zero_grad(set_to_none=True)
        loss.backward()
        opt_dsk.step()
        side.after_optimizer_step()

    def peer_step() -> None:
        loss = peer(input_ids=ids, labels=ids).loss
        opt_peer.zero_grad(set_to_none=True)
        loss.backward()
        opt_peer.step()

    # The garbage collector as dsk's training loop runs it (dsk.train.loop): long-lived objects frozen, automatic
    # collections off, a young-generation pass between rounds (untimed); the process is shared, so both sides
    # step under the same policy.
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        times = _interleaved_times(
            {"dsk": dsk_step, "peer": peer_step},
            repeats=3 if quick else 15,
            warmup=2,
            between_rounds=lambda: gc.collect(1),
        )
    finally:
        gc.unfreeze()
        gc.enable()
    t = {k: statistics.median(v) for k, v in times.items()}
    # median of the per-round ratios: load from other processes shifts whole rounds, hitting both sides alike
    ratio = statistics.median(p / d for p, d in zip(times["peer"], times["dsk"], strict=True))
    case = f"dim{dim} L{layers} E{experts} k{cfg.num_experts_per_tok} B{batch}x{seq} fp32 AdamW"
    return [
        {
            "bench": "model",
            "case": f"train_step {case}",
            "dsk": t["dsk"],
            "peer": t["peer"],
            "ratio": ratio,
            "target": ">= 1.5 vs transformers DeepseekV3ForCausalLM",
            "unit": "s/step",
        }
    ]


def _tiny_dsv3(vocab: int, **overrides):
    from dsk.model.build import build_model
    from dsk.model.config import ModelConfig
    from dsk.testing import builtin_registry

    table = tomllib.loads((ROOT / "recipes" / "base" / "tiny-dsv3.toml").read_text())["model"]
    for key, value in overrides.items():  # "mtp.depth" -> table["mtp"]["depth"]
        *parents, leaf = key.split(".")
        node = table
        for name in parents:
            node = node[name]
        node[leaf] = value
    torch.manual_seed(0)
    return build_model(builtin_registry().validate(ModelConfig, {**table, "vocab_size": vocab}))


def _trained_on_a_cycle(vocab: int, steps: int, n_layers: int, depth: int):
    """The tiny-dsv3 model with ``n_layers`` layers and ``depth`` MTP depths after ``steps`` AdamW steps on a fixed
    random permutation of the vocabulary walked as a cycle (so that the MTP heads have something to predict);
    returns (model in eval mode, the cycle)."""
    from dsk.model.loss import collect_side_channels, training_loss

    model = _tiny_dsv3(vocab, n_layers=n_layers, **{"mtp.depth": depth}).train()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(vocab, generator=g)
    stream = order.repeat(8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    side = collect_side_channels(model)
    for _ in range(steps):
        starts = torch.randint(0, vocab, (8,), generator=g).tolist()
        ids = torch.stack([stream[s : s + 64] for s in starts])
        loss = training_loss(model, ids, ids, side=side).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        side.after_optimizer_step()
    return model.eval(), order


@torch.no_grad()
def decode_costs(model, prompt: list[int], drafts: int, repeats: int = 30) -> dict[str, float]:
    """Median seconds of the three pieces of a speculative round, batch 1, interleaved:

    * ``t1``: one 1-token decode step of the main model (what plain greedy decoding pays per token);
    * ``t_verify``: one (1 + drafts)-token step of the main model on the same cache;
    * ``t_draft``: one proposal of ``drafts`` tokens by the MTP drafter in its steady state (the previous round's
      drafts all accepted: each depth recomputes the positions the round committed).

    With every draft accepted a round yields 1 + drafts tokens, so speculation can at best reach
    ``ceiling = (1 + drafts) * t1 / (t_verify + t_draft)`` times plain decoding's tokens/s (2 t1 / (t_verify +
    t_draft) for one draft).
    """
    P = len(prompt)
    caches = model.make_caches(1, P + drafts + 2)
    out = model(torch.tensor([prompt]), caches=caches, keep_logits=1)
    first = out.logits[:, -1].argmax(dim=-1)  # (1,)
    one = first[:, None]
    block = torch.cat([one, torch.zeros((1, drafts), dtype=torch.long)], dim=1)

    def step(ids: torch.Tensor) -> None:
        model(ids, caches=caches)
        for c in caches:
            c.truncate(P)

    drafter = model.mtp.make_batch_drafter(model, 1, P + drafts + 2)
    drafter.begin(torch.tensor([prompt]), torch.tensor([P]), out.hidden, first)
    greedy = lambda logits: (logits.argmax(dim=-1), None)  # noqa: E731 - the loop's greedy DraftSampler
    xs, _ = drafter.propose(drafts, greedy)
    verdict = model(torch.cat([one, xs], dim=1), caches=caches)  # accept them all: the steady state
    for c in caches:
        c.truncate(P)
    drafter.observe(torch.cat([xs, xs[:, -1:]], dim=1), torch.tensor([drafts + 1]), verdict.hidden)
    t = _median_interleaved(
        {"t1": lambda: step(one), "t_verify": lambda: step(block), "t_draft": lambda: drafter.propose(drafts, greedy)},
        repeats=repeats,
        warmup=3,
    )
    t["ceiling"] = (1 + drafts) * t["t1"] / (t["t_verify"] + t["t_draft"])
    return t


def _speculative_rows(quick: bool) -> list[dict]:
    """Speculative vs plain greedy decoding on cycle-trained tiny-dsv3 models of 3 and 8 layers (see the module
    docstring), with each case's measured ceiling."""
    from dsk.model.generate import generate, speculative_generate

    vocab, steps, new_tokens = 64, (30 if quick else 60), (32 if quick else 96)
    cases = [(3, 1), (8, 1), (8, 2)]
    rows: list[dict] = []
    for n_layers, depth in cases:
        model, order = _trained_on_a_cycle(vocab, steps, n_layers, depth)
        cost = decode_costs(model, order[:4].tolist(), depth, repeats=10 if quick else 30)
        for batch in (1, 8):
            # rows of different lengths, each starting somewhere on the cycle
            prompts = [order[7 * b : 7 * b + 3 + b % 4].tolist() for b in range(batch)]
            spec = speculative_generate(model, prompts, new_tokens, drafter="mtp")
            plain = generate(model, prompts, new_tokens, temperature=0)
            if spec.tokens != plain.tokens:
                raise AssertionError("speculative decoding diverged from greedy decoding")
            times = _interleaved_times(
                {
                    "dsk": lambda: speculative_generate(model, prompts, new_tokens, drafter="mtp"),  # noqa: B023
                    "peer": lambda: generate(model, prompts, new_tokens, temperature=0),  # noqa: B023
                },
                repeats=3 if quick else 7,
                warmup=1,
            )
            t = {k: statistics.median(v) for k, v in times.items()}
            tokens = sum(spec.lengths)
            case = (
                f"L{n_layers} MTP depth {depth}, B{batch}x{new_tokens} tokens, {steps} train steps on a cycle: "
                f"acceptance {spec.acceptance_rate:.2f}, {spec.tokens_per_step:.2f} tokens/forward; ceiling "
                f"{cost['ceiling']:.2f}x (t1 {cost['t1'] * 1e3:.2f} ms, verify {cost['t_verify'] * 1e3:.2f} ms, "
                f"draft {cost['t_draft'] * 1e3:.2f} ms)"
            )
            rows.append(
                {
                    "bench": "model",
                    "case": f"speculative_decode {case}",
                    "dsk": tokens / t["dsk"],
                    "peer": tokens / t["peer"],
                    # median of the per-round ratios: load from other processes shifts whole rounds
                    "ratio": statistics.median(p / d for p, d in zip(times["peer"], times["dsk"], strict=True)),
                    "target": ">= 1.5x with >= 8 layers (paper: 1.8x tokens/s)",
                    "unit": "tokens/s",
                    "ceiling": cost["ceiling"],
                    "acceptance": spec.acceptance_rate,
                }
            )
    return rows


def run(quick: bool) -> list[dict]:
    """Rows of ``python -m bench model`` (see the module docstring)."""
    return _train_step_rows(quick) + _speculative_rows(quick)


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)

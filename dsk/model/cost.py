"""The analytic cost of a model: the sum of what its components state (:class:`dsk.api.CostModel`) and the core's
own parts (embedding, final and block norms, output head), per token, without running a forward.

The core names no technique: every module of the model that implements ``cost(seq_len, act_bytes)`` is summed once,
grouped by the ``[model]`` slot it was built from (its place in the module tree), and the core adds the parts it
owns. It works on a model built on the meta device (``with torch.device("meta"): build_model(cfg, vocab)``), which
is how ``dsk plan`` sizes DeepSeek-V3 without the memory for it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict
from typing import Any

from dsk.api import ActivationBytes, Cost, CostModel, PartEstimate
from dsk.model.transformer import Block, DSKModel

__all__ = ["CONVENTIONS", "model_cost", "part_costs"]

#: how the numbers of :func:`model_cost` are counted (printed next to them by the reports)
CONVENTIONS: dict[str, str] = {
    "flops": "matrix-product FLOPs only, 2 per multiply-add (norms, activations, softmax, RoPE left out); attention "
    "scores and values over seq_len / 2 keys on average (causal)",
    "training_flops": "3 x the forward (the backward computes the input and the weight gradients: 2 x the forward); "
    "no activation recomputation",
    "active_params": "the parameters one token's forward passes through: every dense part, an MoE layer's router, "
    "shared experts and top_k routed experts; _with_embeddings adds the whole embedding table and output head "
    "(DeepSeek-V3's 37B convention), _without_embeddings leaves both out; MTP apart (active_params_mtp)",
    "params": "distinct parameters, a tied head counted once with the embedding; the MTP modules share the "
    "embedding and head, so params_mtp holds only their own (the published V3 weights store a copy of both in the "
    "MTP layer: add 2 x vocab x dim to compare with their 685B)",
    "activation_bytes": "values a training forward keeps for the backward (no recomputation), at act_bytes each "
    "(norm statistics, router affinities, attention log-sum-exp and the loss's log-probabilities at 4 bytes), "
    "MTP included",
    "kv_bytes": "inference cache per token over the main layers (kv_bytes_per_token) and the MTP blocks (apart)",
}

# the parts of by_component that belong to the main model, and those the "embedding and head" conventions drop
_EMBEDDING_PARTS = ("embedding", "head")


def _slot_of(path: str, first_k_dense: int) -> str:
    """The ``[model]`` slot a module at ``path`` (in :class:`DSKModel`) was built from, or the core part it is in."""
    names = path.split(".")
    if names[0] == "layers" and len(names) >= 3 and names[1].isdigit():
        if names[2] == "self_attn":
            return "attention"
        if names[2] == "mlp":
            return "dense_ffn" if int(names[1]) < first_k_dense else "ffn"
        return "layers"
    return names[0]  # "mtp", or another top-level part


def _norm(module: Any, act_bytes: int) -> Cost:
    """An RMSNorm of the core: its weight; it saves its input and normalised value, and a float32 statistic.

    Recomputing its region (``"norm"``) keeps the input and frees the normalised value, the statistic and the copy
    of its output that the layer after it saves as its input (the attention, the FFN, the head each save theirs).
    """
    n = int(module.weight.numel())
    return Cost(
        params=n,
        active_params=n,
        activation_bytes_per_token=float(2 * n * act_bytes + 4),
        recomputable_bytes_per_token={"norm": float(2 * n * act_bytes + 4)},
    )


def model_cost(model: DSKModel, seq_len: int, act_bytes: int = 2) -> dict[str, Any]:
    """Parameters, FLOPs, saved activations and KV-cache bytes per token of ``model`` at context ``seq_len``.

    Args:
        model: an unwrapped :class:`DSKModel` (real or on the meta device).
        seq_len: the context length the attention's per-token costs are taken at (a training sequence).
        act_bytes: bytes per activation value (2: BF16).

    Returns:
        a dict (numbers only, JSON-ready; :data:`CONVENTIONS` says how each is counted) with
        ``params_total``, ``params_without_mtp``, ``params_mtp``, ``params_embeddings`` (embedding + untied head),
        ``params_held`` (counted from the parameter tensors, tied once: equal to ``params_total`` when every
        component reports what it holds), ``active_params_with_embeddings``, ``active_params_without_embeddings``,
        ``active_params_mtp``, ``flops_per_token`` (forward of a training step, MTP and heads included),
        ``flops_per_token_without_mtp`` (inference), ``training_flops_per_token`` (3 x forward),
        ``activation_bytes_per_token``, ``kv_bytes_per_token``, ``kv_bytes_per_token_mtp``, ``seq_len``,
        ``act_bytes``, and ``by_component``: per ``[model]`` slot (``attention``, ``dense_ffn``, ``ffn``, ``mtp``) and
        core part (``embedding``, ``norm``, ``head``) the summed :class:`dsk.api.Cost` fields as a dict.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len = {seq_len}: must be >= 1")
    cfg = model.config
    parts: dict[str, Cost] = defaultdict(Cost)
    for path, module in model.named_modules():
        if module is not model and isinstance(module, CostModel):
            parts[_slot_of(path, cfg.first_k_dense)] += module.cost(seq_len, act_bytes)

    # the core's parts: the blocks' norms (an MTP block's with the MTP), the final norm, embedding and head
    for path, module in model.named_modules():
        if isinstance(module, Block):
            norms = _norm(module.input_layernorm, act_bytes) + _norm(module.post_attention_layernorm, act_bytes)
            parts["mtp" if path.startswith("mtp.") else "norm"] += norms
    parts["norm"] += _norm(model.norm, act_bytes)
    emb = int(model.embed_tokens.weight.numel())
    parts["embedding"] += Cost(params=emb, active_params=emb)
    dim, vocab = cfg.dim, model.vocab_size
    tied = model.lm_head.weight is model.embed_tokens.weight
    head_params = 0 if tied else int(model.lm_head.weight.numel())
    # one call of the head: the D x V product; its input, and the loss's float32 log-probabilities, kept
    head_call = Cost(flops_per_token=2.0 * dim * vocab, activation_bytes_per_token=float(dim * act_bytes + 4 * vocab))
    parts["head"] += Cost(params=head_params, active_params=head_params) + head_call
    mtp_calls = parts["mtp"].head_calls_per_token if "mtp" in parts else 0.0
    if mtp_calls:
        parts["mtp"] += Cost(
            flops_per_token=head_call.flops_per_token * mtp_calls,
            activation_bytes_per_token=head_call.activation_bytes_per_token * mtp_calls,
        )

    total = sum(parts.values(), Cost())
    mtp = parts.get("mtp", Cost())
    main = sum((c for k, c in parts.items() if k != "mtp"), Cost())
    embeddings = sum((parts[k] for k in _EMBEDDING_PARTS if k in parts), Cost())
    held: dict[int, int] = {id(p): p.numel() for p in model.parameters()}
    return {
        "params_total": total.params,
        "params_without_mtp": main.params,
        "params_mtp": mtp.params,
        "params_embeddings": embeddings.params,
        "params_held": int(sum(held.values())),
        "active_params_with_embeddings": main.active_params,
        "active_params_without_embeddings": main.active_params - embeddings.active_params,
        "active_params_mtp": mtp.active_params,
        "flops_per_token": total.flops_per_token,
        "flops_per_token_without_mtp": main.flops_per_token,
        "training_flops_per_token": 3.0 * total.flops_per_token,
        "activation_bytes_per_token": total.activation_bytes_per_token,
        "kv_bytes_per_token": main.kv_bytes_per_token,
        "kv_bytes_per_token_mtp": mtp.kv_bytes_per_token,
        "seq_len": seq_len,
        "act_bytes": act_bytes,
        "by_component": {k: asdict(c) for k, c in sorted(parts.items())},
    }


def _part_of(path: str) -> str:
    """The model part a module at ``path`` belongs to, named as a pipeline cuts the model: ``layers.<i>``, else the
    first component (``embed_tokens``, ``norm``, ``lm_head``, ``mtp``)."""
    head, _, rest = path.partition(".")
    return f"layers.{rest.partition('.')[0]}" if head == "layers" else head


def part_costs(model: DSKModel, seq_len: int) -> list[PartEstimate]:
    """The model's parts in order (embedding, each layer, final norm, head, the MTP modules) with the parameters,
    routed-expert parameters and saved-activation bytes per token their components state, for the run estimate
    (:class:`dsk.api.RunEstimate`).

    The activation bytes come as :class:`dsk.api.ActivationBytes`, from each component's cost at 2 and at 4 bytes
    per value (what follows the activation dtype, and the float32 statistics that do not). What lies inside a
    transformer block (its norms, attention and FFN) is kept apart with its recomputable regions: recomputation
    wraps blocks, so a norm outside one (the final norm, the MTP modules' own) is never recomputed. The output
    head's call (its input and the loss's float32 log-probabilities) is the head's part; the MTP depths' calls are
    the MTP part's.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len = {seq_len}: must be >= 1")
    blocks = [path for path, m in model.named_modules() if isinstance(m, Block)]
    order = ["embed_tokens", *(f"layers.{i}" for i in range(len(model.layers))), "norm", "lm_head"]
    if model.mtp is not None:
        order.append("mtp")
    costs: dict[str, list[Cost]] = {name: [Cost(), Cost()] for name in order}  # at 2 and at 4 bytes per value
    inside: dict[str, list[Cost]] = {name: [Cost(), Cost()] for name in order}
    n_blocks: dict[str, int] = dict.fromkeys(order, 0)

    def add(path: str, pair: tuple[Cost, Cost]) -> None:
        part = _part_of(path)
        in_block = any(path == b or path.startswith(b + ".") for b in blocks)
        for i in (0, 1):
            costs[part][i] += pair[i]
            if in_block:
                inside[part][i] += pair[i]

    for path, module in model.named_modules():
        if module is not model and isinstance(module, CostModel):
            add(path, (module.cost(seq_len, 2), module.cost(seq_len, 4)))
        if isinstance(module, Block):
            n_blocks[_part_of(path)] += 1
            for norm in (module.input_layernorm, module.post_attention_layernorm):
                add(path + ".norm", (_norm(norm, 2), _norm(norm, 4)))
    add("norm", (_norm(model.norm, 2), _norm(model.norm, 4)))
    emb = int(model.embed_tokens.weight.numel())
    costs["embed_tokens"][0] += Cost(params=emb)
    costs["embed_tokens"][1] += Cost(params=emb)
    dim, vocab = model.config.dim, model.vocab_size
    tied = model.lm_head.weight is model.embed_tokens.weight
    head_params = 0 if tied else int(model.lm_head.weight.numel())
    calls = costs["mtp"][0].head_calls_per_token if "mtp" in costs else 0.0
    for i, ab in ((0, 2), (1, 4)):
        head_call = float(dim * ab + 4 * vocab)  # its input and the loss's float32 log-probabilities
        costs["lm_head"][i] += Cost(params=head_params, activation_bytes_per_token=head_call)
        if calls:
            costs["mtp"][i] += Cost(activation_bytes_per_token=head_call * calls)

    out = []
    for name in order:
        two, four = costs[name]
        in2, in4 = inside[name]
        regions = {
            r: ActivationBytes.from_two(in2.recomputable_bytes_per_token.get(r, 0.0), b)
            for r, b in in4.recomputable_bytes_per_token.items()
        }
        out.append(
            PartEstimate(
                name=name,
                params=four.params,
                expert_params=four.expert_params,
                activations=ActivationBytes.from_two(two.activation_bytes_per_token, four.activation_bytes_per_token),
                block_activations=ActivationBytes.from_two(
                    in2.activation_bytes_per_token, in4.activation_bytes_per_token
                ),
                block_inputs=ActivationBytes(values=float(n_blocks[name] * dim)),
                recomputable=regions,
            )
        )
    return out

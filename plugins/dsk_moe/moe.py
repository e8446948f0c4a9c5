"""DeepSeekMoE layer: fused shared experts + routed experts behind a router slot (spec §1.8, §4.2 eq. 12).

``h' = shared(u) + sum_k g_k * expert_{idx_k}(u)`` for every token, no capacity limit and no token dropping
(spec §4.5). Dispatch is vectorised: the N*K (token, expert) slots are sorted by expert with one argsort, the
tokens gathered into expert-contiguous rows, the experts run as grouped GEMMs (or one matmul per expert slice),
and the weighted outputs folded back per token.

State-dict names match HF ``DeepseekV3MoE`` (``gate.weight``, ``gate.e_score_correction_bias``,
``shared_experts.{gate,up,down}_proj.weight``) except the routed experts, stored stacked as
``experts.w_gate / w_up / w_down``; :func:`hf_to_dsk` and :func:`dsk_to_hf` map the per-expert on-disk names.

Expert parallelism: the layer implements :class:`dsk.api.ExpertShardable`. After ``shard_experts(start, stop,
dispatcher)`` it holds routed experts ``start:stop`` only and hands the routed part of each forward to the
strategy's dispatcher (which moves the tokens to the ranks owning their experts and back); the router and the
shared experts run on every rank as before, and :meth:`MoE.local_experts` is the layer's own expert path on the
rows a rank receives.

Shape suffixes: B sequences, T tokens per sequence, N = B*T tokens, D model dim, E routed experts, K experts per
token, R = N*K routed slots (sorted by expert after dispatch).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn

from dsk.api import Cost, ModelContext
from dsk.api.runtime import profile_part, recomputable

from . import kernels
from .config import MoEConfig, router_fit_problems
from .experts import RoutedExperts, SwiGLU

__all__ = ["MoE", "hf_to_dsk", "dsk_to_hf"]


class MoE(nn.Module):
    """Mixture-of-experts FFN (``ffn`` kind, name ``moe``): forward [B, T, D] -> [B, T, D].

    Submodules: ``gate`` (the router slot, built as ``Router(cfg, ctx, n_routed_experts)``), ``experts``
    (:class:`RoutedExperts`), ``shared_experts`` (one SwiGLU of ``n_shared_experts * expert_hidden_dim``, or None
    when there are no shared experts).

    Side channels of the ffn contract (``aux_loss``, ``step_stat_tensors``, ``after_optimizer_step``,
    ``step_metrics``) delegate to the router, which names them differently so that they are found once per layer.

    Attributes:
        n_routed_experts: E of the whole layer, whether sharded or not (``total_experts``, the same number, is the
            name :class:`dsk.api.ExpertShardable` reads).
        expert_range: ``(start, stop)``, the routed experts this module holds (``(0, E)`` unless sharded).
    """

    #: the expert-parallel dispatcher set by :meth:`shard_experts` (None: every routed expert is local)
    dispatcher: Callable[..., torch.Tensor] | None = None

    def __init__(self, cfg: MoEConfig, ctx: ModelContext):
        super().__init__()
        problems = router_fit_problems(cfg.router.config, cfg.n_routed_experts, prefix="ffn.router.")
        if problems:
            raise ValueError("; ".join(problems))
        self.cfg = cfg
        self.top_k = cfg.router.config.top_k
        self.n_routed_experts = self.total_experts = cfg.n_routed_experts
        self.expert_range = (0, cfg.n_routed_experts)
        self.gate = cfg.router.build(ctx, cfg.n_routed_experts)
        self.experts = RoutedExperts(cfg.n_routed_experts, ctx.dim, cfg.expert_hidden_dim, ctx.init_std)
        self.shared_experts = (
            SwiGLU(ctx.dim, cfg.n_shared_experts * cfg.expert_hidden_dim, ctx.init_std)
            if cfg.n_shared_experts > 0
            else None
        )

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]."""
        B, T, _ = x_BTD.shape
        N, K = B * T, self.top_k
        x_ND = x_BTD.reshape(B * T, -1)  # b t d -> (b t) d
        with profile_part("router"):
            weights_NK, idx_NK, stats = self.gate(x_ND, seq_shape=(B, T))
        if self.dispatcher is not None:  # expert parallelism: the strategy moves the tokens to their experts
            with profile_part("routed_experts"):  # its all-to-all is communication (dsk profile tells by op name)
                routed_ND = self.dispatcher(x_ND, weights_NK, idx_NK, self.local_experts)
            if self.shared_experts is not None:
                with profile_part("shared_experts"):
                    routed_ND = self.shared_experts(x_ND) + routed_ND
            return rearrange(routed_ND, "(b t) d -> b t d", b=B)

        # Dispatch: sort the N*K slots (slot = n * K + k) by expert; stable, so a token's rows keep token order
        # within an expert.
        with profile_part("router"):
            order_R = stats.get("order")  # routers on the CPU kernel sort while selecting
            if order_R is None:
                order_R = torch.argsort(rearrange(idx_NK, "n k -> (n k)"), stable=True)
        with profile_part("shared_experts"):
            y_ND = self.shared_experts(x_ND) if self.shared_experts is not None else None
        path = self.experts.resolve_dispatch(x_ND, self.cfg.dispatch, n_rows=N * K)
        if path == "cpu_kernel":
            # The kernel gathers each slot's token row and sums each token's K outputs itself.
            ex = self.experts
            with profile_part("routed_experts"):
                routed_ND = kernels.routed_experts(
                    x_ND, weights_NK, order_R, stats["load"], ex.w_gate, ex.w_up, ex.w_down, K
                )
            return (routed_ND if y_ND is None else y_ND + routed_ND).view(B, T, -1)  # (b t) d -> b t d
        with profile_part("routed_experts"):  # the gather, the experts and the combine
            token_R = order_R // K  # slot n*K + k belongs to token n
            # the gather is a recomputable region: a copy of R x D values, as cheap to redo as to keep
            x_RD = recomputable("ffn.dispatch", torch.index_select, x_ND, 0, token_R)
            scale_R = rearrange(weights_NK, "n k -> (n k)").index_select(0, order_R)
            out_RD = self.experts(x_RD, stats["load"], scale_R, path)  # the path resolved above, not "auto" again

            # Combine: add each slot's weighted output into its token's row (one pass over R x D; backward is a
            # gather). index_add is deterministic on CPU, and on CUDA under torch.use_deterministic_algorithms.
            if y_ND is None:
                y_ND = torch.zeros_like(x_ND)
            return rearrange(y_ND.index_add(0, token_R, out_RD), "(b t) d -> b t d", b=B)

    # -- expert parallelism (dsk.api.ExpertShardable) ---------------------------------------------------

    def shard_experts(self, start: int, stop: int, dispatcher: Callable[..., torch.Tensor]) -> None:
        """Keep routed experts ``start:stop`` only; from now on ``dispatcher`` runs the routed part of forward.

        ``dispatcher(x_ND, weights_NK, idx_NK, local_experts)`` returns the routed output for this rank's tokens
        (``idx_NK`` global expert ids); :meth:`local_experts` is what it calls on the rows this rank receives.
        The stacked expert parameters become new ``nn.Parameter`` slices marked :data:`dsk.api.SHARDED_PARAM`.
        """
        if self.dispatcher is not None:
            raise ValueError(f"the layer's experts are already sharded ({self.expert_range[0]}:{self.expert_range[1]})")
        self.experts.keep_experts(start, stop)
        self.expert_range = (start, stop)
        self.dispatcher = dispatcher

    def local_experts(self, x_RD: torch.Tensor, load_E: torch.Tensor, scale_R: torch.Tensor | None) -> torch.Tensor:
        """This module's routed experts on rows sorted by local expert (``load_E [stop - start]`` rows each), each
        row's output scaled by ``scale_R``: the layer's own path (``ffn.dispatch``: the CPU kernel, grouped GEMMs,
        slices, or a feature's ``linear_impl``)."""
        return self.experts(x_RD, load_E, scale_R, self.cfg.dispatch)

    def expert_parameter_names(self) -> list[str]:
        """The stacked routed-expert parameters, relative to this module (first dim: experts)."""
        return ["experts.w_gate", "experts.w_up", "experts.w_down"]

    def expert_groups(self) -> tuple[int, int]:
        """The router's group limit ``(n_groups, topk_groups)``; ``(1, 1)`` for a router without groups."""
        n_groups = int(getattr(self.gate, "n_groups", 1))
        if n_groups <= 1:
            return (1, 1)
        return (n_groups, int(self.gate.cfg.topk_groups))

    # -- analytic cost (dsk.api.CostModel) ---------------------------------------------------------------

    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """The whole layer's parameters (router, routed experts held, shared experts), the ones a token passes
        through, forward FLOPs and saved activations per token, from its sizes alone (works on the meta device).

        Active: the router's ``E * D``, the shared experts and ``top_k`` routed experts (3 matrices of
        ``D x expert_hidden_dim`` each). FLOPs: the router GEMM ``2 * D * E`` plus ``6 * D * hidden`` per active
        expert; they do not depend on the balance (every token runs exactly ``top_k`` routed experts: no
        capacity, no dropping). Saved activations (the grouped-GEMM path): x, the router's float32 affinities and
        normaliser, the K routing weights, the shared experts' gate, up and activation, and per routed slot the
        gathered row, gate, up, activation, routing weight and output (the combine keeps it).
        After :meth:`shard_experts` the routed parameters are this rank's share; the FLOPs stay a token's.
        ``expert_params`` are the stacked routed experts held. Recomputable: ``"ffn.activation"`` frees the shared
        and the K routed activations (the down projections' inputs), ``"ffn.dispatch"`` the K gathered rows.
        """
        D, E, K = self.experts.dim, self.n_routed_experts, self.top_k
        H = self.cfg.expert_hidden_dim
        H_shared = self.cfg.n_shared_experts * H
        expert = 3 * D * H
        router, shared = E * D, 3 * D * H_shared
        saved = D + K + 3 * H_shared + K * (2 * D + 3 * H + 1)
        return Cost(
            params=router + self.experts.n_experts * expert + shared,
            active_params=router + K * expert + shared,
            flops_per_token=2.0 * (router + K * expert + shared),
            activation_bytes_per_token=float(saved * act_bytes + 4 * (E + 2)),
            expert_params=self.experts.n_experts * expert,
            recomputable_bytes_per_token={
                "ffn.activation": float((H_shared + K * H) * act_bytes),
                "ffn.dispatch": float(K * D * act_bytes),
            },
        )

    # -- ffn side channels (contract in docs/plugins.md) ------------------------------------------------

    def aux_loss(self) -> torch.Tensor | None:
        """Weighted balance loss of the last training forward, ready to add to the loss (None if the router has none)."""
        fn = getattr(self.gate, "balance_loss", None)  # a router's side channels are optional (check_router)
        return fn() if fn is not None else None

    def step_stat_tensors(self) -> list[torch.Tensor]:
        """Per-expert token counts of the step (float32 [E]) for a data-parallel all-reduce (sum)."""
        fn = getattr(self.gate, "load_tensors", None)
        return list(fn()) if fn is not None else []

    def after_optimizer_step(self) -> None:
        """Once per optimizer step: router bias update from the step's counts, then reset them (no gradients)."""
        fn = getattr(self.gate, "end_step", None)
        if fn is not None:
            fn()

    def step_metrics(self) -> dict[str, float | list[float]]:
        """``maxvio`` (max/mean load - 1) and ``expert_load`` of the step; read before after_optimizer_step."""
        fn = getattr(self.gate, "load_metrics", None)
        return fn() if fn is not None else {}


_HF_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.(?P<j>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_DSK_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)experts\.w_(?P<proj>gate|up|down)$")


def hf_to_dsk(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack HF per-expert weights ``<p>experts.{j}.{gate,up,down}_proj.weight`` into ``<p>experts.w_{gate,up,down}``.

    Every other key (router, shared experts, anything outside the MoE) passes through unchanged. Raises if an
    expert index is missing.
    """
    out: dict[str, torch.Tensor] = {}
    stacks: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _HF_EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
        else:
            stacks.setdefault((m["prefix"], m["proj"]), {})[int(m["j"])] = value
    for (prefix, proj), by_index in stacks.items():
        missing = sorted(set(range(len(by_index))) - set(by_index))
        if missing:
            raise KeyError(f"{prefix}experts.{missing[0]}.{proj}_proj.weight missing from the HF state dict")
        out[f"{prefix}experts.w_{proj}"] = torch.stack([by_index[j] for j in range(len(by_index))])
    return out


def dsk_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_dsk`: split ``<p>experts.w_*`` into HF per-expert ``nn.Linear`` weights."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = _DSK_EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        for j, w in enumerate(value.unbind(0)):
            out[f"{m['prefix']}experts.{j}.{m['proj']}_proj.weight"] = w
    return out

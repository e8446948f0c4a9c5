"""Multi-head Latent Attention (DeepSeek-V2/V3; spec §1.6, report eqs 1-11) with naive and absorbed paths.

Shapes: B batch, T new tokens, S keys (cached + new), H heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim,
dv = v_head_dim, c = kv_lora_rank, D model dim.

Submodule and parameter names are HF ``DeepseekV3Attention``'s (q_a_proj, q_a_layernorm, q_b_proj | q_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj), so an HF state dict loads 1:1; see MLA.md.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from dsk.api import Cost, ModelContext
from dsk.api.runtime import PLAIN_LINEAR, LinearSite, RMSNorm, cpu_kernel_supports, recomputable
from dsk_mla import kernels
from dsk_mla.attention import PAD_V_MIN_SCORES, KVCache, attend, attention_bias
from dsk_mla.config import MLAConfig
from dsk_mla.rope import RotaryEmbedding, softmax_mscale

__all__ = ["MLA", "RMSNorm"]


class MLA(nn.Module):
    """Multi-head Latent Attention.

    Without a cache (training, scoring) it runs the naive path: the latent is expanded to per-head K and V and fed
    to SDPA. With a "latent" cache it stores only ``c + dr`` values per token (the normalised latent and the shared
    rope key) and decodes with the absorbed path (W_UK folded into the query, W_UV into the output). With a "full"
    cache it stores per-head K and V (``H * (dn + dr + dv)`` values per token), the naive baseline.

    Its projections run through ``linear_impl`` (:class:`dsk.api.LinearLayers`; sites in :meth:`linear_sites`),
    the up-projections inside the region ``"attention.up_projection"``. The absorbed decoding path folds
    ``kv_b_proj``'s weight into the query and output and is not a site (it is inference, on the stored weights).
    """

    linear_impl = PLAIN_LINEAR

    def __init__(self, cfg: MLAConfig, ctx: ModelContext):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        self.qk_head_dim = cfg.qk_head_dim
        H, c, dr = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.init_std = ctx.init_std
        self.dim = ctx.dim

        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(ctx.dim, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(ctx.dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, ctx.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * self.qk_head_dim, bias=False)
        # one matrix gives both the latent c_KV (W^DKV) and the shared rope key (W^KR)
        self.kv_a_proj_with_mqa = nn.Linear(ctx.dim, c + dr, bias=False)
        self.kv_a_layernorm = RMSNorm(c, ctx.norm_eps)
        # W^UK and W^UV stacked per head: rows (h, dn + dv)
        self.kv_b_proj = nn.Linear(c, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * cfg.v_head_dim, ctx.dim, bias=False)
        self.rope = RotaryEmbedding(dr, cfg.rope_theta, cfg.rope_scaling)
        # qk_head_dim^-0.5, times mscale^2 under YaRN (spec §1.6, HF yarn_apply_mscale)
        self.softmax_scale = self.qk_head_dim**-0.5 * softmax_mscale(cfg.rope_scaling)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights ~ N(0, init_std) (HF and the report init every weight this way); norm weights 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=self.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    # -- projections -------------------------------------------------------------------------------------------

    def _down_projections(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, T, D] -> (q or q's latent [B, T, H*dk | q_lora_rank], kv_a [B, T, c + dr])`` in one GEMM.

        Both projections read x, so their stacked weights make one wider product (and one dX GEMM in the backward)
        instead of two thin ones; the parameters keep their HF names.
        """
        w_q = self.q_proj.weight if self.q_lora_rank is None else self.q_a_proj.weight
        both = self.linear_impl.linear(x, torch.cat((w_q, self.kv_a_proj_with_mqa.weight)), "q_kv_a")
        return both.split([w_q.shape[0], self.kv_a_proj_with_mqa.weight.shape[0]], dim=-1)

    def _queries(self, x: Tensor, pos: Tensor, q_down: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [B, T, D] -> q_nope [B, T, H, dn], q_pe [B, T, H, dr]`` (rope applied).

        ``q_down``: the first output of :meth:`_down_projections`, when the caller already has it.
        """
        lin = self.linear_impl.linear
        if q_down is None:
            q_down = (
                lin(x, self.q_proj.weight, "q_proj")
                if self.q_lora_rank is None
                else lin(x, self.q_a_proj.weight, "q_a_proj")
            )
        if self.q_lora_rank is None:
            q = q_down
        else:
            q = recomputable("attention.up_projection", self._q_up, self.q_a_layernorm(q_down))
        q = q.unflatten(-1, (self.n_heads, -1))  # b t (h d) -> b t h d
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, self.rope(q_pe, pos)

    def _q_up(self, q_latent: Tensor) -> Tensor:
        """The query up-projection ``q_latent [B, T, q_lora_rank] -> [B, T, H * dk]``."""
        return self.linear_impl.linear(q_latent, self.q_b_proj.weight, "q_b_proj")

    def _latents(self, x: Tensor, pos: Tensor, kv_a: Tensor | None = None) -> Tensor:
        """``x [B, T, D] -> kv [B, T, c + dr]``: normalised latent c_KV, then the rope'd shared key k^R.

        ``kv_a``: the second output of :meth:`_down_projections`, when the caller already has it.
        """
        if kv_a is None:
            kv_a = self.linear_impl.linear(x, self.kv_a_proj_with_mqa.weight, "kv_a_proj_with_mqa")
        latent, k_pe = kv_a.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return torch.cat((self.kv_a_layernorm(latent), self.rope(k_pe, pos)), dim=-1)

    def _expand(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        """Naive up-projection ``kv [B, S, c + dr] -> k [B, H, S, dn + dr], v [B, H, S, dv]`` (a recomputable
        region: the per-head K and V are a function of the small cached latent)."""
        return recomputable("attention.up_projection", self._expand_latent, kv)

    def _expand_latent(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        B, S, _ = kv.shape
        H, dr = self.n_heads, self.qk_rope_head_dim
        latent, k_pe = kv.split([self.kv_lora_rank, dr], dim=-1)
        k_nope, v = self._kv_b_heads(latent)
        k = torch.cat((k_nope, k_pe[:, :, None, :].expand(B, S, H, dr)), dim=-1)  # rope key shared by all heads
        return rearrange(k, "b s h d -> b h s d"), rearrange(v, "b s h d -> b h s d")

    def _kv_b_heads(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """The K/V up-projection ``latent [B, S, c] -> k_nope [B, S, H, dn], v [B, S, H, dv]`` (views of one GEMM)."""
        kv_b = self.linear_impl.linear(latent, self.kv_b_proj.weight, "kv_b_proj")
        kv_b = rearrange(kv_b, "b s (h d) -> b s h d", h=self.n_heads)
        k_nope, v = kv_b.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return k_nope, v

    # -- attention paths ---------------------------------------------------------------------------------------

    def _attend_naive(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, mask: Tensor | None, offset: int) -> Tensor:
        """Expand the latents to per-head K/V and attend: ``-> o [B, T, H, dv]``."""
        B, T, _, _ = q_nope.shape
        short_causal = offset == 0 and mask is None and kv.shape[1] == T and T * T <= PAD_V_MIN_SCORES
        if short_causal and self._kernel_ok(q_nope, q_pe, kv):
            # CPU, short causal self-attention: the fused kernel reads the projections' views as they are
            latent, k_pe = kv.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
            k_nope, v = recomputable("attention.up_projection", self._kv_b_heads, latent)
            return kernels.mla_attention(q_nope, q_pe, k_nope, k_pe, v, self.softmax_scale)
        k, v = self._expand(kv)
        q = rearrange(torch.cat((q_nope, q_pe), dim=-1), "b t h d -> b h t d")
        bias = attention_bias(mask, T, kv.shape[1], offset, q.dtype, q.device) if offset or mask is not None else None
        o = attend(q, k, v, bias, self.softmax_scale, causal=True)
        return rearrange(o, "b h t d -> b t h d")

    def _attend_absorbed(self, q_nope: Tensor, q_pe: Tensor, kv: Tensor, mask: Tensor | None, offset: int) -> Tensor:
        """Attend in latent space (spec §1.6 item 4) over ``kv [B, S, c + dr]``: ``-> o [B, T, H, dv]``.

        ``q_nope.W_UK[h] . c_j == q_nope . (W_UK[h] c_j)`` and ``(sum_j p_j c_j) W_UV[h]^T == sum_j p_j (W_UV[h] c_j)``,
        so scores and outputs equal the naive path's while every head reads the same ``S x (c + dr)`` cache. Every
        product is one batched GEMM (over heads for the folds, over batch rows for the scores and values): no einsum
        or einops pattern, whose per-call work a decode step would pay in every layer (measured against the einsum
        form: 3.0 against 3.3 ms per decode step of the 3-layer GRPO bench model at 128 rows with one thread, 2.6
        against 2.9 with two). Without autograd on plain float CPU tensors (generation) the whole of it is one call
        of :func:`dsk_mla.kernels.absorbed_decode` instead, tested against this path.
        """
        B, T, H, dn = q_nope.shape
        S, c, dr = kv.shape[1], self.kv_lora_rank, self.qk_rope_head_dim
        weight = self.kv_b_proj.weight
        no_grad = not torch.is_grad_enabled() or not any(t.requires_grad for t in (q_nope, q_pe, kv, weight))
        if no_grad and self._kernel_ok(q_nope, q_pe, kv, weight):
            # decoding on CPU: one kernel call for the whole of it (dsk_mla.kernels.absorbed_decode)
            return kernels.absorbed_decode(q_nope, q_pe, kv, weight, mask, offset, self.softmax_scale)
        w = weight.view(H, -1, c)  # (h d) c -> h d c
        w_uk, w_uv = w[:, :dn], w[:, dn:]
        q_c = torch.bmm(q_nope.reshape(B * T, H, dn).transpose(0, 1), w_uk)  # h (b t) c: W_UK folded into the query
        q_abs = torch.cat((q_c, q_pe.reshape(B * T, H, dr).transpose(0, 1)), dim=-1)  # h (b t) (c + dr)
        q_abs = q_abs.transpose(0, 1).reshape(B, T * H, c + dr)  # b (t h) (c + dr): kv's layout [latent | rope key]
        scores = torch.bmm(q_abs, kv.transpose(1, 2)).view(B, T, H, S) * self.softmax_scale
        bias = attention_bias(mask, T, S, offset, scores.dtype, scores.device)
        if bias is not None:
            scores = scores + bias[:, :, None, :]  # b t s -> b t 1 s (broadcast over heads)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(kv.dtype)
        o_c = torch.bmm(probs.view(B, T * H, S), kv[..., :c])  # b (t h) c
        o = torch.bmm(o_c.view(B * T, H, c).transpose(0, 1), w_uv.transpose(1, 2))  # h (b t) dv: W_UV folded in
        return o.transpose(0, 1).reshape(B, T, H, -1)

    @staticmethod
    def _kernel_ok(*operands: Tensor) -> bool:
        # plain CPU float32/float64 operands (no DTensor) and a built kernel
        return cpu_kernel_supports(*operands) and kernels.EXTENSION.load() is not None

    def _absorb_is_cheaper(self, n_queries: int) -> bool:
        """Whether the absorbed path needs fewer multiply-adds than expanding the cached latents, per key and head.

        absorbed: T * (2c + dr); naive: c * (dn + dv) to expand the key, then T * (dn + dr + dv). Decoding (small T)
        absorbs; a long prefill into a latent cache expands, as DeepSeek's serving stacks do.
        """
        c, dn, dv = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return n_queries * (2 * c - dn - dv) <= c * (dn + dv)

    # -- public API --------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None = None, cache: KVCache | None = None) -> Tensor:
        """``x [B, T, D], pos [T] | [B, T] long, mask [B, T, S] bool | None, cache -> y [B, T, D]``.

        With a cache, row b's T tokens are appended at slots ``cache.lengths[b] ..`` and attend over the
        S = ``cache.span + T`` slots (causally, each row over its own tokens, when ``mask`` is None).
        """
        B, T, _ = x.shape
        q_down, kv_a = self._down_projections(x)
        q_nope, q_pe = self._queries(x, pos, q_down)  # [B, T, H, dn], [B, T, H, dr]
        kv = self._latents(x, pos, kv_a)  # [B, T, c + dr]
        if cache is None:
            o = self._attend_naive(q_nope, q_pe, kv, mask, offset=0)
        elif cache.layout == "latent":
            offset = cache.span  # slots before the new tokens (the longest row's, when rows differ)
            mask = cache.causal_mask(T) if mask is None else mask  # rows of different lengths see their own slots
            kv_all = cache.append(kv=kv)["kv"].to(kv.dtype)  # [B, S, c + dr]
            if self._absorb_is_cheaper(T):
                o = self._attend_absorbed(q_nope, q_pe, kv_all, mask, offset)
            else:
                o = self._attend_naive(q_nope, q_pe, kv_all, mask, offset)
        elif cache.layout == "full":
            offset = cache.span
            mask = cache.causal_mask(T) if mask is None else mask
            k, v = self._expand(kv)  # [B, H, T, dn + dr], [B, H, T, dv]
            new = cache.append(k=k, v=v)
            q = rearrange(torch.cat((q_nope, q_pe), dim=-1), "b t h d -> b h t d")
            bias = attention_bias(mask, T, offset + T, offset, q.dtype, q.device)
            o = attend(q, new["k"].to(q.dtype), new["v"].to(q.dtype), bias, self.softmax_scale)
            o = rearrange(o, "b h t d -> b t h d")
        else:
            raise ValueError(f"MLA cannot use a cache with layout {cache.layout!r}; make it with MLA.make_cache")
        return self.linear_impl.linear(o.flatten(-2), self.o_proj.weight, "o_proj")  # b t h d -> b t (h d)

    def forward_absorbed(self, x: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """The absorbed path without a cache (for tests): ``x [B, T, D], pos [T], mask [B, T, T] | None -> [B, T, D]``."""
        q_nope, q_pe = self._queries(x, pos)
        o = self._attend_absorbed(q_nope, q_pe, self._latents(x, pos), mask, offset=0)
        return self.linear_impl.linear(o.flatten(-2), self.o_proj.weight, "o_proj")  # b t h d -> b t (h d)

    def linear_sites(self) -> list[LinearSite]:
        """The GEMMs run through ``linear_impl`` in a training forward (the concatenated down-projection first)."""
        H, c, dr = self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        dk, dv = self.qk_head_dim, self.v_head_dim
        q_out = H * dk if self.q_lora_rank is None else self.q_lora_rank
        sites = [LinearSite("q_kv_a", q_out + c + dr, self.dim, "dim")]
        if self.q_lora_rank is not None:
            sites.append(LinearSite("q_b_proj", H * dk, self.q_lora_rank, "attention.q_lora_rank"))
        sites.append(LinearSite("kv_b_proj", H * (self.qk_nope_head_dim + dv), c, "attention.kv_lora_rank"))
        sites.append(LinearSite("o_proj", self.dim, H * dv, "attention.v_head_dim"))
        return sites

    def make_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layout: str | None = None,
    ) -> KVCache:
        """An empty cache for ``max_len`` tokens; ``layout`` defaults to ``cfg.decode_cache``."""
        layout = layout or self.cfg.decode_cache
        ref = self.kv_b_proj.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        if layout == "latent":
            kv = torch.zeros(batch_size, max_len, self.kv_lora_rank + self.qk_rope_head_dim, device=device, dtype=dtype)
            return KVCache({"kv": kv}, seq_dim=1, layout="latent")
        if layout == "full":
            H = self.n_heads
            k = torch.zeros(batch_size, H, max_len, self.qk_head_dim, device=device, dtype=dtype)
            v = torch.zeros(batch_size, H, max_len, self.v_head_dim, device=device, dtype=dtype)
            return KVCache({"k": k, "v": v}, seq_dim=2, layout="full")
        raise ValueError(f"decode_cache = {layout!r}: expected 'latent' or 'full'")

    def cache_values_per_token(self, layout: str | None = None) -> int:
        """Values cached per token per layer: ``c + dr`` (latent) or ``H * (dn + dr + dv)`` (full)."""
        if (layout or self.cfg.decode_cache) == "latent":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return self.n_heads * (self.qk_head_dim + self.v_head_dim)

    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """This layer's parameters, forward FLOPs, saved activations and latent-cache bytes per token
        (:class:`dsk.api.CostModel`), from its sizes alone (works on the meta device).

        FLOPs: 2 per multiply-add of the projections (q_a, q_b | q_proj, kv_a, kv_b, o), and the score and value
        products over ``seq_len / 2`` keys on average (causal) of the naive path training runs:
        ``H * (dn + dr)`` and ``H * dv`` multiply-adds per key. Saved activations, as the naive path with the fused
        SDPA kernel keeps them (no recomputation): x, the joint down-projection's output, each latent norm's
        normalised value (and its float32 statistic), the up-projections' inputs, the per-head q and k, v and the
        kernel's output padded to ``dn + dr`` columns when ``dv`` is smaller, the output projection's input and
        the kernel's float32 log-sum-exp per head. KV cache: ``decode_cache``'s values per token (``c + dr``
        latent, or ``H * (dn + dr + dv)`` full).

        Recomputable (measured with ``dsk.profile.activations`` on the naive path): the ``"norm"`` region of the
        latents frees each norm's normalised value and statistic, and the query latent's copy that ``q_b_proj``
        saves; ``"attention.up_projection"`` frees nothing here, since its GEMMs keep only their inputs (the latents)
        and its outputs reach SDPA through new tensors (the RoPE'd, concatenated q and k), which SDPA saves.
        """
        D, H, c, dr = self.dim, self.n_heads, self.kv_lora_rank, self.qk_rope_head_dim
        dn, dv, dk = self.qk_nope_head_dim, self.v_head_dim, self.qk_head_dim
        q = self.q_lora_rank
        q_weights = D * H * dk if q is None else D * q + q * H * dk
        weights = q_weights + D * (c + dr) + c * H * (dn + dv) + H * dv * D
        params = weights + c + (0 if q is None else q)  # + the latents' RMSNorm weights
        flops = 2.0 * weights + 2.0 * (seq_len / 2) * H * (dk + dv)
        q_out = H * dk if q is None else q
        saved = D + (q_out + c + dr)  # x, the joint down-projection's output
        saved += 0 if q is None else 2 * q  # the query latent's norm: normalised value, q_b_proj's input
        saved += c + (c + dr)  # the KV latent's norm, kv_b_proj's input (latent and rope key)
        saved += 2 * H * dk + 2 * H * max(dv, dk) + H * dv  # q, k, v and output (padded), o_proj's input
        fp32 = (0 if q is None else 1) + 1 + H  # the norms' statistics, the log-sum-exp
        norms = c * act_bytes + 4 + (0 if q is None else 2 * q * act_bytes + 4)
        return Cost(
            params=params,
            active_params=params,
            flops_per_token=flops,
            activation_bytes_per_token=float(saved * act_bytes + 4 * fp32),
            kv_bytes_per_token=float(self.cache_values_per_token() * act_bytes),
            recomputable_bytes_per_token={"norm": float(norms)},
        )

"""FP8 GEMMs with fine-grained scaling: the forward and both backward products of a linear layer, grouped by expert.

Shape suffixes: R rows (tokens, sorted by expert), K reduction dim of the forward GEMM, N output dim, E experts
(1 for a dense layer: the dense GEMM is the one-expert case, so the recipe below is written once).

Per linear layer (DeepSeek-V3 report §3.3, Fig. 7), with B the block size::

    forward  y  [R, N] = x  [R, K] @ W[e]^T      x per 1 x B tiles along K,   W per B x B blocks
    dgrad    dX [R, K] = dY [R, N] @ W[e]        dY per 1 x B tiles along N,  W's blocks (transposed)
    wgrad    dW [e]    = dY_e^T @ X_e            dY and X per B x 1 tiles along the tokens of expert e

Each product accumulates in float32 with a promotion at least every B elements of its reduction dim. Two back ends
compute the same products from the same E4M3 operands:

* ``scaled_mm``: one rowwise-scaled ``torch._scaled_mm`` per B-wide K chunk, summed in float32 (a B x B weight
  block's scale is the same for the B rows it covers, so per chunk it is a row scale). The chunk loop *is* the
  promotion: each chunk's partial sum is scaled and added in float32, as on DeepSeek's CUDA cores.
* ``dequant``: the E4M3 values times their scales as float32 (exact: a 4-bit mantissa times a float32 scale), then
  one float32 GEMM (``torch._grouped_mm`` for the experts where the build supports it). Only the float32
  rounding of the sums differs from ``scaled_mm``.

The weight-gradient GEMM reduces over tokens, a run-time count: each expert's run of rows is padded with zeros to a
multiple of B (vectorised: one ``index_copy``), so no B x 1 tile straddles two experts and the last one is whole.
The master weight, its gradient and the output stay in higher precision: y and dX in the input's dtype, dW in the
weight's dtype (under ``torch.autocast`` x arrives as bfloat16 while W is float32; autocast is off inside).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .quant import QTensor, quantize

__all__ = ["Backend", "FP8Recipe", "fp8_grouped", "fp8_linear", "grouped_mm_ok", "resolve_backend"]

Backend = Literal["scaled_mm", "dequant"]


@dataclass(frozen=True)
class FP8Recipe:
    """How one GEMM quantises its operands.

    Attributes:
        block_size: B, the tile width along K and the accumulation chunk.
        tensorwise: one scale per tensor (per expert matrix for stacked weights) instead of tiles.
        pow2: round every scale up to a power of two.
        backend: ``scaled_mm`` or ``dequant`` (already resolved, see :func:`resolve_backend`).
    """

    block_size: int = 128
    tensorwise: bool = False
    pow2: bool = False
    backend: Backend = "dequant"

    def act(self, x: torch.Tensor) -> QTensor:
        """An activation or activation gradient ``[R, K]``: 1 x B tiles along K."""
        return quantize(x, None if self.tensorwise else (1, self.block_size), self.pow2)

    def weight(self, w: torch.Tensor) -> QTensor:
        """A weight ``[E, N, K]``: B x B blocks per expert."""
        return quantize(w, None if self.tensorwise else (self.block_size, self.block_size), self.pow2)

    def token_major(self, x: torch.Tensor) -> QTensor:
        """A weight-gradient input ``[R_padded, C]``: B x 1 tiles along the tokens."""
        return quantize(x, None if self.tensorwise else (self.block_size, 1), self.pow2)


def resolve_backend(gemm: str, device: torch.device) -> Backend:
    """The back end for ``gemm = auto | scaled_mm | dequant`` on ``device``.

    ``auto``: rowwise ``_scaled_mm`` on CUDA (FP8 tensor cores, sm89+), ``dequant`` elsewhere: on this CPU build
    ``_scaled_mm`` is a dequantise-then-GEMM itself, and one float32 GEMM per layer beats one call per K chunk
    (bench/bench_fp8.py measures both).
    """
    if gemm != "auto":
        return gemm  # type: ignore[return-value]
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        return "scaled_mm"
    return "dequant"


def grouped_mm_ok(*tensors: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these float32 operands on this build (CPU float32, 16-byte strides).

    Not while torch.compile traces: its meta function (torch 2.13) takes BF16 only and raises on float32.
    """
    if not hasattr(torch, "_grouped_mm") or torch.compiler.is_compiling():
        return False
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and all(
        s % 4 == 0 for t in tensors for s in t.shape[-2:]
    )


# ----------------------------------------------------------------------------------------------------------------
# the two back ends of one product: a [M, C] @ b [N, C]^T over a reduction dim C, float32 out
# ----------------------------------------------------------------------------------------------------------------
def _scaled_mm_chunks(
    a_MC: torch.Tensor, sa_MJ: torch.Tensor, b_NC: torch.Tensor, sb_NJ: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``sum_j (a_j * sa_j) @ (b_j * sb_j)^T`` over ``chunk``-wide slices j of C, one ``_scaled_mm`` each.

    a and b are E4M3, row-major (so ``b[:, j].t()`` is the column-major operand ``_scaled_mm`` wants); ``sa``
    and ``sb`` hold each row's scale per chunk.
    """
    M, C = a_MC.shape
    N = b_NC.shape[0]
    out = torch.zeros(M, N, dtype=torch.float32, device=a_MC.device)
    if M == 0 or N == 0:
        return out
    for j in range(math.ceil(C / chunk)):
        cols = slice(j * chunk, (j + 1) * chunk)
        out += torch._scaled_mm(
            a_MC[:, cols],
            b_NC[:, cols].t(),
            scale_a=sa_MJ[:, j : j + 1].contiguous(),
            scale_b=sb_NJ[:, j].reshape(1, N).contiguous(),
            out_dtype=torch.float32,
        )
    return out


def _grouped_rows(a: QTensor, b: QTensor, load_E: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """``y[r] = a[r] @ b[e(r)]^T`` for a ``[R, C]`` (rows sorted by expert) and b ``[E, N, C]``; float32 ``[R, N]``."""
    E = b.data.shape[0]
    R, N = a.data.shape[0], b.data.shape[1]
    if recipe.backend == "dequant":
        a_RC, b_ENC = a.dequantize(), b.dequantize()
        if E == 1:
            return a_RC @ b_ENC[0].t()
        if grouped_mm_ok(a_RC, b_ENC):
            offs_E = torch.cumsum(load_E, dim=0, dtype=torch.int32)
            return torch._grouped_mm(a_RC, b_ENC.transpose(-2, -1), offs=offs_E)
        return torch.cat([x @ w.t() for x, w in zip(a_RC.split(load_E.tolist()), b_ENC.unbind(0), strict=True)])
    B = recipe.block_size
    sa_RJ = a.row_scales(B)
    sb_ENJ = b.row_scales(B)
    a_RC, b_ENC = a.data.contiguous(), b.data.contiguous()
    if E == 1:
        return _scaled_mm_chunks(a_RC, sa_RJ, b_ENC[0], sb_ENJ[0], B)
    sizes = load_E.tolist()
    parts = [
        _scaled_mm_chunks(x, s, b_ENC[e], sb_ENJ[e], B)
        for e, (x, s) in enumerate(zip(a_RC.split(sizes), sa_RJ.split(sizes), strict=True))
    ]
    return torch.cat(parts) if parts else a_RC.new_zeros(R, N, dtype=torch.float32)


def _pad_expert_runs(t_RC: torch.Tensor, load_E: torch.Tensor, B: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert's rows padded with zero rows to a multiple of B: ``(t [P, C] float32, padded_load_E)``.

    Expert e's run starts at a multiple of B, so B-row tiles never straddle two experts. P is a bound known
    without reading ``load_E`` on the host (``R + E * (B - 1)`` rows, the tail all zeros; one expert: R rounded
    up to B), so the padding costs no device-to-host sync.
    """
    R, E = t_RC.shape[0], load_E.numel()
    padded_E = (load_E + B - 1) // B * B
    total = -(-R // B) * B if E == 1 else -(-(R + E * (B - 1)) // B) * B
    out = torch.zeros(total, t_RC.shape[1], dtype=torch.float32, device=t_RC.device)
    if E == 1:
        out[:R] = t_RC
        return out, padded_E
    expert_R = torch.repeat_interleave(torch.arange(E, device=load_E.device), load_E, output_size=R)
    shift_E = torch.cumsum(padded_E - load_E, dim=0) - (padded_E - load_E)  # zero rows inserted before expert e
    dest_R = torch.arange(R, device=t_RC.device) + shift_E[expert_R]
    return out.index_copy_(0, dest_R, t_RC.float()), padded_E


def _padded_sizes(padded_E: torch.Tensor, total: int) -> list[int]:
    """The padded runs' lengths and the zero tail's (for ``split``; one host sync)."""
    sizes = padded_E.tolist()
    return [*sizes, total - sum(sizes)]


def _grouped_wgrad(dy_RN: torch.Tensor, x_RK: torch.Tensor, load_E: torch.Tensor, recipe: FP8Recipe) -> torch.Tensor:
    """``dW[e] = dY_e^T @ X_e`` with B x 1 tiles along each expert's (padded) tokens; float32 ``[E, N, K]``."""
    B = recipe.block_size
    dy_PN, padded_E = _pad_expert_runs(dy_RN, load_E, B)
    x_PK, _ = _pad_expert_runs(x_RK, load_E, B)
    qdy, qx = recipe.token_major(dy_PN), recipe.token_major(x_PK)
    E, N, K, P = load_E.numel(), dy_RN.shape[1], x_RK.shape[1], dy_PN.shape[0]
    if recipe.backend == "dequant":
        dyT_NP, x_PK = qdy.dequantize().t().contiguous(), qx.dequantize()
        if E == 1:
            return (dyT_NP @ x_PK).unsqueeze(0)
        if grouped_mm_ok(dyT_NP, x_PK):  # rows past the last offset (the zero tail) are not read
            offs_E = torch.cumsum(padded_E, dim=0, dtype=torch.int32)
            return torch._grouped_mm(dyT_NP, x_PK, offs=offs_E)
        sizes = _padded_sizes(padded_E, P)
        pairs = zip(dyT_NP.split(sizes, dim=1)[:E], x_PK.split(sizes)[:E], strict=True)
        return torch.stack([d @ x for d, x in pairs]).reshape(E, N, K)
    # scaled_mm: both operands token-major in [rows, tokens] layout; chunks of B tokens never cross an expert
    dyT, xT = qdy.t(), qx.t()
    sdy_NJ, sx_KJ = dyT.row_scales(B), xT.row_scales(B)
    dy_NP, x_KP = dyT.data.contiguous(), xT.data.contiguous()
    out = []
    start = 0
    for size in _padded_sizes(padded_E, P)[:E]:
        cols, blocks = slice(start, start + size), slice(start // B, (start + size) // B)
        out.append(_scaled_mm_chunks(dy_NP[:, cols], sdy_NJ[:, blocks], x_KP[:, cols], sx_KJ[:, blocks], B))
        start += size
    return torch.stack(out)


# ----------------------------------------------------------------------------------------------------------------
# the autograd Function (one for dense and grouped layers)
# ----------------------------------------------------------------------------------------------------------------
#: ``count(n_gemms, backward)``, called once by the forward and once by the backward
GemmCounter = Callable[[int, bool], None]


class _FP8GroupedGEMM(torch.autograd.Function):
    """``y[r] = x[r] @ W[e(r)]^T`` with E4M3 operands in all three GEMMs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_RK, w_ENK, load_E, recipe: FP8Recipe, count: GemmCounter | None):  # noqa: D417
        with torch.autocast(x_RK.device.type, enabled=False):
            qw = recipe.weight(w_ENK)
            y_RN = _grouped_rows(recipe.act(x_RK), qw, load_E, recipe)
        ctx.save_for_backward(x_RK, load_E, qw.data, qw.scale)
        ctx.tile, ctx.recipe, ctx.count, ctx.w_dtype = qw.tile, recipe, count, w_ENK.dtype
        if count is not None:
            count(1, False)
        return y_RN.to(x_RK.dtype)

    @staticmethod
    def backward(ctx, dy_RN):
        x_RK, load_E, w_data, w_scale = ctx.saved_tensors
        recipe: FP8Recipe = ctx.recipe
        dx = dw = None
        with torch.autocast(dy_RN.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                # dgrad: the reduction is along N; W's B x B blocks serve transposed (no re-quantisation)
                w_T = QTensor(w_data, w_scale, ctx.tile).t()
                dx = _grouped_rows(recipe.act(dy_RN), w_T, load_E, recipe).to(x_RK.dtype)
            if ctx.needs_input_grad[1]:
                dw = _grouped_wgrad(dy_RN, x_RK, load_E, recipe).to(ctx.w_dtype)
        if ctx.count is not None:
            ctx.count(int(dx is not None) + int(dw is not None), True)
        return dx, dw, None, None, None


def fp8_grouped(
    x_RK: torch.Tensor, w_ENK: torch.Tensor, load_E: torch.Tensor, recipe: FP8Recipe, count: GemmCounter | None = None
) -> torch.Tensor:
    """The FP8 grouped GEMM over rows sorted by expert (expert e owns the next ``load_E[e]`` rows): ``[R, N]``."""
    return _FP8GroupedGEMM.apply(x_RK, w_ENK, load_E.to(torch.long), recipe, count)


def fp8_linear(
    x: torch.Tensor, w_NK: torch.Tensor, recipe: FP8Recipe, count: GemmCounter | None = None
) -> torch.Tensor:
    """``x [..., K] @ w[N, K]^T -> [..., N]`` with FP8 GEMMs: the grouped GEMM with one expert."""
    x_RK = x.reshape(-1, x.shape[-1])
    load_E = torch.tensor([x_RK.shape[0]], dtype=torch.long, device=x.device)
    y_RN = _FP8GroupedGEMM.apply(x_RK, w_NK.unsqueeze(0), load_E, recipe, count)
    return y_RN.reshape(*x.shape[:-1], w_NK.shape[0])

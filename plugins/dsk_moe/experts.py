"""SwiGLU MLPs: the dense FFN, the fused shared experts and the stacked routed experts with grouped GEMMs.

Shape suffixes: N tokens, D model dim, H hidden width, E routed experts, R routed token slots (N * K) sorted by
expert.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dsk.api import SHARDED_PARAM, Cost, ModelContext
from dsk.api.runtime import PLAIN_LINEAR, LinearSite, cpu_kernel_supports, recomputable

from . import kernels
from .config import DenseConfig

__all__ = ["SwiGLU", "Dense", "RoutedExperts", "grouped_mm_supported"]

Dispatch = Literal["cpu_kernel", "grouped_mm", "loop_slices", "auto"]
Resolved = Literal["cpu_kernel", "grouped_mm", "loop_slices", "linear_impl"]

# "auto" takes the CPU kernel while experts average at most this many rows: below it, splitting the experts over
# the threads beats splitting each GEMM (bench/bench_moe.py: 1.2-2x at 64 experts with 64-192 rows each); with a
# few large experts (8 experts x 512 rows) ATen's multi-threaded GEMMs win.
CPU_KERNEL_MAX_MEAN_ROWS = 384


class _SwiGLU(torch.autograd.Function):
    """``silu(gate) * up * scale`` keeping only its inputs for the backward, which recomputes ``sigmoid(gate)``.

    Autograd's composition would also keep ``silu(gate)`` (an [R, H] tensor per layer, as large as ``up``); one
    sigmoid in the backward costs less than holding it from the forward to the backward.
    """

    @staticmethod
    def forward(ctx, gate, up, scale):  # type: ignore[override]
        ctx.save_for_backward(gate, up, scale)
        return F.silu(gate) * (up if scale is None else up * scale)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        gate, up, scale = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        scaled_up = up if scale is None else up * scale
        d_gate = grad * scaled_up * (sig * (1 + gate * (1 - sig))) if ctx.needs_input_grad[0] else None
        d_silu = grad * silu
        d_up = (d_silu if scale is None else d_silu * scale) if ctx.needs_input_grad[1] else None
        d_scale = (d_silu * up).sum(-1, keepdim=True) if scale is not None and ctx.needs_input_grad[2] else None
        return d_gate, d_up, d_scale


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`swiglu` by PyTorch ops, whatever the tensors (the path the CPU kernel is tested against): under autograd
    one node that keeps only ``gate``, ``up`` and ``scale`` (:class:`_SwiGLU`)."""
    if scale is not None and scale.dim() == up.dim() - 1:
        scale = scale.unsqueeze(-1)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (gate, up, scale)):
        return _SwiGLU.apply(gate, up, scale)
    return F.silu(gate) * (up if scale is None else up * scale)


class _SwiGLUKernel(torch.autograd.Function):
    """The CPU kernel as an autograd node: over the rows [R, H] of the gate and of up (any row stride), or over
    ``gu = [gate | up]`` [R, 2H] when ``up`` is None, and a scale [R] (or empty). It keeps its inputs; the backward
    is one pass that recomputes ``sigmoid(gate)`` and writes both gradients, for ``gu`` into one [R, 2H] tensor, so
    that the gradient of a stacked GEMM's output needs no concatenation of its halves."""

    @staticmethod
    def forward(ctx, gate, up, scale_R):  # type: ignore[override]
        ctx.save_for_backward(gate, up, scale_R)
        return kernels.EXTENSION.load().swiglu_forward(*_halves(gate, up), scale_R)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_RH):  # type: ignore[override]
        gate, up, scale_R = ctx.saved_tensors
        g, u = _halves(gate, up)
        d_first = torch.empty_like(gate, memory_format=torch.contiguous_format)
        d_gate, d_up = _halves(d_first, None) if up is None else (d_first, gate.new_empty(u.shape))
        d_scale = kernels.EXTENSION.load().swiglu_backward(grad_RH.contiguous(), g, u, scale_R, d_gate, d_up)
        return d_first, (None if up is None else d_up), (d_scale if ctx.needs_input_grad[2] else None)


def _halves(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if up is not None:
        return gate, up
    H = gate.shape[1] // 2
    return gate[:, :H], gate[:, H:]


def _swiglu_kernel(gate: torch.Tensor, up: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    """The kernel's result [R, H] for rows [R, H] of the gate and of up, or of ``gu`` [R, 2H] when ``up`` is None;
    None where it cannot run (then the caller runs :func:`swiglu_torch`): plain float32/float64 CPU tensors with
    unit stride along a row, a scale with one value per row."""
    rows = gate.shape[0]
    flat = scale.reshape(-1) if scale is not None else None
    if gate.shape[1] == 0 or (flat is not None and flat.numel() != rows):
        return None
    tensors = [t for t in (gate, up, flat) if t is not None]
    if not cpu_kernel_supports(*tensors) or kernels.EXTENSION.load() is None:
        return None
    if gate.stride(-1) != 1 or (up is not None and up.stride(-1) != 1):
        return None
    flat = flat.contiguous() if flat is not None else gate.new_empty(0)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SwiGLUKernel.apply(gate, up, flat)
    return kernels.EXTENSION.load().swiglu_forward(*_halves(gate, up), flat)


def swiglu(gate: torch.Tensor, up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up`` (times a per-row ``scale [R]`` or ``[R, 1]`` when given): the SwiGLU activation.

    Plain float32/float64 CPU tensors take the CPU kernel (:mod:`dsk_moe.kernels`: one pass each way, where ATen's
    composition takes ~3 forward and ~10 backward); anything else :func:`swiglu_torch`. Either way the node keeps
    only its inputs.
    """
    H = gate.shape[-1]
    out = None
    if gate.dim() >= 1 and up.shape == gate.shape:
        out = _swiglu_kernel(gate.reshape(-1, H), up.reshape(-1, H), scale)
    return swiglu_torch(gate, up, scale) if out is None else out.view(gate.shape)


def swiglu_stacked(gu: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`swiglu` of the stacked pre-activations ``gu = [gate | up]`` [..., 2H], as one GEMM over the stacked
    gate and up weights produces them; -> [..., H]. With the kernel, the gradient of ``gu`` comes as one tensor
    (no concatenation of the halves' gradients)."""
    out = None
    if gu.dim() >= 1 and gu.shape[-1] % 2 == 0:
        out = _swiglu_kernel(gu.reshape(-1, gu.shape[-1]), None, scale)
    if out is None:
        gate, up = gu.chunk(2, dim=-1)
        return swiglu_torch(gate, up, scale)
    return out.view(*gu.shape[:-1], gu.shape[-1] // 2)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with HF names ``gate_proj / up_proj / down_proj`` (reference w1 / w3 / w2).

    Its two GEMMs (gate and up stacked into one, then down) run through ``linear_impl``
    (:class:`dsk.api.LinearLayers`); the activation is the region ``"ffn.activation"``.
    """

    linear_impl = PLAIN_LINEAR
    #: the config key of the hidden width, for messages about the down projection's K (set by subclasses)
    hidden_key = "ffn.expert_hidden_dim"

    def __init__(self, dim: int, hidden_dim: int, init_std: float = 0.02):
        super().__init__()
        self.dim, self.hidden_dim = dim, hidden_dim
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., D]."""
        # gate and up as one GEMM over the stacked weights (one pass over x, one wider product, one dX GEMM in
        # the backward); the parameters stay separate under their HF names
        lin = self.linear_impl.linear
        gu = lin(x, torch.cat((self.gate_proj.weight, self.up_proj.weight)), "gate_up")
        h = recomputable("ffn.activation", swiglu_stacked, gu)
        return lin(h, self.down_proj.weight, "down_proj")

    def linear_sites(self) -> list[LinearSite]:
        """The stacked gate/up GEMM and the down projection."""
        return [
            LinearSite("gate_up", 2 * self.hidden_dim, self.dim, "dim"),
            LinearSite("down_proj", self.dim, self.hidden_dim, self.hidden_key),
        ]


class Dense(SwiGLU):
    """Dense FFN component (``ffn`` kind, name ``dense``): one SwiGLU of ``hidden_dim``; forward [B,T,D] -> [B,T,D]."""

    hidden_key = "dense_ffn.hidden_dim"

    def __init__(self, cfg: DenseConfig, ctx: ModelContext):
        super().__init__(ctx.dim, cfg.hidden_dim, ctx.init_std)
        self.cfg = cfg

    def cost(self, seq_len: int, act_bytes: int = 2) -> Cost:
        """Parameters, forward FLOPs and saved activations per token (:class:`dsk.api.CostModel`): three GEMMs of
        D x hidden (6 * D * hidden FLOPs); the backward keeps x, gate, up and the activation (D + 3 * hidden
        values). ``seq_len`` does not matter to a position-wise layer. Recomputing ``"ffn.activation"`` frees the
        activation (``down_proj``'s input); its inputs, gate and up, stay."""
        D, H = self.dim, self.hidden_dim
        return Cost(
            params=3 * D * H,
            active_params=3 * D * H,
            flops_per_token=6.0 * D * H,
            activation_bytes_per_token=float((D + 3 * H) * act_bytes),
            recomputable_bytes_per_token={"ffn.activation": float(H * act_bytes)},
        )


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether ``torch._grouped_mm`` runs ``x @ w[e]`` for these tensors on this build (no trial call).

    As of torch 2.13: the CPU kernel takes float32/bfloat16/float16 (not float64); the CUDA kernel takes bfloat16
    on sm90+ (Hopper). Both need every operand's leading stride to be a multiple of 16 bytes, i.e. D and H
    multiples of 4 in fp32, 8 in bf16. All operands must share x's dtype (no mixed precision inside the kernel),
    unless ``dtype`` is given: the dtype every operand is cast to first (autocast's compute dtype).
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((dtype is None and w.dtype != x.dtype) or w.device != x.device for w in weights):
        return False
    dtype = x.dtype if dtype is None else dtype
    if dtype != torch.bfloat16 and torch.compiler.is_compiling():
        # torch.compile traces with fake tensors, and _grouped_mm's meta function (torch 2.13) takes BF16 only:
        # "Expected inputs of BF16 type but got mat_a.dtype=torch.float32 and mat_b.dtype=torch.float32"
        return False
    if x.device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
    elif x.device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    else:
        return False
    align = 16 // dtype.itemsize
    return all(s % align == 0 for w in weights for s in w.shape[-2:])


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast would run a linear layer on ``x`` in, or None where autocast leaves ``x`` alone.

    ``torch._grouped_mm`` and the C++ kernels are not on autocast's lists, so the experts cast their operands
    themselves (as autocast does for ``F.linear``); float64 is never cast (autocast leaves it too).
    """
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    dtype = torch.get_autocast_dtype(device)
    return dtype if dtype != torch.float32 else None


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked 3-D parameters, run over tokens already sorted by expert.

    Parameters; slice ``[j]`` is expert j's HF ``nn.Linear`` weight (layout [out, in]) under its on-disk name:

    * ``w_gate [E, H, D]``: ``mlp.experts.{j}.gate_proj.weight`` (reference ``w1``)
    * ``w_up [E, H, D]``: ``mlp.experts.{j}.up_proj.weight`` (reference ``w3``)
    * ``w_down [E, D, H]``: ``mlp.experts.{j}.down_proj.weight`` (reference ``w2``)

    HF v5 in memory fuses ``gate_up_proj [E, 2H, D] = cat(w_gate, w_up, dim=1)`` and ``down_proj = w_down``.
    :func:`dsk_moe.moe.hf_to_dsk` / :func:`dsk_moe.moe.dsk_to_hf` convert the on-disk names.

    A ``linear_impl`` that replaces grouped GEMMs (:attr:`dsk.api.runtime.LinearImpl.replaces_grouped`, e.g. FP8)
    takes precedence over every dispatch path: the experts then run its grouped GEMMs, the activation between them.
    """

    linear_impl = PLAIN_LINEAR

    def __init__(self, n_experts: int, dim: int, hidden_dim: int, init_std: float = 0.02):
        super().__init__()
        self.n_experts, self.dim, self.hidden_dim = n_experts, dim, hidden_dim
        self.w_gate = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_up = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w_down = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, mean=0.0, std=init_std)

    def keep_experts(self, start: int, stop: int) -> None:
        """Keep experts ``start:stop`` only (an expert-parallel shard): each stacked parameter becomes a new
        ``nn.Parameter`` holding that slice, marked :data:`dsk.api.SHARDED_PARAM`, and :attr:`n_experts` the local
        count. Expert ``start + j`` of the layer is then local expert j."""
        if not 0 <= start < stop <= self.n_experts:
            raise ValueError(f"experts {start}:{stop} are not a slice of the layer's {self.n_experts} experts")
        for name in ("w_gate", "w_up", "w_down"):
            old = getattr(self, name)
            shard = nn.Parameter(old.detach()[start:stop].clone(), requires_grad=old.requires_grad)
            setattr(shard, SHARDED_PARAM, True)
            setattr(self, name, shard)
        self.n_experts = stop - start

    def resolve_dispatch(self, x_RD: torch.Tensor, dispatch: Dispatch, n_rows: int | None = None) -> Resolved:
        """The GEMM path for these inputs.

        ``auto`` takes the CPU kernel (:mod:`dsk_moe.kernels`) for float32/float64 on CPU while the experts
        average at most ``CPU_KERNEL_MAX_MEAN_ROWS`` rows and the kernel is built, else ``torch._grouped_mm``
        where supported (no host sync, 3 autograd nodes instead of 3 * E), else one matmul per expert slice.
        Forcing a path the inputs cannot take raises a ValueError naming ``ffn.dispatch``. ``n_rows`` is the
        number of routed rows when ``x_RD`` is not them (the MoE layer passes its tokens and N * K).
        """
        params = (self.w_gate, self.w_up, self.w_down)
        if self.linear_impl.replaces_grouped:
            return "linear_impl"
        cast = autocast_dtype(x_RD)  # under BF16 autocast the GEMMs run in BF16: not the fp32 CPU kernel
        if dispatch == "cpu_kernel":
            if cast is not None or not cpu_kernel_supports(x_RD, *params):
                raise ValueError(
                    f"ffn.dispatch = 'cpu_kernel': the CPU expert kernel runs float32/float64 on cpu, not "
                    f"{cast or x_RD.dtype} on {x_RD.device.type} (plain tensors, not DTensors, outside autocast); "
                    "use dispatch = 'auto'"
                )
            if kernels.EXTENSION.load() is None:
                raise ValueError(f"ffn.dispatch = 'cpu_kernel': {kernels.EXTENSION.status()}; use dispatch = 'auto'")
            return "cpu_kernel"
        if dispatch == "grouped_mm":
            if not grouped_mm_supported(x_RD, *params, dtype=cast):
                raise ValueError(
                    f"ffn.dispatch = 'grouped_mm': torch._grouped_mm does not support {x_RD.dtype} on "
                    f"{x_RD.device.type} with dim = {self.dim}, expert_hidden_dim = {self.hidden_dim} "
                    "(needs cpu float32/bf16/fp16 or cuda bf16 on sm90+, sizes a multiple of 16 bytes); "
                    "use dispatch = 'auto' or 'loop_slices'"
                )
            return "grouped_mm"
        if dispatch == "auto":
            rows = x_RD.shape[0] if n_rows is None else n_rows
            few_rows = rows <= CPU_KERNEL_MAX_MEAN_ROWS * self.n_experts
            if (
                cast is None
                and few_rows
                and cpu_kernel_supports(x_RD, *params)
                and kernels.EXTENSION.load() is not None
            ):
                return "cpu_kernel"
            if grouped_mm_supported(x_RD, *params, dtype=cast):
                return "grouped_mm"
        return "loop_slices"

    def forward(
        self,
        x_RD: torch.Tensor,
        load_E: torch.Tensor,
        scale_R: torch.Tensor | None = None,
        dispatch: Dispatch = "auto",
    ) -> torch.Tensor:
        """Apply expert e to its contiguous slice of rows, optionally scaling each row's output.

        Args:
            x_RD: token slots sorted by expert id [R, D]; expert e owns rows ``sum(load[:e]) ... sum(load[:e+1])``.
            load_E: rows per expert [E] (long).
            scale_R: per-row factor (the routing weight) or None. It multiplies the hidden activation before
                the down projection, which is linear, so the result equals scaling the output at H/D the cost.
            dispatch: ``cpu_kernel``, ``grouped_mm``, ``loop_slices`` or ``auto`` (see :meth:`resolve_dispatch`).

        Returns:
            expert outputs [R, D], in the same row order.
        """
        path = self.resolve_dispatch(x_RD, dispatch)
        if path == "cpu_kernel":
            return kernels.experts_cpu(x_RD, load_E, self.w_gate, self.w_up, self.w_down, scale_R)
        if path == "grouped_mm":
            return self._grouped(x_RD, load_E, scale_R)
        if path == "linear_impl":
            return self._through_impl(x_RD, load_E, scale_R)
        return self._loop_slices(x_RD, load_E, scale_R)

    def linear_sites(self) -> list[LinearSite]:
        """The stacked gate/up grouped GEMM and the down projection, per expert ``[N, K]``."""
        E, D, H = self.n_experts, self.dim, self.hidden_dim
        return [
            LinearSite("w_gate_up", 2 * H, D, "dim", grouped=True, n_groups=E),
            LinearSite("w_down", D, H, "ffn.expert_hidden_dim", grouped=True, n_groups=E),
        ]

    def _through_impl(self, x_RD: torch.Tensor, load_E: torch.Tensor, scale_R: torch.Tensor | None) -> torch.Tensor:
        # gate and up stacked per expert: one grouped GEMM over [E, 2H, D], then the activation, then down
        impl = self.linear_impl
        gu_R2H = impl.grouped(x_RD, torch.cat((self.w_gate, self.w_up), dim=1), load_E, "w_gate_up")
        h_RH = recomputable("ffn.activation", swiglu_stacked, gu_R2H, scale_R)
        return impl.grouped(h_RH, self.w_down, load_E, "w_down")

    def _grouped(self, x_RD: torch.Tensor, load_E: torch.Tensor, scale_R: torch.Tensor | None) -> torch.Tensor:
        # One grouped GEMM per projection, no host sync: offs are the end rows of each expert's slice.
        offs_E = torch.cumsum(load_E, dim=0, dtype=torch.int32)
        w_gate, w_up, w_down = self.w_gate, self.w_up, self.w_down
        cast = autocast_dtype(x_RD)
        if cast is not None:  # autocast does not cover _grouped_mm: cast like it casts F.linear's operands
            x_RD, w_gate, w_up, w_down = (t.to(cast) for t in (x_RD, w_gate, w_up, w_down))
            scale_R = scale_R.to(cast) if scale_R is not None else None
        x_RD = x_RD.contiguous()
        # w[E, out, in].transpose -> [E, in, out] column-major view, the layout _grouped_mm expects (no copy). Gate
        # and up stay two GEMMs: stacking them would copy the experts' weights ([E, 2H, D]) and keep the copy for the
        # backward
        gate_RH = torch._grouped_mm(x_RD, w_gate.transpose(-2, -1), offs=offs_E)
        up_RH = torch._grouped_mm(x_RD, w_up.transpose(-2, -1), offs=offs_E)
        h_RH = recomputable("ffn.activation", swiglu, gate_RH, up_RH, scale_R)
        return torch._grouped_mm(h_RH, w_down.transpose(-2, -1), offs=offs_E)

    def _loop_slices(self, x_RD: torch.Tensor, load_E: torch.Tensor, scale_R: torch.Tensor | None) -> torch.Tensor:
        # The fallback: one matmul per expert on its contiguous slice; one host sync for the slice sizes.
        sizes = load_E.tolist()
        # unbind once: indexing w[e] per expert would make autograd build E full-size [E, H, D] gradient buffers.
        weights = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0), strict=True)
        scales = scale_R.unsqueeze(-1).split(sizes) if scale_R is not None else [None] * len(sizes)
        outs = []
        for x, s, (wg, wu, wd) in zip(x_RD.split(sizes), scales, weights, strict=True):
            if x.shape[0] == 0:
                continue
            up, gate = F.linear(x, wu), F.linear(x, wg)
            h = recomputable("ffn.activation", swiglu, gate, up, s)
            outs.append(F.linear(h, wd))
        if not outs:
            return x_RD.new_zeros(0, self.dim)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

"""dsk's CPU kernels (``csrc/cpu_kernels.cpp``): build on first use, BLAS wiring, autograd functions.

Four kernels, each with a pure-PyTorch path the callers fall back to:

* :func:`routed_experts`: the routed experts of a DeepSeekMoE layer. On CPU they are many small GEMMs; ATen runs
  them one after another and splits each over the threads, where CPU BLAS is least efficient. The kernel splits
  the *experts* over the threads instead, runs each expert's GEMMs single-threaded with the SwiGLU fused in
  between, and gathers / combines the token rows itself (``bench/bench_moe.py`` measures the gain).
* :func:`rms_norm`: RMSNorm forward and backward in one pass each, where ATen's composition is ~8 element-wise
  kernels forward and ~12 backward.
* :func:`mla_attention`: MLA's causal attention core for short sequences, one (batch, head) per task with its
  scores in cache, the rope key shared by the heads (no concatenation, no per-head copy), operands read through
  their strides and the output written in the layout the output projection reads.
* :func:`route_topk`: the router's group-limited top-k and the sort of the routed slots by expert, one pass over
  the tokens where the PyTorch path takes ~15 small kernels (bias add, group scores, two topk, masks, argsort).

The extension is compiled once per machine with ``torch.utils.cpp_extension.load`` (about 30 s; cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) the first time a kernel is needed, or ahead of
time with ``python -m dsk.kernels`` (``make setup`` does this). It needs a C++ compiler with OpenMP and ``ninja``;
where it cannot be built, or ``DSK_CPU_KERNELS=0`` is set, :func:`load` returns None, says why once in a warning
and in :func:`status`, and the callers use their PyTorch paths.

GEMMs go straight to the BLAS that torch links (``sgemm_`` / ``dgemm_`` of MKL in the x86 wheels, found with
ctypes in ``libtorch_cpu``); without those symbols the kernel calls ATen's ``mm`` on views, which is correct but
pays the dispatcher per call.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "load",
    "status",
    "supports",
    "routed_experts",
    "experts_cpu",
    "rms_norm",
    "route_topk",
    "route_weights",
    "mla_attention",
    "pin_malloc_thresholds",
]

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_NAME = "dsk_cpu_kernels"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _disabled_reason() -> str | None:
    flag = os.environ.get("DSK_CPU_KERNELS", "1").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return "disabled by DSK_CPU_KERNELS=0"
    if not _SOURCE.is_file():
        return f"kernel source {_SOURCE} is missing"
    return None


def _blas_pointers() -> tuple[int, int, int]:
    """Addresses of ``sgemm_``, ``dgemm_`` and MKL's per-thread thread-count setter in libtorch_cpu (0 if absent)."""
    lib_dir = Path(torch.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libtorch_cpu.*"))
    if not candidates:
        return 0, 0, 0
    try:
        lib = ctypes.CDLL(str(candidates[0]))
    except OSError:
        return 0, 0, 0

    def address(name: str) -> int:
        try:
            return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0
        except AttributeError:
            return 0

    sgemm, dgemm = address("sgemm_"), address("dgemm_")
    if not (sgemm and dgemm):
        return 0, 0, 0
    # The C entry point (int by value); the lower-case one is MKL's Fortran binding and takes a pointer.
    return sgemm, dgemm, address("MKL_Set_Num_Threads_Local")


def _build(verbose: bool = False) -> ModuleType:
    from torch.utils.cpp_extension import load as load_extension

    if shutil.which("ninja") is None:
        # torch runs `ninja` from PATH; the pip package's binary sits in the environment's bin dir, which is not on
        # PATH when the interpreter is called by its path (.venv/bin/python -m pytest)
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass

    flags = ["-O3", "-fopenmp"]  # OpenMP: ATen's parallel_for is inline and needs it in this translation unit
    module = load_extension(
        name=_NAME,
        sources=[str(_SOURCE)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        verbose=verbose,
    )
    module.set_blas(*_blas_pointers())
    return module


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it on first call; None (with a one-time warning) when unavailable."""
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        reason = _disabled_reason()
        module = None
        if reason is None:
            try:
                module = _build(verbose)
            except Exception as exc:  # no compiler, no ninja, no OpenMP: fall back, say why
                reason = f"could not build the CPU kernels ({type(exc).__name__}: {str(exc).strip()[:300]})"
        if module is None and reason and not reason.startswith("disabled"):
            warnings.warn(f"dsk.kernels: {reason}; using the PyTorch paths", stacklevel=2)
        _state["module"], _state["reason"] = module, reason
        return module


def status() -> str:
    """One line: whether the kernel is in use, with which GEMM backend, or why not (builds it if needed)."""
    module = load()
    if module is None:
        return f"unavailable: {_state.get('reason')}"
    return "available, GEMMs by " + ("BLAS sgemm_/dgemm_" if module.has_blas() else "ATen mm (no BLAS symbols)")


def supports(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the kernels take ``x`` with these weights (CPU, float32/float64, one dtype); does not build."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and all(w.device.type == "cpu" and w.dtype == x.dtype for w in weights)
        and _disabled_reason() is None
    )


class _RoutedExperts(torch.autograd.Function):
    """The kernel as an autograd node; the backward recomputes the activation from the saved pre-activations."""

    @staticmethod
    def forward(ctx, x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, k):  # type: ignore[override]
        module = _state["module"]
        y_ND, gu_R2H = module.experts_forward(x_ND, order_R, starts_E1, k, weight_S, w_gate, w_up, w_down)
        ctx.save_for_backward(x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, gu_R2H)
        ctx.k = k
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):  # type: ignore[override]
        x_ND, weight_S, w_gate, w_up, w_down, order_R, starts_E1, gu_R2H = ctx.saved_tensors
        module = _state["module"]
        dx, dw_gate, dw_up, dw_down, dweight = module.experts_backward(
            dy_ND.contiguous(), x_ND, gu_R2H, order_R, starts_E1, ctx.k, weight_S, w_gate, w_up, w_down
        )
        return dx, (dweight if weight_S.numel() else None), dw_gate, dw_up, dw_down, None, None, None


def routed_experts(
    x_ND: torch.Tensor,
    weights_NK: torch.Tensor | None,
    order_R: torch.Tensor,
    load_E: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    k: int,
) -> torch.Tensor:
    """The routed part of a MoE layer: ``y[n] = sum_k weight[n, k] * expert_{idx[n, k]}(x[n])``, via the kernel.

    Args:
        x_ND: tokens [N, D].
        weights_NK: routing weights [N, K] (or None: weight 1); differentiable.
        order_R: the R routed slots (slot = n * K + k) sorted by expert; expert e owns the next ``load_E[e]``.
        load_E: slots per expert [E].
        w_gate, w_up: [E, H, D]; w_down: [E, D, H] (as :class:`dsk_moe.experts.RoutedExperts` stores them).
        k: slots per token K.

    Returns:
        y [N, D]; differentiable in x, the routing weights and the expert weights. Call :func:`load` first.
    """
    starts_E1 = torch.zeros(load_E.numel() + 1, dtype=torch.long)
    torch.cumsum(load_E.to(torch.long), dim=0, out=starts_E1[1:])
    weight_S = weights_NK.reshape(-1).contiguous() if weights_NK is not None else x_ND.new_empty(0)
    weights = (w_gate.contiguous(), w_up.contiguous(), w_down.contiguous())
    x_ND, order_R = x_ND.contiguous(), order_R.to(torch.long).contiguous()
    if not torch.is_grad_enabled() or not (
        x_ND.requires_grad or weight_S.requires_grad or any(w.requires_grad for w in weights)
    ):
        module = _state["module"]
        return module.experts_forward(x_ND, order_R, starts_E1, k, weight_S, *weights)[0]  # type: ignore[union-attr]
    return _RoutedExperts.apply(x_ND, weight_S, *weights, order_R, starts_E1, k)


def experts_cpu(
    x_RD: torch.Tensor,
    load_E: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    scale_R: torch.Tensor | None,
) -> torch.Tensor:
    """``(silu(x Wg_e^T) * x Wu_e^T * scale) Wd_e^T`` on rows already sorted by expert (:meth:`RoutedExperts.forward`).

    x [R, D] with expert e owning the next ``load_E[e]`` rows, scale [R] or None; returns [R, D] in the same order.
    """
    order_R = torch.arange(x_RD.shape[0])
    scale = scale_R.unsqueeze(-1) if scale_R is not None else None
    return routed_experts(x_RD, scale, order_R, load_E, w_gate, w_up, w_down, k=1)


def route_topk(
    scores_NE: torch.Tensor,
    bias_E: torch.Tensor | None,
    n_groups: int,
    topk_groups: int,
    top_k: int,
    top2_sum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-limited top-k of ``scores + bias`` and the stable counting sort of the slots by expert.

    Per token, with ``n_groups > 1``: the ``topk_groups`` groups of highest score (sum of the group's two best, or
    its best) are kept; then the ``top_k`` best experts among them, best first (ties: lower index first).
    Returns ``idx [N, K]`` (long), ``order [N * K]`` (slots ``n * K + k`` sorted by expert, stable, i.e.
    ``argsort(idx.flatten(), stable=True)``) and ``load [E]`` (long). No gradient. Call :func:`load` first.
    """
    bias = bias_E.float().contiguous() if bias_E is not None else scores_NE.new_empty(0, dtype=torch.float32)
    module = _state["module"]
    return tuple(  # type: ignore[return-value]
        module.route_topk(scores_NE.detach().contiguous(), bias, n_groups, topk_groups, top_k, top2_sum)
    )


class _RouteWeights(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, idx, norm, scale, alpha, n_seqs, seq_len):  # type: ignore[override]
        w, loss, den, inv_sum, f = _state["module"].route_weights_forward(
            scores, idx, norm, scale, alpha, n_seqs, seq_len
        )
        ctx.save_for_backward(scores, idx, den, inv_sum, f)
        ctx.args = (norm, scale, alpha, n_seqs, seq_len)
        return w, loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, dloss):  # type: ignore[override]
        scores, idx, den, inv_sum, f = ctx.saved_tensors
        dw = dw.contiguous() if dw is not None else torch.zeros(idx.shape, dtype=scores.dtype)
        dloss = dloss if dloss is not None else torch.zeros((), dtype=scores.dtype)
        ds = _state["module"].route_weights_backward(dw, dloss, scores, idx, den, inv_sum, f, *ctx.args)
        return ds, None, None, None, None, None, None


def route_weights(
    scores_NE: torch.Tensor,
    idx_NK: torch.Tensor,
    norm: bool,
    scale: float,
    seq_alpha: float = 0.0,
    seq_shape: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Routing weights of the selected experts and, with ``seq_alpha > 0``, the sequence-wise balance loss.

    ``w = scale * s[idx]`` (divided by ``sum_k s[idx] + 1e-20`` when ``norm``); the loss is DeepSeek-V3's
    complementary sequence-wise loss over ``seq_shape = (B, T)`` (default: one sequence of N tokens), as
    ``NoauxTCRouter.compute_balance_loss`` defines it. Differentiable in the scores. Call :func:`load` first.
    """
    n_seqs, seq_len = seq_shape if seq_shape is not None else (1, scores_NE.shape[0])
    args = (scores_NE.contiguous(), idx_NK.contiguous(), norm, float(scale), float(seq_alpha), n_seqs, seq_len)
    if torch.is_grad_enabled() and scores_NE.requires_grad:
        w, loss = _RouteWeights.apply(*args)
    else:
        w, loss = _state["module"].route_weights_forward(*args)[:2]
    return w, (loss if seq_alpha > 0 else None)


class _MLAAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, scale):  # type: ignore[override]
        o, probs = _state["module"].mla_attention_forward(q_nope, q_pe, k_nope, k_pe, v, scale)
        ctx.save_for_backward(q_nope, q_pe, k_nope, k_pe, v, probs)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):  # type: ignore[override]
        q_nope, q_pe, k_nope, k_pe, v, probs = ctx.saved_tensors
        grads = _state["module"].mla_attention_backward(
            do.contiguous(), q_nope, q_pe, k_nope, k_pe, v, probs, ctx.scale
        )
        return (*grads, None)


def mla_attention(
    q_nope: torch.Tensor, q_pe: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal MLA attention over one sequence block: ``q_nope, k_nope [B, T, H, dn], q_pe [B, T, H, dr], k_pe [B, T,
    dr]`` (the rope key shared by the heads), ``v [B, T, H, dv]`` -> ``o [B, T, H, dv]``; differentiable.

    Scores ``scale * (q_nope . k_nope + q_pe . k_pe)`` over keys ``s <= t``. Operands may be strided views (last
    dim contiguous). Keeps the [B, H, T, T] probabilities for the backward: meant for short sequences (the MLA layer
    uses it up to T = 512). Call :func:`load` first.
    """
    module = _state["module"]
    # BLAS reads each (batch, head) block as a row-major matrix: contiguous rows, rows that do not overlap
    args = [
        t if t.stride(-1) == 1 and t.stride(1) >= t.shape[-1] else t.contiguous()
        for t in (q_nope, q_pe, k_nope, k_pe, v)
    ]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in args):
        return module.mla_attention_forward(*args, scale)[0]  # type: ignore[union-attr]
    return _MLAAttention.apply(*args, scale)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_2d, weight, eps):  # type: ignore[override]
        y, rstd = _state["module"].rms_norm_forward(x_2d, weight, eps)
        ctx.save_for_backward(x_2d, weight, rstd)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # type: ignore[override]
        x_2d, weight, rstd = ctx.saved_tensors
        dx, dw = _state["module"].rms_norm_backward(dy.contiguous(), x_2d, weight, rstd)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2, -1) + eps)`` over the last dim, via the kernel; call :func:`load` first.

    x [..., D] and weight [D] float32/float64 of one dtype on CPU; differentiable in both.
    """
    x_2d = x.reshape(-1, x.shape[-1]).contiguous()
    if not torch.is_grad_enabled() or not (x.requires_grad or weight.requires_grad):
        return _state["module"].rms_norm_forward(x_2d, weight.contiguous(), eps)[0].view(x.shape)  # type: ignore[union-attr]
    return _RMSNorm.apply(x_2d, weight.contiguous(), eps).view(x.shape)


def pin_malloc_thresholds() -> bool:
    """Fix glibc malloc's mmap and trim thresholds for a training process; True when applied.

    glibc raises its mmap threshold each time a large mmapped block is freed and trims the heap top past twice
    that, so which buffers come back as fresh pages (a page fault per 4 KiB) depends on the history of frees. A
    training step allocates and frees the same large activations every step; with the thresholds pinned high
    they are reused from the heap instead. Measured on the whole-model step of ``bench/bench_model.py`` (2
    threads, separate processes): dsk 72.7 ms unpinned, 61-64 ms pinned. The benches pin it so that both sides
    of a row, which share the process, run under the same allocator policy. The cost: freed memory stays in the
    process (it is reused by the next step). ``DSK_PIN_MALLOC=0`` turns it off; other C libraries (macOS, musl)
    are left alone.
    """
    if os.environ.get("DSK_PIN_MALLOC", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))

"""MoE layer forward + backward: dsk's sorted grouped dispatch vs the per-expert loop, and vs a dense SwiGLU.

One MoE layer (noaux_tc router, 1 shared expert), float32, CPU, training mode; each timed step is forward,
``backward(grad_out)`` and the router's balance loss, on fixed inputs. Timings interleave the implementations
(dsk, peer, dsk, peer...) after warm-up; ``dsk`` and ``peer`` are medians over the rounds and ``ratio`` is the
median of the per-round ratios, so load from other processes on a shared machine hits both sides alike.

Rows:
* ``moe_vs_loop``: ``dsk`` = dsk MoE (``dispatch="auto"``: the CPU kernel of ``dsk_moe.kernels`` for small experts,
  else torch._grouped_mm), ``peer`` = the obvious per-expert loop of the DeepSeek reference inference MoE (an
  ``nn.ModuleList`` of experts; for each expert ``torch.where`` its tokens, run it, add into y) with the same router
  and weights. ``dsk_loop_slices`` is the fallback dispatch (one matmul per expert slice). ``ratio = peer / dsk``.
* ``moe_vs_dense``: ``peer`` = a dense SwiGLU with the same activated FLOPs per token (hidden = (top_k +
  n_shared) * expert_hidden). ``ratio = dense / dsk``; ratio >= 0.67 means the MoE costs <= 1.5x the dense time.
* ``moe_loop_ceiling`` (E=64): ``loop / dense``. The loop runs the same expert GEMMs as dsk, and the dense SwiGLU
  does the same FLOPs as one large GEMM, at the BLAS's best speed; so ``loop / dense`` bounds what any MoE
  implementation can reach against the loop on this machine (it would have to run as fast as the dense layer).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable

import torch
from dsk_moe.config import MoEConfig, NoauxTCConfig
from dsk_moe.experts import SwiGLU
from dsk_moe.moe import MoE
from dsk_moe.router import NoauxTCRouter
from torch import nn

from dsk.api import ModelContext, ResolvedSlot

DIM, EXPERT_HIDDEN, N_SHARED = 256, 128, 1


class LoopMoE(nn.Module):
    """The peer: DeepSeek reference ``MoE.forward`` (inference/model.py) with autograd, same router and weights."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.gate = copy.deepcopy(moe.gate)
        self.experts = nn.ModuleList()
        for j in range(moe.experts.n_experts):
            expert = SwiGLU(DIM, EXPERT_HIDDEN)
            with torch.no_grad():
                expert.gate_proj.weight.copy_(moe.experts.w_gate[j])
                expert.up_proj.weight.copy_(moe.experts.w_up[j])
                expert.down_proj.weight.copy_(moe.experts.w_down[j])
            self.experts.append(expert)
        self.shared_experts = copy.deepcopy(moe.shared_experts)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(-1, D)
        weights, indices, _ = self.gate(x, seq_shape=(B, T))
        y = torch.zeros_like(x)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts)).tolist()
        for i, expert in enumerate(self.experts):
            if counts[i] == 0:
                continue
            idx, top = torch.where(indices == i)
            y[idx] += expert(x[idx]) * weights[idx, top, None]
        return (y + self.shared_experts(x)).view(B, T, D)


def _make_moe(n_experts: int, top_k: int, dispatch: str) -> MoE:
    n_groups = 8 if n_experts >= 64 else 1  # V3-style group limit (4 of 8 groups) at 64 experts
    router = NoauxTCConfig(top_k=top_k, n_groups=n_groups, topk_groups=max(1, n_groups // 2), route_scale=2.5)
    cfg = MoEConfig(
        n_routed_experts=n_experts,
        n_shared_experts=N_SHARED,
        expert_hidden_dim=EXPERT_HIDDEN,
        dispatch=dispatch,
        router=ResolvedSlot(kind="router", name="noaux_tc", config=router, impl=NoauxTCRouter),
    )
    torch.manual_seed(0)
    return MoE(cfg, ModelContext(dim=DIM, n_layers=1, vocab_size=1, max_seq_len=4096)).train()


def _step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One training step of the layer alone: forward, backward of <y, grad_out> (+ balance loss, if any)."""

    def step() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        y = module(x)
        loss = (y * grad_out).sum()
        aux = module.gate.balance_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
        module.gate.end_step()
        return y.detach()

    return step


def _dense_step(dense: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        dense.zero_grad(set_to_none=True)
        y = dense(x)
        (y * grad_out).sum().backward()
        return y.detach()

    return step


def _interleaved_times(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Wall times of each step, the steps interleaved within every round (warm-up rounds not recorded)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def _ratio(times: dict[str, list[float]], peer: str, dsk: str) -> float:
    """Median over rounds of peer/dsk measured side by side: robust to load from other processes that comes and
    goes, which shifts whole rounds."""
    return statistics.median(p / d for p, d in zip(times[peer], times[dsk], strict=True))


def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring); ``quick`` uses fewer cases and repeats (< 15 s on 2 cores)."""
    tokens = 2048
    batch, seq = 2, tokens // 2
    cases = [(64, 2), (64, 6)] if quick else [(8, 2), (8, 6), (64, 2), (64, 6)]
    warmup, repeats = (1, 3) if quick else (2, 7)
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, DIM, generator=gen).requires_grad_(True)
    grad_out = torch.randn(batch, seq, DIM, generator=gen)
    rows = []
    for n_experts, top_k in cases:
        moe = _make_moe(n_experts, top_k, "auto")
        slices = _make_moe(n_experts, top_k, "loop_slices")
        loop = LoopMoE(moe).train()
        dense = SwiGLU(DIM, (top_k + N_SHARED) * EXPERT_HIDDEN)
        y_dsk, y_loop = _step(moe, x, grad_out)(), _step(loop, x, grad_out)()
        max_rel_diff = ((y_dsk - y_loop).abs().max() / y_loop.abs().max()).item()
        moe.gate.e_score_correction_bias.zero_()  # undo the check's bias step so all runs route alike
        loop.gate.e_score_correction_bias.zero_()

        steps = {
            "dsk": _step(moe, x, grad_out),
            "loop": _step(loop, x, grad_out),
            "slices": _step(slices, x, grad_out),
            "dense": _dense_step(dense, x, grad_out),
        }
        if quick:
            del steps["slices"]
        times = _interleaved_times(steps, warmup, repeats)
        t = {name: statistics.median(ts) for name, ts in times.items()}
        dispatch = moe.experts.resolve_dispatch(x.detach().view(-1, DIM), "auto", n_rows=tokens * top_k)
        case = (
            f"E={n_experts} top_k={top_k} tokens={tokens} dim={DIM} expert_hidden={EXPERT_HIDDEN} "
            f"n_shared={N_SHARED} float32 fwd+bwd threads={threads}"
        )
        rows.append(
            {
                "bench": "moe_vs_loop",
                "case": f"{case} dispatch={dispatch}",
                "dsk": t["dsk"],
                "peer": t["loop"],
                "ratio": _ratio(times, "loop", "dsk"),
                "target": "ratio >= 3 at E=64" if n_experts == 64 else "",
                "unit": "s/step",
                "dsk_loop_slices": t.get("slices"),
                "max_rel_diff": max_rel_diff,
            }
        )
        rows.append(
            {
                "bench": "moe_vs_dense",
                "case": f"{case} dense_hidden={(top_k + N_SHARED) * EXPERT_HIDDEN}",
                "dsk": t["dsk"],
                "peer": t["dense"],
                "ratio": _ratio(times, "dense", "dsk"),
                "target": "ratio >= 0.67 (MoE <= 1.5x dense time)",
                "unit": "s/step",
            }
        )
        if n_experts == 64:
            rows.append(
                {
                    "bench": "moe_loop_ceiling",
                    "case": f"{case}: loop time / dense time, the most moe_vs_loop can reach on this machine",
                    "dsk": t["dense"],
                    "peer": t["loop"],
                    "ratio": _ratio(times, "loop", "dense"),
                    "target": "bound for moe_vs_loop (an MoE at the dense GEMM's speed)",
                    "unit": "s/step",
                }
            )
    return rows


if __name__ == "__main__":
    for row in run(quick=False):
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})

"""FP8 (E4M3) GEMMs with fine-grained scaling on this CPU: their cost against float32, and their error.

Rows (``python -m bench fp8``; timings interleave dsk and the peer round by round, medians, ratio = median of the
per-round ``peer / dsk``, so a ratio below 1 means FP8 is slower):

* ``fp8_gemm``: one linear layer's forward + backward (the three GEMMs) on ``[M, K] x [N, K]``: dsk =
  ``dsk_fp8.gemm.fp8_linear`` (B = 128, ``gemm = "dequant"``, the CPU default), peer = ``F.linear`` in float32;
  a second row times the other back end, ``gemm = "scaled_mm"`` (one rowwise ``torch._scaled_mm`` per 128-wide
  K chunk), against the same float32 rounds.
* ``fp8_grouped``: the routed experts' grouped GEMM (E experts, rows sorted by expert) forward + backward: dsk =
  ``fp8_grouped``, peer = ``torch._grouped_mm`` in float32.
* ``fp8_train_step``: one optimizer step (forward, backward, AdamW) of the quickstart model (recipes/base/
  tiny-dsv3.toml, batch 64 x 40 tokens): dsk = with ``[features.fp8] block_size = 32``, peer = float32.
* ``fp8_error``: relative error against float64 of the three GEMMs (mean over output rows; dW over its columns) on
  data with outliers 1e5 x the typical magnitude: dsk = blockwise (1 x 128 / 128 x 128 / 128 x 1), peer =
  tensorwise; ratio = tensorwise / blockwise (how much the fine-grained tiles help). ``clean`` rows: no outliers.

What it cannot show: FP8's speed. This CPU has no FP8 arithmetic, so E4M3 operands are an emulation (quantise,
then a float32 GEMM): the price of the numerics, not a GPU's 2x. On a GPU ``gemm = "auto"`` takes ``_scaled_mm``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import tomllib
import torch
import torch.nn.functional as F
from dsk_fp8.config import FP8Config
from dsk_fp8.feature import FP8Feature
from dsk_fp8.gemm import FP8Recipe, fp8_grouped, fp8_linear

from bench.bench_moe import _interleaved_times
from dsk.model.build import build_model
from dsk.model.config import ModelConfig
from dsk.model.loss import loss_from_output
from dsk.testing import builtin_registry

ROOT = Path(__file__).resolve().parents[1]


def _row(bench: str, case: str, times: dict[str, list[float]], dsk: str, peer: str, **extra) -> dict:
    ratio = statistics.median(p / d for p, d in zip(times[peer], times[dsk], strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"bench": bench, "case": case, "dsk": med[dsk], "peer": med[peer], "ratio": ratio, "target": "",
            "unit": "s/step", **{k: med[v] for k, v in extra.items()}}  # fmt: skip


def _gemm_rows(quick: bool) -> list[dict]:
    rows = []
    g = torch.Generator().manual_seed(0)
    shapes = [(2048, 512, 512)] if quick else [(2048, 512, 512), (4096, 1024, 1024)]
    for M, K, N in shapes:
        x = torch.randn(M, K, generator=g, requires_grad=True)
        w = torch.randn(N, K, generator=g, requires_grad=True)
        dy = torch.randn(M, N, generator=g)

        def step(fn, x=x, w=w, dy=dy):
            return lambda: fn(x, w).backward(dy)

        steps = {
            "fp8": step(lambda x, w: fp8_linear(x, w, FP8Recipe(128, backend="dequant"))),
            "fp32": step(F.linear),
            "scaled_mm": step(lambda x, w: fp8_linear(x, w, FP8Recipe(128, backend="scaled_mm"))),
        }
        times = _interleaved_times(steps, 1, 3 if quick else 5)
        case = f"M={M} K={K} N={N} fwd+dgrad+wgrad B=128 float32 master"
        rows.append(_row("fp8_gemm", f"{case} gemm=dequant", times, "fp8", "fp32"))
        rows.append(_row("fp8_gemm", f"{case} gemm=scaled_mm", times, "scaled_mm", "fp32"))
    E, R, K, N = 8, 4096, 256, 512
    load = torch.full((E,), R // E)
    offs = torch.cumsum(load, 0, dtype=torch.int32)
    x = torch.randn(R, K, generator=g, requires_grad=True)
    w = torch.randn(E, N, K, generator=g, requires_grad=True)
    dy = torch.randn(R, N, generator=g)
    steps = {
        "fp8": lambda: fp8_grouped(x, w, load, FP8Recipe(128)).backward(dy),
        "fp32": lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).backward(dy),
    }
    times = _interleaved_times(steps, 1, 3 if quick else 5)
    rows.append(_row("fp8_grouped", f"E={E} rows={R} K={K} N={N} fwd+dgrad+wgrad B=128", times, "fp8", "fp32"))
    return rows


def _quickstart_model(fp8: bool) -> torch.nn.Module:
    table = tomllib.loads((ROOT / "recipes/base/tiny-dsv3.toml").read_text())["model"]
    table["vocab_size"] = 32
    torch.manual_seed(0)
    model = build_model(builtin_registry().validate(ModelConfig, table)).train()
    if fp8:
        FP8Feature(FP8Config(block_size=32)).transform_model(model, None)
    return model


def _train_rows(quick: bool) -> list[dict]:
    ids = torch.randint(0, 32, (64, 40), generator=torch.Generator().manual_seed(1))
    steps = {}
    for name, fp8 in (("fp8", True), ("fp32", False)):
        model = _quickstart_model(fp8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_from_output(model, model(ids, with_mtp=True), ids).loss.backward()
            opt.step()

        steps[name] = step
    times = _interleaved_times(steps, 2, 5 if quick else 10)
    case = "quickstart model (tiny-dsv3: dim 64, MLA, 8 experts, MTP) batch 64x40, fwd+bwd+AdamW, block_size 32"
    return [_row("fp8_train_step", case, times, "fp8", "fp32")]


def _mean_rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm(dim=1) / ref.norm(dim=1)).mean().item()


def error_table(outliers: bool, M: int = 256, K: int = 512, N: int = 256) -> dict[tuple[str, str], float]:
    """``{(gemm, scaling): mean relative error vs float64}`` for the three GEMMs of one layer (B = 128)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.02
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    if outliers:
        for i, k in ((3, 17), (100, 300), (201, 450)):
            x[i, k] = 1e5
        for i, n in ((7, 5), (150, 200)):
            dy[i, n] = 1e5
    ref = {"forward": x @ w.t(), "dgrad": dy @ w, "wgrad": (dy.t() @ x).t()}
    out = {}
    for scaling in ("blockwise", "tensorwise"):
        xf, wf = x.float().requires_grad_(), w.float().requires_grad_()
        y = fp8_linear(xf, wf, FP8Recipe(128, tensorwise=scaling == "tensorwise"))
        y.backward(dy.float())
        for name, got in (("forward", y), ("dgrad", xf.grad), ("wgrad", wf.grad.t())):
            out[name, scaling] = _mean_rel(got, ref[name])
    return out


def _error_rows() -> list[dict]:
    rows = []
    for outliers in (True, False):
        table = error_table(outliers)
        for gemm in ("forward", "dgrad", "wgrad"):
            b, t = table[gemm, "blockwise"], table[gemm, "tensorwise"]
            data = "outliers 1e5x" if outliers else "clean N(0,1)"
            rows.append({"bench": "fp8_error", "case": f"{gemm} M=256 K=512 N=256 B=128 {data}", "dsk": b,
                         "peer": t, "ratio": t / b, "target": "ratio > 1 with outliers" if outliers else "",
                         "unit": "rel err"})  # fmt: skip
    return rows


def run(quick: bool = False) -> list[dict]:
    """All rows (see the module docstring); ``quick``: fewer shapes and repeats."""
    return [*_error_rows(), *_gemm_rows(quick), *_train_rows(quick)]


if __name__ == "__main__":
    for row in run(quick=False):
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})

"""MLA decoding: absorbed path over the compressed latent cache vs the naive path over a full per-head K/V cache.

Both runs use the same MLA module (same weights), so they compute the same function; only the cache layout and the
attention path differ. One attention layer, float32, CPU, eval mode. Each case prefills ``context`` tokens (not
timed), then decodes ``new_tokens`` one at a time; the time per decode step is the median over ``repeats`` runs.

Rows: ``dsk`` = absorbed ("latent" cache), ``peer`` = naive ("full" cache); for time rows ``ratio = peer/dsk`` is the
absorbed speed-up. Cache rows compare bytes cached per token per layer.
"""

from __future__ import annotations

import statistics
import time

import torch
from dsk_mla.config import MHAConfig, MLAConfig
from dsk_mla.mha import MHA
from dsk_mla.mla import MLA

from dsk.api import ModelContext

# DeepSeek-V3's per-head dims (nope 128, rope 64, v 128) with 16 heads, dim 1024 and the ranks scaled down
# (V3: dim 7168, 128 heads, q rank 1536, kv rank 512); H * qk_head_dim = 3 * dim (V3: 3.4 * dim).
DIM = 1024
CFG = MLAConfig(
    n_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128
)
LAYOUTS = ("latent", "full")  # dsk (absorbed) and peer (naive)


def _decode(mla: MLA, prompt: torch.Tensor, steps: torch.Tensor, repeats: int) -> dict[str, tuple[float, torch.Tensor]]:
    """Per layout: median seconds per decode step and the outputs ``[B, N, D]``.

    Prefills ``prompt [B, S, D]`` once per layout, then decodes ``steps [B, N, D]`` one token at a time, rolling the
    cache back between repeats. The layouts alternate within each repeat and the median step time is kept, so that
    load from other processes on a shared machine hits both alike and outliers drop out.
    """
    B, S, _ = prompt.shape
    N = steps.shape[1]
    caches = {layout: mla.make_cache(B, S + N, layout=layout) for layout in LAYOUTS}
    for cache in caches.values():
        mla(prompt, torch.arange(S), cache=cache)
    times = {layout: [] for layout in LAYOUTS}
    outputs = {}
    for _ in range(repeats):
        for layout, cache in caches.items():
            cache.truncate(S)
            outs = []
            for i in range(N):  # decoding is sequential by nature; this loop is the benchmark, not the model
                t0 = time.perf_counter()
                outs.append(mla(steps[:, i : i + 1], torch.tensor([S + i]), cache=cache))
                times[layout].append(time.perf_counter() - t0)
            outputs[layout] = torch.cat(outs, 1)
    return {layout: (statistics.median(times[layout]), outputs[layout]) for layout in LAYOUTS}


@torch.no_grad()
def run(quick: bool = False) -> list[dict]:
    """Benchmark rows (see the module docstring); ``quick`` runs batch 1 and fewer tokens (< 15 s on 2 cores)."""
    torch.manual_seed(0)
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=1, max_seq_len=4096)
    mla = MLA(CFG, ctx).eval()
    batch, new_tokens, repeats = (1, 8, 3) if quick else (4, 32, 3)
    threads = torch.get_num_threads()
    rows = []
    for context in (512, 2048):
        prompt = torch.randn(batch, context, DIM)
        steps = torch.randn(batch, new_tokens, DIM)
        _decode(mla, prompt[:, :64], steps[:, :2], 1)  # warm-up: allocator growth, kernel selection
        timed = _decode(mla, prompt, steps, repeats)
        (absorbed, y_abs), (naive, y_naive) = timed["latent"], timed["full"]
        max_diff = (y_abs - y_naive).abs().max().item() / y_naive.abs().max().item()
        rows.append(
            {
                "bench": "mla_decode",
                "case": f"context={context} batch={batch} new_tokens={new_tokens} dim={DIM} heads={CFG.n_heads} "
                f"kv_lora_rank={CFG.kv_lora_rank} nope/rope/v={CFG.qk_nope_head_dim}/{CFG.qk_rope_head_dim}/"
                f"{CFG.v_head_dim} float32 threads={threads}",
                "dsk": absorbed,
                "peer": naive,
                "ratio": naive / absorbed,
                "target": "ratio >= 2 at context 2048 (absorbed >= 2x naive tokens/s)" if context == 2048 else "",
                "unit": "s/step",
                "dsk_tokens_per_s": batch / absorbed,
                "peer_tokens_per_s": batch / naive,
                "max_rel_diff": max_diff,
            }
        )

    mha = MHA(MHAConfig(n_heads=CFG.n_heads, head_dim=CFG.v_head_dim), ctx)
    fp32 = 4
    rows.append(
        _cache_row(
            "bench config, vs MHA (16 heads x 128)", mla.cache_values_per_token(), mha.cache_values_per_token(), fp32
        )
    )
    rows.append(
        _cache_row(
            "bench config, vs MLA full K/V cache",
            mla.cache_values_per_token(),
            mla.cache_values_per_token("full"),
            fp32,
        )
    )
    # DeepSeek-V3 sizes, built on the meta device (no memory): 576 vs 128 heads x 128 dims
    with torch.device("meta"):
        v3ctx = ModelContext(dim=7168, n_layers=1, vocab_size=1, max_seq_len=4096)
        v3 = MLA(MLAConfig(), v3ctx)
        v3_mha = MHA(MHAConfig(n_heads=128, head_dim=128), v3ctx)
    bf16 = 2
    rows.append(
        _cache_row(
            "DeepSeek-V3 sizes bf16, vs MHA (128 heads x 128)",
            v3.cache_values_per_token(),
            v3_mha.cache_values_per_token(),
            bf16,
        )
    )
    rows.append(
        _cache_row(
            "DeepSeek-V3 sizes bf16, vs MLA full K/V cache",
            v3.cache_values_per_token(),
            v3.cache_values_per_token("full"),
            bf16,
        )
    )
    return rows


def _cache_row(case: str, dsk_values: int, peer_values: int, bytes_per_value: int) -> dict:
    return {
        "bench": "mla_cache_bytes_per_token",
        "case": case,
        "dsk": dsk_values * bytes_per_value,
        "peer": peer_values * bytes_per_value,
        "ratio": peer_values / dsk_values,
        "target": "",
        "unit": "bytes/token/layer",
    }


if __name__ == "__main__":
    import os
    import sys

    if "DSK_BENCH_THREADS" in os.environ:  # same knob as `python -m bench`
        torch.set_num_threads(int(os.environ["DSK_BENCH_THREADS"]))
    for row in run(quick="--quick" in sys.argv):
        print(row)

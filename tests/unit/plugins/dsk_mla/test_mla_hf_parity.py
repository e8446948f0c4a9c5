"""MLA with weights copied from HF transformers' DeepseekV3Attention gives HF's output (no weight permutation)."""

from __future__ import annotations

import pytest
import torch
from dsk_mla.config import MLAConfig, YarnConfig
from dsk_mla.mla import MLA

from dsk.api import ModelContext

hf_deepseek = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config = pytest.importorskip("transformers").DeepseekV3Config

DIM, HEADS = 32, 4
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.8, "mscale_all_dim": 0.6}  # fmt: skip


def build_pair(q_lora_rank):
    """A tiny HF attention (random weights, eager, interleaved rope, YaRN) and an MLA loaded from its state dict."""
    torch.manual_seed(0)
    sizes = dict(q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6)
    hf_cfg = DeepseekV3Config(
        hidden_size=DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=128,
        rope_theta=500.0,
        rope_scaling=dict(YARN),  # HF adds keys to the dict it is given
        rope_interleave=True,
        attn_implementation="eager",
        **sizes,
    )
    hf = hf_deepseek.DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    rotary = hf_deepseek.DeepseekV3RotaryEmbedding(hf_cfg)
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=128, norm_eps=1e-6)
    mla = MLA(MLAConfig(n_heads=HEADS, rope_theta=500.0, rope_scaling=YarnConfig(**YARN), **sizes), ctx).eval()
    mla.load_state_dict(hf.state_dict(), strict=True)  # names map 1:1
    return hf, rotary, mla


@pytest.mark.parametrize("q_lora_rank", [12, None], ids=["q_lora", "q_proj"])
def test_mla_matches_hf_deepseek_v3_attention(q_lora_rank):
    hf, rotary, mla = build_pair(q_lora_rank)
    B, T = 2, 10
    x = torch.randn(B, T, DIM)
    pos = torch.arange(T) + 37  # past original_max_position_embeddings, where YaRN matters
    cos, sin = rotary(x, pos[None].expand(B, T))
    causal = torch.full((T, T), torch.finfo(x.dtype).min).triu(1)[None, None].expand(B, 1, T, T)
    with torch.no_grad():
        want = hf(x, (cos, sin), causal)[0]
        scale = want.abs().max().item()
        torch.testing.assert_close(mla(x, pos), want, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(mla.forward_absorbed(x, pos), want, rtol=1e-5, atol=1e-5 * scale)
        cache = mla.make_cache(B, T)
        steps = torch.cat([mla(x[:, t : t + 1], pos[t : t + 1], cache=cache) for t in range(T)], 1)
        torch.testing.assert_close(steps, want, rtol=1e-5, atol=1e-5 * scale)
    assert mla.softmax_scale == pytest.approx(hf.scaling, rel=1e-12)

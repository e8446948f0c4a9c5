"""MLA: naive == absorbed, cached decoding == full forward, masks, and a float64 reference of the equations."""

from __future__ import annotations

import math

import pytest
import torch
from dsk_mla.config import MLAConfig, YarnConfig
from dsk_mla.mla import MLA

from dsk.api import ModelContext

DIM = 32
YARN = YarnConfig(
    factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1, mscale=0.8, mscale_all_dim=0.6
)


def make_mla(q_lora_rank=12, rope_scaling=None, decode_cache="latent", dtype=torch.float64, seed=0) -> MLA:
    """A tiny MLA with weights large enough (std 0.3) for peaked, position-sensitive attention."""
    torch.manual_seed(seed)
    cfg = MLAConfig(
        n_heads=3,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=10,
        qk_nope_head_dim=6,
        qk_rope_head_dim=4,
        v_head_dim=5,
        rope_theta=500.0,
        rope_scaling=rope_scaling,
        decode_cache=decode_cache,
    )
    ctx = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=64, init_std=0.3)
    m = MLA(cfg, ctx).to(dtype)
    with torch.no_grad():  # non-trivial norm gains so that a wrong norm placement shows
        for p in m.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def inputs(B=2, T=9, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, DIM, generator=g, dtype=dtype), torch.arange(T)


CASES = [
    pytest.param(12, None, id="q_lora"),
    pytest.param(None, None, id="q_proj"),
    pytest.param(12, YARN, id="q_lora-yarn"),
    pytest.param(None, YARN, id="q_proj-yarn"),
]


# -- reference -------------------------------------------------------------------------------------------------


def reference_mla(m: MLA, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Report eqs 1-11 in float64, head by head, with the reference's complex (interleaved) RoPE."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    cfg = m.cfg
    H, dn, dr, dv, c = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    x = x.double()
    B, T, _ = x.shape
    eps = 1e-6

    def rmsnorm(h, w):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * w

    # frequencies straight from spec §1.5 (YaRN blend), in float64
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, dr, 2, dtype=torch.float64) / dr)
    scale = (dn + dr) ** -0.5
    if cfg.rope_scaling is not None:
        y = cfg.rope_scaling

        def corr(r):
            return (
                dr * math.log(y.original_max_position_embeddings / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))
            )

        low, high = max(math.floor(corr(y.beta_fast)), 0), min(math.ceil(corr(y.beta_slow)), dr - 1)
        ramp = ((torch.arange(dr // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs / y.factor * ramp + freqs * (1 - ramp)
        ms = lambda a: 0.1 * a * math.log(y.factor) + 1  # noqa: E731
        attn_factor = ms(y.mscale) / ms(y.mscale_all_dim)
        scale *= ms(y.mscale_all_dim) ** 2
    else:
        attn_factor = 1.0
    rot = torch.polar(torch.full((T, dr // 2), attn_factor, dtype=torch.float64), pos.double()[:, None] * freqs)

    def rope(v):  # v [B, T, dr], interleaved pairs as complex numbers
        vc = torch.view_as_complex(v.reshape(B, T, dr // 2, 2).contiguous())
        return torch.view_as_real(vc * rot).reshape(B, T, dr)

    if cfg.q_lora_rank is None:
        q = x @ sd["q_proj.weight"].T
    else:
        q = rmsnorm(x @ sd["q_a_proj.weight"].T, sd["q_a_layernorm.weight"]) @ sd["q_b_proj.weight"].T
    q = q.reshape(B, T, H, dn + dr)
    kv_a = x @ sd["kv_a_proj_with_mqa.weight"].T
    c_kv = rmsnorm(kv_a[..., :c], sd["kv_a_layernorm.weight"])  # eq 1 (+ the V2 latent norm)
    k_rope = rope(kv_a[..., c:])  # eq 3, shared by every head
    w_kv_b = sd["kv_b_proj.weight"].reshape(H, dn + dv, c)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, T, T)
    heads = []
    for h in range(H):
        k_c = c_kv @ w_kv_b[h, :dn].T  # eq 2
        v_c = c_kv @ w_kv_b[h, dn:].T  # eq 5
        q_h = torch.cat([q[:, :, h, :dn], rope(q[:, :, h, dn:])], -1)  # eqs 7-9
        k_h = torch.cat([k_c, k_rope], -1)  # eq 4
        s = torch.einsum("btd,bsd->bts", q_h, k_h) * scale
        p = torch.softmax(s.masked_fill(~mask, -torch.inf), -1)
        heads.append(p @ v_c)  # eq 10
    return torch.cat(heads, -1) @ sd["o_proj.weight"].T  # eq 11


# -- tests -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("q_lora_rank,yarn", CASES)
def test_forward_matches_float64_reference_of_the_equations(q_lora_rank, yarn):
    m = make_mla(q_lora_rank, yarn)
    x, pos = inputs()
    pos = pos + 3  # absolute positions need not start at 0
    with torch.no_grad():
        torch.testing.assert_close(m(x, pos), reference_mla(m, x, pos), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.forward_absorbed(x, pos), reference_mla(m, x, pos), rtol=1e-10, atol=1e-12)
        # one token per row: the decode step's batched-GEMM form of the absorbed path
        one = x[:, :1], pos[:1]
        torch.testing.assert_close(m.forward_absorbed(*one), reference_mla(m, *one), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("q_lora_rank,yarn", CASES)
def test_absorbed_path_equals_naive_path_in_float32(q_lora_rank, yarn):
    m = make_mla(q_lora_rank, yarn, dtype=torch.float32)
    x, pos = inputs(T=12, dtype=torch.float32)
    with torch.no_grad():
        naive, absorbed = m(x, pos), m.forward_absorbed(x, pos)
    torch.testing.assert_close(absorbed, naive, rtol=1e-5, atol=1e-5 * naive.abs().max().item())


@pytest.mark.parametrize("layout", ["latent", "full"])
@pytest.mark.parametrize("q_lora_rank,yarn", [CASES[0], CASES[3]])
def test_token_by_token_decoding_equals_full_forward(layout, q_lora_rank, yarn):
    m = make_mla(q_lora_rank, yarn)
    x, pos = inputs(T=10)
    cache = m.make_cache(2, 16, layout=layout)
    with torch.no_grad():
        full = m(x, pos)
        steps = [m(x[:, t : t + 1], pos[t : t + 1], cache=cache) for t in range(10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["latent", "full"])
def test_chunked_decoding_equals_full_forward(layout):
    m = make_mla(rope_scaling=YARN)
    # chunks of 3 absorb; the 20-token chunk is above the absorb threshold (T > 12 here) and expands the cache
    assert m._absorb_is_cheaper(3) and not m._absorb_is_cheaper(20)
    x, pos = inputs(T=27)
    cache = m.make_cache(2, 32, layout=layout)
    with torch.no_grad():
        full = m(x, pos)
        parts = [m(x[:, a:b], pos[a:b], cache=cache) for a, b in [(0, 3), (3, 4), (4, 24), (24, 27)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layout", ["latent", "full"])
def test_truncate_then_redecode_gives_the_same_outputs(layout):
    m = make_mla()
    x, pos = inputs(T=8)
    other = torch.randn(2, 3, DIM, dtype=torch.float64)
    cache = m.make_cache(2, 8, layout=layout)
    with torch.no_grad():
        m(x[:, :5], pos[:5], cache=cache)
        first = m(x[:, 5:], pos[5:], cache=cache)
        cache.truncate(5)
        m(other, pos[5:], cache=cache)  # rejected draft tokens overwrite the slots
        cache.truncate(5)
        again = m(x[:, 5:], pos[5:], cache=cache)
    assert cache.length == 8
    torch.testing.assert_close(again, first, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["naive", "absorbed"])
def test_perturbing_future_tokens_leaves_past_outputs_unchanged(path):
    m = make_mla(rope_scaling=YARN)
    x, pos = inputs(T=8)
    x2 = x.clone()
    x2[:, 5:] += torch.randn_like(x2[:, 5:])
    fwd = m if path == "naive" else m.forward_absorbed
    with torch.no_grad():
        y, y2 = fwd(x, pos), fwd(x2, pos)
    torch.testing.assert_close(y2[:, :5], y[:, :5], rtol=0, atol=1e-13)
    assert (y2[:, 5:] - y[:, 5:]).abs().max() > 1e-3


@pytest.mark.parametrize("path", ["naive", "absorbed", "latent_cache", "full_cache"])
def test_left_padded_row_equals_unpadded_computation(path):
    m = make_mla(rope_scaling=YARN)
    pad, T = 3, 6
    x, _ = inputs(B=2, T=T + pad)
    x[1, :pad] = 0.0  # row 1 holds a sequence of length T after `pad` padding tokens
    mask = torch.ones(T + pad, T + pad, dtype=torch.bool).tril()[None].repeat(2, 1, 1)
    mask[1, :, :pad] = False  # nobody attends to padding (padding queries attend nothing: finite garbage)
    pos = torch.arange(T + pad)
    with torch.no_grad():
        if path == "naive":
            y = m(x, pos, mask)
        elif path == "absorbed":
            y = m.forward_absorbed(x, pos, mask)
        else:
            cache = m.make_cache(2, T + pad, layout=path.split("_")[0])
            y = m(x[:, :5], pos[:5], mask[:, :5, :5], cache=cache)
            y = torch.cat(
                [y]
                + [
                    m(x[:, t : t + 1], pos[t : t + 1], mask[:, t : t + 1, : t + 1], cache=cache)
                    for t in range(5, T + pad)
                ],
                1,
            )
        alone = m(x[1:, pad:], torch.arange(T))  # RoPE is relative: shifted positions give the same scores
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y[1:, pad:], alone, rtol=1e-9, atol=1e-11)


def test_cache_holds_only_latent_and_rope_key_per_token():
    m = make_mla()
    latent = m.make_cache(2, 7)
    full = m.make_cache(2, 7, layout="full")
    assert m.cache_values_per_token() == 10 + 4 == latent.values_per_token()
    assert m.cache_values_per_token("full") == 3 * (6 + 4 + 5) == full.values_per_token()
    assert latent.buffers["kv"].shape == (2, 7, 14)


def test_cache_overflow_and_bad_truncate_raise():
    m = make_mla()
    x, pos = inputs(T=4)
    cache = m.make_cache(2, 3)
    with pytest.raises(ValueError, match="max_len 3"):
        m(x, pos, cache=cache)
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(1)


def test_mask_of_wrong_shape_is_rejected():
    m = make_mla()
    x, pos = inputs(T=4)
    with pytest.raises(ValueError, match=r"expected \[B, 4, 4\]"):
        m(x, pos, torch.ones(2, 4, 5, dtype=torch.bool))


def test_parameter_names_are_hf_names():
    names = set(make_mla(q_lora_rank=12).state_dict())
    assert names == {
        "q_a_proj.weight",
        "q_a_layernorm.weight",
        "q_b_proj.weight",
        "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight",
        "kv_b_proj.weight",
        "o_proj.weight",
    }
    assert "q_proj.weight" in make_mla(q_lora_rank=None).state_dict()


def test_gradients_flow_through_the_training_path():
    m = make_mla(dtype=torch.float32).train()
    x, pos = inputs(dtype=torch.float32)
    m(x, pos).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("causal", [True, False])
def test_attend_gives_the_same_result_with_and_without_padding_v(monkeypatch, causal):
    from dsk_mla import attention

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 7, 12, generator=g, dtype=torch.float64), torch.randn(2, 3, 7, 12, generator=g)
    k, v = k.double(), torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64)
    bias = None if causal else attention.attention_bias(None, 7, 7, 0, torch.float64, q.device)
    unpadded = attention.attend(q, k, v, bias, 0.3, causal=causal)
    monkeypatch.setattr(attention, "PAD_V_MIN_SCORES", 0)  # every size takes the padded (fused-kernel) route
    padded = attention.attend(q, k, v, bias, 0.3, causal=causal)
    assert padded.shape == unpadded.shape == (2, 3, 7, 8)
    torch.testing.assert_close(padded, unpadded, rtol=1e-12, atol=1e-12)

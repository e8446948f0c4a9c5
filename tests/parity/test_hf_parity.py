"""Parity with HF ``transformers`` DeepseekV3ForCausalLM: tiny random models built locally (never downloaded),
saved with ``save_pretrained``, loaded by ``dsk.load_pretrained``; float32 logits must agree to 1e-4 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dsk
from dsk.model.generate import generate
from dsk.model.hf import convert, save_hf
from dsk.model.loss import training_loss

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    max_position_embeddings=256,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    rope_scaling=YARN,
)

VARIANTS = {
    "v3_like": {},
    "q_lora_none": {"q_lora_rank": None},
    "first_k_dense_0": {"first_k_dense_replace": 0},
    "first_k_dense_2": {"first_k_dense_replace": 2},
    "no_norm_topk_prob": {"norm_topk_prob": False},
    "groups_4_keep_2_top_3": {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
    "route_scale_1_no_rope_scaling": {"routed_scaling_factor": 1.0, "rope_scaling": None},
    "yarn_mscale_only": {
        "rope_scaling": {
            "type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 0.707,
        }
    },
    "two_shared_tied": {"n_shared_experts": 2, "tie_word_embeddings": True},
}


def _hf_model(tmp_path, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**BASE, **overrides})
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):  # a trained-looking, non-zero routing bias
                m.e_score_correction_bias.normal_(0.0, 0.05)
            if type(m).__name__ == "DeepseekV3RMSNorm":  # norms away from 1 so that a skipped weight shows
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return model, path


def _ids(B=3, T=17, V=96):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


def _rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, tmp_path):
    hf, path = _hf_model(tmp_path, **VARIANTS[variant])
    model = dsk.load_pretrained(path)
    ids = _ids()
    with torch.no_grad():
        want = hf(ids, labels=ids)
        got = training_loss(model, ids, ids)
    assert _rel_err(got.logits, want.logits) < REL_TOL
    # same label convention as HF (aligned labels, shifted inside the loss)
    assert abs(got.lm_loss.item() - want.loss.item()) < 1e-5


def test_padded_batch_matches_transformers_with_attention_mask(tmp_path):
    hf, path = _hf_model(tmp_path)
    model = dsk.load_pretrained(path)
    ids = _ids(B=2, T=9)
    real = torch.ones_like(ids, dtype=torch.bool)
    real[1, :4] = False  # left padding
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None] & real[:, None, :] | torch.eye(9, dtype=torch.bool)
    with torch.no_grad():
        want = hf(ids, attention_mask=real.long()).logits
        got = model(ids, mask=mask).logits
    assert _rel_err(got[real], want[real]) < REL_TOL


def test_greedy_generation_matches_transformers(tmp_path):
    hf, path = _hf_model(tmp_path, rope_scaling=None)
    model = dsk.load_pretrained(path)
    prompt = [5, 17, 3, 44]
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert generate(model, [prompt], 10, temperature=0).tokens[0] == want


def test_hf_to_dsk_to_hf_round_trip_is_bit_exact(tmp_path):
    _, path = _hf_model(tmp_path)
    convert(path, tmp_path / "dsk", to="dsk")
    convert(tmp_path / "dsk", tmp_path / "back", to="hf")
    a = load_file(str(path / "model.safetensors"))
    b = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_dsk_saved_hf_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    _, path = _hf_model(tmp_path, q_lora_rank=None)
    model = dsk.load_pretrained(path)
    save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    with torch.no_grad():
        assert _rel_err(model(ids).logits, reloaded(ids).logits) < REL_TOL


def test_mtp_layer_tensors_in_an_hf_checkpoint_become_the_mtp_heads(tmp_path):
    # HF's own save never writes the MTP layer; add one as the released weights have it (model.layers.{L}).
    from safetensors.torch import save_file

    _, path = _hf_model(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    L = BASE["num_hidden_layers"]
    for k, v in list(tensors.items()):
        if k.startswith("model.layers.2."):  # an MoE layer's block parts
            tensors[k.replace("model.layers.2.", f"model.layers.{L}.")] = torch.randn(v.shape, generator=g) * 0.02
    D = BASE["hidden_size"]
    tensors[f"model.layers.{L}.enorm.weight"] = torch.ones(D)
    tensors[f"model.layers.{L}.hnorm.weight"] = torch.ones(D)
    tensors[f"model.layers.{L}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * 0.02
    tensors[f"model.layers.{L}.shared_head.norm.weight"] = torch.ones(D)
    tensors[f"model.layers.{L}.shared_head.head.weight"] = tensors["lm_head.weight"]
    tensors[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path / "model.safetensors"))

    model = dsk.load_pretrained(path)
    assert model.mtp is not None and model.mtp.depth == 1
    assert torch.equal(model.mtp.layers[0].eh_proj.weight, tensors[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(
        model.mtp.layers[0].block.self_attn.o_proj.weight, tensors[f"model.layers.{L}.self_attn.o_proj.weight"]
    )
    # transformers ignores the MTP layer; the main-model logits still agree
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()
    ids = _ids()
    with torch.no_grad():
        assert _rel_err(model(ids).logits, hf(ids).logits) < REL_TOL
    convert(path, tmp_path / "dsk", to="dsk")
    convert(tmp_path / "dsk", tmp_path / "back", to="hf")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("variant", ["v3_like", "groups_4_keep_2_top_3", "q_lora_none"])
def test_training_gradients_match_transformers(variant, tmp_path):
    # The training path (dsk's CPU kernels for attention, experts, routing and RMSNorm where they apply, else
    # PyTorch) against HF autograd on the same weights and batch: every parameter's gradient of the LM loss.
    hf, path = _hf_model(tmp_path, **VARIANTS[variant])
    model = dsk.load_pretrained(path)
    hf.train()
    model.train()
    ids = _ids()
    hf(ids, labels=ids).loss.backward()
    training_loss(model, ids, ids).lm_loss.backward()
    ours = {name: p.grad for name, p in model.named_parameters()}
    checked = 0
    for name, p in hf.named_parameters():
        key = name.removeprefix("model.")
        if key.endswith("mlp.experts.gate_up_proj"):  # HF v5 keeps gate and up fused in memory
            base = key.removesuffix("gate_up_proj")
            got = torch.cat((ours[base + "w_gate"], ours[base + "w_up"]), dim=1)
        elif key.endswith("mlp.experts.down_proj"):
            got = ours[key.removesuffix("down_proj") + "w_down"]
        else:
            got = ours[key]
        assert _rel_err(got, p.grad) < REL_TOL, name
        checked += 1
    assert checked == len(list(hf.parameters()))

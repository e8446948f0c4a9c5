"""Checkpoint formats without transformers: dsk and HF round trips, MTP names, FP8, shards and errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsk
from dsk.model.hf import CheckpointError, convert, dequantize_fp8, save_dsk, save_hf
from tests.unit.model.tiny import VOCAB, tiny_model

IDS = torch.tensor([[3, 7, 1, 9, 4, 0, 2], [5, 2, 8, 8, 6, 1, 3]])


def _same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_dsk_checkpoint_round_trip_restores_config_weights_and_logits(tmp_path):
    model = tiny_model(
        dtype=torch.float32,
        attention={
            "type": "mla",
            "n_heads": 2,
            "q_lora_rank": None,
            "kv_lora_rank": 16,
            "qk_nope_head_dim": 8,
            "qk_rope_head_dim": 4,
            "v_head_dim": 8,
        },
    )
    save_dsk(model, tmp_path / "ckpt", extra={"tokenizer": {"type": "byte"}})
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["format"] == "dsk-model" and meta["tokenizer"] == {"type": "byte"}
    # "no query compression" is written as 0, the spelling TOML can hold too (its default is 1536); it loads back
    # as None below, and a checkpoint written with null still loads
    assert meta["model"]["attention"]["q_lora_rank"] == 0
    assert meta["model"]["ffn"]["router"]["type"] == "noaux_tc"

    loaded = dsk.load_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    _same_tensors(loaded.state_dict(), model.state_dict())
    torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


def test_hf_save_uses_hf_names_and_loads_back_identically_with_mtp(tmp_path):
    model = tiny_model(dtype=torch.float32)
    save_hf(model, tmp_path / "hf")
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 2 and config["num_hidden_layers"] == 3
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in tensors
    assert "model.layers.3.eh_proj.weight" in tensors and "model.layers.4.shared_head.norm.weight" in tensors
    assert "model.layers.3.self_attn.kv_b_proj.weight" in tensors  # the MTP block's parts sit at layer level
    assert torch.equal(tensors["model.layers.4.shared_head.head.weight"], tensors["lm_head.weight"])

    loaded = dsk.load_pretrained(tmp_path / "hf")
    assert loaded.mtp is not None and loaded.mtp.depth == 2
    _same_tensors(loaded.state_dict(), model.state_dict())


def test_hf_checkpoint_without_mtp_tensors_loads_without_mtp_heads(tmp_path):
    save_hf(tiny_model(mtp=None), tmp_path / "hf")
    assert dsk.load_pretrained(tmp_path / "hf").mtp is None


def test_convert_dsk_to_hf_to_dsk_keeps_every_tensor_bit_for_bit_in_bfloat16(tmp_path):
    model = tiny_model(dtype=torch.bfloat16, tie_embeddings=True)
    save_dsk(model, tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "b", to="hf")
    convert(tmp_path / "b", tmp_path / "c", to="dsk")
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    c = load_file(str(tmp_path / "c" / "model.safetensors"))
    _same_tensors(a, c)
    assert a["layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32  # kept fp32 like HF
    assert "lm_head.weight" not in a  # tied: stored once


def test_sharded_hf_checkpoint_with_index_loads(tmp_path):
    model = tiny_model(dtype=torch.float32, mtp=None)
    save_hf(model, tmp_path / "one")
    tensors = load_file(str(tmp_path / "one" / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(out / file))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}})
    )
    (out / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    _same_tensors(dsk.load_pretrained(out).state_dict(), model.state_dict())


def test_dequantize_fp8_scales_each_block_and_crops_ragged_edges():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(5, 7, generator=g) * 100).to(torch.float8_e4m3fn)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # blocks of 4 x 4: rows 0-3 / 4, cols 0-3 / 4-6
    out = dequantize_fp8(w, s, (4, 4))
    want = w.float().clone()
    want[:4, :4] *= 1
    want[:4, 4:] *= 2
    want[4:, :4] *= 3
    want[4:, 4:] *= 4
    assert torch.equal(out, want)


def test_fp8_hf_checkpoint_is_dequantized_on_load(tmp_path):
    model = tiny_model(dtype=torch.float32, mtp=None)
    save_hf(model, tmp_path / "hf")
    d = tmp_path / "hf"
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.self_attn.q_a_proj.weight"  # [16, 32]: 2 x 4 blocks of 8 x 8
    w = tensors[key]
    scale = w.abs().reshape(2, 8, 4, 8).amax(dim=(1, 3)) / 448.0
    q = (w / scale.repeat_interleave(8, 0).repeat_interleave(8, 1)).to(torch.float8_e4m3fn)
    tensors[key], tensors[key + "_scale_inv"] = q, scale
    save_file(tensors, str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [8, 8]}
    (d / "config.json").write_text(json.dumps(config))

    loaded = dsk.load_pretrained(d)
    want = dequantize_fp8(q, scale, (8, 8))  # float32: one rounding of W_fp8 * scale_inv
    assert torch.equal(loaded.layers[0].self_attn.q_a_proj.weight, want)
    torch.testing.assert_close(want, w, rtol=0.07, atol=1e-3)  # FP8 keeps ~2 significant bits of mantissa


def test_missing_directory_and_foreign_config_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        dsk.load_pretrained(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match=r"x/config.json: neither a dsk checkpoint"):
        dsk.load_pretrained(tmp_path / "x")


def test_unsupported_hf_config_values_are_reported_together(tmp_path):
    save_hf(tiny_model(mtp=None), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config.update(hidden_act="gelu", rope_interleave=False)
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: hidden_act = 'gelu'.*rope_interleave = false"):
        dsk.load_pretrained(tmp_path / "hf")


def test_weights_that_do_not_match_the_config_are_named(tmp_path):
    save_hf(tiny_model(mtp=None), tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.norm.weight"]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="missing 1 tensor.*norm.weight"):
        dsk.load_pretrained(tmp_path / "hf")


def test_models_hf_cannot_express_are_refused_by_save_hf(tmp_path):
    model = tiny_model(
        ffn={"type": "moe", "n_routed_experts": 4, "expert_hidden_dim": 16, "router": {"type": "aux_loss", "top_k": 2}}
    )
    with pytest.raises(CheckpointError, match="model.ffn.router = 'aux_loss'"):
        save_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert VOCAB == model.vocab_size


def test_convert_copies_tokenizer_files_and_keeps_extra_entries(tmp_path):
    save_dsk(tiny_model(mtp=None), tmp_path / "a", extra={"tokenizer": {"type": "char"}, "step": 7})
    (tmp_path / "a" / "tokenizer.json").write_text('{"model": {}}')
    convert(tmp_path / "a", tmp_path / "b", to="dsk")
    convert(tmp_path / "b", tmp_path / "c", to="hf")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["tokenizer"] == {"type": "char"} and meta["step"] == 7
    assert (tmp_path / "c" / "tokenizer.json").read_text() == '{"model": {}}'

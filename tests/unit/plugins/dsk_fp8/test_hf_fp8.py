"""Reading DeepSeek-V3 FP8 HF checkpoints: E4M3 linear weights with a float32 ``weight_scale_inv`` per block.

The test writes a tiny one: an HF-layout model saved by dsk, its attention and FFN linears (dense, shared and every
routed expert) quantised per block with dsk_fp8's quantisation, ``quantization_config`` as V3 ships it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from dsk_fp8.quant import E4M3, quantize
from safetensors.torch import load_file, save_file

import dsk
from dsk.model.hf import CheckpointError, convert, dequantize_fp8, save_hf
from dsk.testing import run_dsk
from tests.unit.model.tiny import tiny_model

#: the linear weights V3 stores in FP8 (spec §1.3): attention projections and every FFN's, not the router gate,
#: embedding, head, norms or the MTP projection
FP8_WEIGHT = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def _write_fp8_checkpoint(path, block: tuple[int, int], dtype=torch.float32) -> tuple[dict, dict]:
    """Save a tiny model as HF, then quantise its linears in place; returns (original, fp8 tensors)."""
    model = tiny_model(0, dtype, mtp=None)
    save_hf(model, path)
    tensors = load_file(str(path / "model.safetensors"))
    original = dict(tensors)
    quantised = {}
    for key, w in original.items():
        if FP8_WEIGHT.search(key):
            q = quantize(w, block)  # scale = block amax / 448: the dequantisation factor, HF's scale_inv
            tensors[key], tensors[f"{key}_scale_inv"] = q.data, q.scale
            quantised[key] = (q.data, q.scale)
    save_file(tensors, str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    (path / "config.json").write_text(json.dumps(config))
    return original, quantised


def _hf_state(model) -> dict:
    from dsk.model.hf import dsk_to_hf_state

    return dsk_to_hf_state(model.state_dict(), model.config)


@pytest.mark.parametrize("block", [(128, 128), (16, 8)])  # V3's; and one with several blocks and ragged edges
def test_fp8_checkpoint_loads_its_dequantised_weights_exactly(tmp_path, block):
    original, quantised = _write_fp8_checkpoint(tmp_path / "fp8", block)
    assert any(".experts.3.down_proj" in k for k in quantised) and any("shared_experts" in k for k in quantised)
    assert any(q.shape[0] % block[0] or q.shape[1] % block[1] for q, _ in quantised.values())  # partial blocks
    loaded = _hf_state(dsk.load_pretrained(tmp_path / "fp8"))
    for key, w in original.items():
        if key not in quantised:
            assert torch.equal(loaded[key], w), key  # router gate, embedding, head, norms: untouched
            continue
        data, scale_inv = quantised[key]
        assert data.dtype == E4M3 and scale_inv.shape == tuple(-(-n // b) for n, b in zip(w.shape, block, strict=True))
        want = dequantize_fp8(data, scale_inv, block)
        assert loaded[key].dtype == torch.float32 and torch.equal(loaded[key], want), key
        # within E4M3's error of the original: 2^-4 relative, or half the subnormal step 2^-9 of the block scale
        scale = scale_inv.repeat_interleave(block[0], 0)[: w.shape[0]].repeat_interleave(block[1], 1)[:, : w.shape[1]]
        assert ((want - w).abs() <= torch.maximum(w.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)).all(), key


def test_convert_keeps_the_checkpoints_weight_dtype_and_the_cli_reads_fp8(tmp_path):
    _, quantised = _write_fp8_checkpoint(tmp_path / "fp8", (16, 16), dtype=torch.bfloat16)
    out = convert(tmp_path / "fp8", tmp_path / "dsk", "dsk")
    state = _hf_state(dsk.load_pretrained(out, dtype="keep"))
    for key, (data, scale_inv) in quantised.items():
        # as DeepSeek's fp8_cast_bf16.py: bf16 beside the released bf16 tensors
        assert state[key].dtype == torch.bfloat16
        assert torch.equal(state[key], dequantize_fp8(data, scale_inv, (16, 16)).to(torch.bfloat16)), key
    result = run_dsk(["convert", str(tmp_path / "fp8"), str(tmp_path / "hf2"), "--to", "hf"])
    assert result.exit_code == 0, result.output
    written = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert not any(k.endswith("_scale_inv") for k in written) and all(v.element_size() > 1 for v in written.values())


def test_malformed_fp8_checkpoints_are_checkpoint_errors(tmp_path):
    d = tmp_path / "fp8"
    _write_fp8_checkpoint(d, (16, 16))
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["fmt"] = "int4"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quantization_config\.fmt = 'int4'"):
        dsk.load_pretrained(d)
    config["quantization_config"]["fmt"] = "e4m3"
    (d / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(d / "model.safetensors"))
    key = "model.layers.0.self_attn.q_a_proj.weight_scale_inv"
    tensors[key] = tensors[key][:, :1].contiguous()
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"q_a_proj\.weight_scale_inv has shape"):
        dsk.load_pretrained(d)

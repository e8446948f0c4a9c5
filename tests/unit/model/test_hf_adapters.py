"""The core composes the components' HF adapters: it names no technique, and a third-party component with its own
adapter round-trips through ``save_hf`` / ``load_pretrained`` like the built-ins."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file
from torch import nn

import dsk
from dsk import hookimpl
from dsk.api import BaseConfig, HFCheckpoint, HFLayout
from dsk.model.build import build_model
from dsk.model.config import ModelConfig
from dsk.model.hf import CheckpointError, model_config_to_hf, save_hf
from dsk.registry import RegistryError, build_registry
from dsk.testing import isolated_plugin_manager
from tests.unit.model.tiny import TINY

DSK = Path(__file__).resolve().parents[3] / "dsk"
#: config fields and tensor names of the built-in techniques: they belong in the plugins' adapters
TECHNIQUE_NAMES = (
    "kv_lora_rank",
    "q_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "n_shared_experts",
    "moe_intermediate_size",
    "num_experts_per_tok",
    "routed_scaling_factor",
    "n_group",
    "topk_group",
    "topk_method",
    "scoring_func",
    "norm_topk_prob",
    "e_score_correction_bias",
    "moe_layer_freq",
    "aux_loss_alpha",
    "num_nextn_predict_layers",
    "eh_proj",
    "enorm",
    "hnorm",
    "shared_head",
    "rope_interleave",
    "mscale",
)
_WORDS = re.compile(r"\b(" + "|".join(TECHNIQUE_NAMES) + r")\b")


def _hits(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    return [
        f"{path.relative_to(DSK.parent)}:{text.count(chr(10), 0, m.start()) + 1}: {m[0]}" for m in _WORDS.finditer(text)
    ]


def test_the_core_hf_module_names_no_technique():
    text = (DSK / "model" / "hf.py").read_text()
    assert _hits(DSK / "model" / "hf.py") == []
    # nor the techniques themselves, nor the built-in component names
    assert re.findall(r"(?i)\b(mla|moe|mtp|experts?|router|noaux_tc|yarn)\b", text) == []


def test_no_file_of_the_core_names_a_technique_field():
    # dsk.testing is the plugin-side test support (its tiny recipe sets the built-in attention and MoE by their recipe
    # options, as a recipe file does); the build path (dsk.train, dsk.model) never imports it
    files = [
        p
        for p in sorted(DSK.rglob("*"))
        if p.is_file() and p.suffix in (".py", ".md", ".cpp", ".h", ".toml") and (DSK / "testing") not in p.parents
    ]
    assert [hit for p in files for hit in _hits(p)] == []


# -- a third-party attention with its own adapter ----------------------------------------------------------------
class FusedConfig(BaseConfig):
    """Config of the test attention."""

    n_heads: int = Field(2, ge=1, description="attention heads")


class FusedQKV(nn.Module):
    """Causal attention with one fused QKV projection and no RoPE (positions enter through the causal mask only)."""

    def __init__(self, cfg: FusedConfig, ctx):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(ctx.dim, 3 * ctx.dim, bias=False)
        self.out = nn.Linear(ctx.dim, ctx.dim, bias=False)

    def forward(self, x, pos, mask=None, cache=None):
        """x [B, T, D] -> [B, T, D] (no cache)."""
        B, T, D = x.shape
        H = self.n_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # b t (three h d) -> three b h t d
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D/H)
        return self.out(o.transpose(1, 2).reshape(B, T, D))  # b h t d -> b t (h d)


class FusedAdapter:
    """Stores the fused projection as HF's separate q/k/v projections."""

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        return slot == "attention" and ckpt.config.get("attention_layout") == "fused_qkv"

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        return [] if ckpt.config.get("num_attention_heads") else ["num_attention_heads is missing"]

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict:
        return {"type": "fused_qkv", "n_heads": ckpt.config["num_attention_heads"]}

    def config_to_hf(self, config, where: str) -> dict:
        if config is None:
            return {}
        return {"attention_layout": "fused_qkv", "num_attention_heads": config.n_heads}

    def state_from_hf(self, state: dict, layout: HFLayout) -> dict:
        qkv = torch.cat([state.pop(f"{p}_proj.weight") for p in "qkv"])
        return {"qkv.weight": qkv, "out.weight": state.pop("o_proj.weight"), **state}

    def state_to_hf(self, state: dict, layout: HFLayout) -> dict:
        q, k, v = state["qkv.weight"].chunk(3)
        return {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": state["out.weight"]}


class FusedPlugin:
    @hookimpl
    def register_model_components(self, register):
        register("attention", "fused_qkv", FusedQKV, config=FusedConfig, hf=FusedAdapter)


@pytest.fixture(scope="module")
def registry():
    return build_registry(isolated_plugin_manager(FusedPlugin()))


def _model(registry, **overrides):
    table = copy.deepcopy(TINY)
    for key, value in overrides.items():
        if value is None:
            table.pop(key)
        else:
            table[key] = value
    torch.manual_seed(0)
    return build_model(ModelConfig.model_validate(table, context={"registry": registry})).eval()


def test_registry_lists_the_adapters_of_a_kind(registry):
    assert [s.name for s in registry.hf_specs("attention")] == ["fused_qkv", "mla"]  # mha has no HF form
    assert [s.name for s in registry.hf_specs("ffn")] == ["dense", "moe"]
    assert isinstance(registry.get("attention", "fused_qkv").hf_adapter(), FusedAdapter)
    assert registry.get("attention", "mha").hf_adapter() is None


def test_hf_adapters_are_for_model_components_only():
    class Bad:
        @hookimpl
        def register_tasks(self, register):
            register("task", "t", "x:y", hf="x:Adapter")

    pm = isolated_plugin_manager(Bad(), builtins=False)
    registry = build_registry(pm)
    assert any("hf= is for model components" in e for e in registry.errors)
    assert not isinstance(RegistryError("x"), CheckpointError)


def test_third_party_attention_round_trips_through_its_own_adapter(registry, tmp_path):
    model = _model(registry, attention={"type": "fused_qkv", "n_heads": 2}, mtp={"type": "mtp", "depth": 1})
    save_hf(model, tmp_path / "hf", registry=registry)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["attention_layout"] == "fused_qkv" and "kv_lora_rank" not in config
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight" in tensors and "model.layers.0.self_attn.qkv.weight" not in tensors
    assert "model.layers.3.self_attn.v_proj.weight" in tensors  # the MTP block's attention, mapped by the same adapter
    assert "model.layers.3.mlp.experts.3.up_proj.weight" in tensors  # ... and its MoE by the MoE adapter

    loaded = dsk.load_pretrained(tmp_path / "hf", registry=registry)
    assert loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    ids = torch.tensor([[3, 7, 1, 9, 4]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_checkpoint_no_installed_component_claims_is_refused_naming_the_slot(registry, tmp_path):
    save_hf(_model(registry, attention={"type": "fused_qkv"}, mtp=None), tmp_path / "hf", registry=registry)
    with pytest.raises(CheckpointError, match=r"config.json: .*model\.attention: no registered attention maps this"):
        dsk.load_pretrained(tmp_path / "hf")  # the built-in plugins only: mla does not claim it
    with pytest.raises(CheckpointError, match=r"mla: .*kv_lora_rank is missing"):
        dsk.load_pretrained(tmp_path / "hf")


def test_a_component_without_an_adapter_cannot_be_saved_in_hf_format(registry):
    model = _model(registry, attention={"type": "mha", "n_heads": 2}, mtp=None)
    with pytest.raises(CheckpointError, match=r"model\.attention = 'mha': this attention has no HF mapping"):
        model_config_to_hf(model.config, model.vocab_size, torch.float32, registry)


def test_two_components_writing_one_field_differently_is_refused(registry):
    class Clash(FusedAdapter):
        def config_to_hf(self, config, where):
            return {**super().config_to_hf(config, where), "hidden_act": "gelu"}

    class ClashPlugin:
        @hookimpl
        def register_model_components(self, register):
            register("attention", "clash", FusedQKV, config=FusedConfig, hf=Clash())

    reg = build_registry(isolated_plugin_manager(ClashPlugin()))
    model = _model(reg, attention={"type": "clash"}, mtp=None)
    with pytest.raises(CheckpointError, match=r"hidden_act: model\.dense_ffn writes 'silu', model\.attention wrote"):
        model_config_to_hf(model.config, model.vocab_size, torch.float32, reg)

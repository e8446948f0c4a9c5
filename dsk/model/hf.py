"""Checkpoints: HF-format DeepSeek-V3 directories and dsk checkpoint directories (formats in CHECKPOINT.md).

``load_pretrained(path)`` reads either format and returns a :class:`DSKModel`; ``save_hf`` / ``save_dsk`` write
them; ``convert`` goes from one to the other keeping every tensor's dtype and bits.

HF -> dsk names (spec §2.2): drop the ``model.`` prefix (``lm_head`` has none); stack the per-expert
``mlp.experts.{j}.{gate,up,down}_proj.weight`` into ``mlp.experts.w_{gate,up,down}`` [E, out, in]; the MTP layers
``model.layers.{num_hidden_layers + k}`` go to ``mtp.layers.{k}`` (``enorm``, ``hnorm``, ``eh_proj``,
``shared_head.norm`` directly; the transformer-block parts under ``block.``); their ``embed_tokens`` and
``shared_head.head`` are copies of the shared embedding and head and are skipped. FP8 weights with
``weight_scale_inv`` are dequantized block by block.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from dsk.api import ResolvedSlot, slot_kind
from dsk.model.build import build_model
from dsk.model.config import ModelConfig
from dsk.model.transformer import DSKModel

DSK_FORMAT = "dsk-model"
DSK_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, malformed or describes a model dsk cannot build (names the file)."""


# ---------------------------------------------------------------------------------------------------------------
# config mapping
# ---------------------------------------------------------------------------------------------------------------
def _hf_rope(hf: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, dsk rope_scaling table or None) from ``rope_parameters`` (HF v5) or ``rope_scaling`` (older)."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise CheckpointError(f"{where}: rope type {kind!r} is not supported (only default and yarn)")
    if params.get("attention_factor") is not None or params.get("truncate", True) is not True:
        raise CheckpointError(f"{where}: yarn 'attention_factor' and 'truncate' = false are not supported")
    original = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings", 4096)
    factor = params.get("factor") or hf.get("max_position_embeddings", original) / original
    # HF semantics: a missing or zero mscale / mscale_all_dim means "unset"; dsk spells that 0.
    return theta, {
        "type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(params.get("beta_fast") or 32),
        "beta_slow": float(params.get("beta_slow") or 1),
        "mscale": float(params.get("mscale") or 0),
        "mscale_all_dim": float(params.get("mscale_all_dim") or 0),
    }


def hf_to_model_table(hf: dict[str, Any], mtp_depth: int = 0, where: str = CONFIG_NAME) -> dict[str, Any]:
    """The dsk ``[model]`` table equivalent to an HF ``DeepseekV3Config`` dict.

    Args:
        hf: the parsed ``config.json``.
        mtp_depth: MTP modules whose weights are present (0 = no MTP heads).
        where: file name used in error messages.

    Raises:
        CheckpointError: a field has a value dsk does not implement (see ``unsupported_hf_fields``).
    """
    problems = unsupported_hf_fields(hf)
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems))
    theta, scaling = _hf_rope(hf, where)
    n_layers = int(hf["num_hidden_layers"])
    n_group = hf.get("n_group") or 1
    table: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "dim": int(hf["hidden_size"]),
        "n_layers": n_layers,
        "first_k_dense": min(int(hf.get("first_k_dense_replace") or 0), n_layers),
        "max_seq_len": int(hf.get("max_position_embeddings", 4096)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "attention": {
            "type": "mla",
            "n_heads": int(hf["num_attention_heads"]),
            "q_lora_rank": hf.get("q_lora_rank"),
            "kv_lora_rank": int(hf["kv_lora_rank"]),
            "qk_nope_head_dim": int(hf["qk_nope_head_dim"]),
            "qk_rope_head_dim": int(hf["qk_rope_head_dim"]),
            "v_head_dim": int(hf["v_head_dim"]),
            "rope_theta": theta,
            "rope_scaling": scaling,
        },
        "ffn": {
            "type": "moe",
            "n_routed_experts": int(hf["n_routed_experts"]),
            "n_shared_experts": int(hf.get("n_shared_experts") or 0),
            "expert_hidden_dim": int(hf["moe_intermediate_size"]),
            "router": {
                "type": "noaux_tc",
                "top_k": int(hf["num_experts_per_tok"]),
                "score_func": hf.get("scoring_func", "sigmoid"),
                "norm_topk_prob": bool(hf.get("norm_topk_prob", True)),
                "route_scale": float(hf.get("routed_scaling_factor", 1.0)),
                "n_groups": int(n_group),
                "topk_groups": int(hf.get("topk_group") or n_group),
                "group_score": "top2_sum",
            },
        },
        "dense_ffn": {"type": "dense", "hidden_dim": int(hf["intermediate_size"])},
    }
    if hf.get("aux_loss_alpha") is not None and hf.get("seq_aux", True):
        # DeepSeek's remote-code configs name the sequence-wise balance loss weight aux_loss_alpha (seq_aux = true)
        table["ffn"]["router"]["seq_aux_alpha"] = float(hf["aux_loss_alpha"])
    if table["attention"]["rope_scaling"] is None:
        del table["attention"]["rope_scaling"]
    if mtp_depth:
        table["mtp"] = {"type": "mtp", "depth": mtp_depth}
    return table


def unsupported_hf_fields(hf: dict[str, Any]) -> list[str]:
    """HF config values that dsk cannot reproduce (empty when the model loads exactly)."""
    problems = []
    if hf.get("model_type", "deepseek_v3") != "deepseek_v3":
        problems.append(f"model_type = {hf.get('model_type')!r}: only 'deepseek_v3' is supported")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act = {hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    if hf.get("attention_bias", False):
        problems.append("attention_bias = true is not supported (DeepSeek-V3 has no attention biases)")
    if hf.get("rope_interleave", True) is not True:
        problems.append("rope_interleave = false is not supported (dsk reads rope dims as interleaved pairs)")
    if hf.get("moe_layer_freq", 1) != 1:
        problems.append(f"moe_layer_freq = {hf['moe_layer_freq']}: only 1 (every layer after the dense ones) works")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        problems.append(f"topk_method = {hf['topk_method']!r}: only 'noaux_tc' is supported")
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "moe_intermediate_size",
        "num_experts_per_tok",
        "intermediate_size",
    ):
        if hf.get(key) is None:
            problems.append(f"{key} is missing")
    return problems


def model_config_from_table(table: dict[str, Any], where: str) -> ModelConfig:
    """Validate a ``[model]`` table (slots resolved through the current registry)."""
    try:
        return ModelConfig.model_validate(table)
    except ValidationError as exc:
        raise CheckpointError(f"{where}: the model table does not validate: {exc}") from exc
    except Exception as exc:  # a RecipeError from slot resolution: unknown component, bad option
        raise CheckpointError(f"{where}: the model table does not validate: {exc}") from exc


def _slot_name(slot: ResolvedSlot | None) -> str | None:
    return None if slot is None else slot.name


def model_config_to_hf(cfg: ModelConfig, vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """The HF ``DeepseekV3Config`` dict of a dsk model (mla + moe/noaux_tc + dense + optional mtp only).

    Raises:
        CheckpointError: the model uses a component the HF format cannot express (e.g. MHA, the aux_loss router).
    """
    names = {
        "model.attention": (_slot_name(cfg.attention), "mla"),
        "model.ffn": (_slot_name(cfg.ffn), "moe"),
        "model.dense_ffn": (_slot_name(cfg.dense_ffn), "dense"),
        "model.ffn.router": (_slot_name(getattr(cfg.ffn.config, "router", None)), "noaux_tc"),
    }
    bad = [f"{key} = {got!r} (HF DeepseekV3 needs {want!r})" for key, (got, want) in names.items() if got != want]
    if cfg.mtp is not None and cfg.mtp.name != "mtp":
        bad.append(f"model.mtp = {cfg.mtp.name!r} (HF DeepseekV3 needs 'mtp')")
    if bad:
        raise CheckpointError("cannot save in HF DeepseekV3 format: " + "; ".join(bad))
    att, moe, router = cfg.attention.config, cfg.ffn.config, cfg.ffn.config.router.config
    if router.group_score != "top2_sum":
        raise CheckpointError("cannot save in HF DeepseekV3 format: model.ffn.router.group_score must be 'top2_sum'")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": att.rope_theta}
    if att.rope_scaling is not None:
        y = att.rope_scaling
        rope = {
            "rope_type": "yarn",
            "type": "yarn",
            "rope_theta": att.rope_theta,
            "factor": y.factor,
            "original_max_position_embeddings": y.original_max_position_embeddings,
            "beta_fast": y.beta_fast,
            "beta_slow": y.beta_slow,
            "mscale": y.mscale,
            "mscale_all_dim": y.mscale_all_dim,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.dense_ffn.config.hidden_dim,
        "moe_intermediate_size": moe.expert_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": att.n_heads,
        "num_key_value_heads": att.n_heads,
        "n_shared_experts": moe.n_shared_experts,
        "n_routed_experts": moe.n_routed_experts,
        "routed_scaling_factor": router.route_scale,
        "kv_lora_rank": att.kv_lora_rank,
        "q_lora_rank": att.q_lora_rank,
        "qk_rope_head_dim": att.qk_rope_head_dim,
        "v_head_dim": att.v_head_dim,
        "qk_nope_head_dim": att.qk_nope_head_dim,
        "n_group": router.n_groups,
        "topk_group": router.topk_groups,
        "num_experts_per_tok": router.top_k,
        "first_k_dense_replace": cfg.first_k_dense,
        "norm_topk_prob": router.norm_topk_prob,
        "scoring_func": router.score_func,
        "topk_method": "noaux_tc",
        "aux_loss_alpha": router.seq_aux_alpha,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": att.rope_theta,
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
        "num_nextn_predict_layers": cfg.mtp.config.depth if cfg.mtp is not None else 0,
    }


def config_to_table(config: BaseModel) -> dict[str, Any]:
    """Every field of a config as JSON-ready values; slots become ``{"type": name, **options}`` tables.

    Unlike TOML, JSON keeps ``None`` (``q_lora_rank = None`` differs from its default), so nothing is dropped.
    """
    table: dict[str, Any] = {}
    for name, info in type(config).model_fields.items():
        value = getattr(config, name)
        if slot_kind(info) is not None or isinstance(value, ResolvedSlot):
            table[name] = None if value is None else {"type": value.name, **config_to_table(value.config)}
        elif isinstance(value, BaseModel):
            table[name] = config_to_table(value)
        else:
            table[name] = config.model_dump(mode="json", include={name})[name]
    return table


# ---------------------------------------------------------------------------------------------------------------
# state-dict mapping
# ---------------------------------------------------------------------------------------------------------------
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^(.*\.)experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_DSK_EXPERT = re.compile(r"^(.*\.)experts\.w_(gate|up|down)$")
_MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")


def hf_mtp_depth(keys: list[str] | set[str], n_layers: int) -> int:
    """Number of MTP layers (indices >= n_layers) whose tensors are present."""
    found = {int(m[1]) for k in keys if (m := _LAYER.match(k)) and int(m[1]) >= n_layers}
    return len(found)


def hf_to_dsk_state(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """Rename an HF DeepseekV3 state dict to dsk names (see the module docstring); tensors are not copied."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, value in hf.items():
        if key.endswith("rotary_emb.inv_freq"):  # old HF checkpoints saved this derived buffer
            continue
        if key == "lm_head.weight":
            name = key
        elif (m := _LAYER.match(key)) and int(m[1]) >= n_layers:
            k, sub = int(m[1]) - n_layers, m[2]
            if sub in _MTP_COPIES:
                continue
            name = f"mtp.layers.{k}.{sub}" if sub.startswith(_MTP_OWN) else f"mtp.layers.{k}.block.{sub}"
        elif key.startswith("model."):
            name = key[len("model.") :]
        else:
            name = key  # unknown: reported by the strict load
        if e := _HF_EXPERT.match(name):
            experts.setdefault((e[1], e[3]), {})[int(e[2])] = value
        else:
            out[name] = value
    for (prefix, proj), by_index in experts.items():
        n = max(by_index) + 1
        missing = sorted(set(range(n)) - set(by_index))
        if missing:
            raise CheckpointError(f"expert {missing[0]} of {prefix}experts ({proj}_proj) is missing")
        out[f"{prefix}experts.w_{proj}"] = torch.stack([by_index[j] for j in range(n)])
    return out


def dsk_to_hf_state(state: dict[str, torch.Tensor], n_layers: int, tied: bool) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_dsk_state`; MTP layers get the ``embed_tokens`` / ``shared_head.head`` copies."""
    out: dict[str, torch.Tensor] = {}
    mtp_layers: set[int] = set()
    for key, value in state.items():
        if key == "lm_head.weight":
            if not tied:
                out[key] = value
            continue
        if m := re.match(r"^mtp\.layers\.(\d+)\.(.+)$", key):
            k, sub = int(m[1]), m[2]
            mtp_layers.add(k)
            sub = sub[len("block.") :] if sub.startswith("block.") else sub
            name = f"model.layers.{n_layers + k}.{sub}"
        else:
            name = f"model.{key}"
        if e := _DSK_EXPERT.match(name):
            for j, w in enumerate(value.unbind(0)):
                out[f"{e[1]}experts.{j}.{e[2]}_proj.weight"] = w
        else:
            out[name] = value
    for k in sorted(mtp_layers):
        # The released weights carry these copies; engines expect them (spec §2.2).
        out[f"model.layers.{n_layers + k}.embed_tokens.weight"] = state["embed_tokens.weight"]
        out[f"model.layers.{n_layers + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return out


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """``W = W_fp8 * scale_inv`` per [block_out, block_in] tile (spec §2.2); ragged edge tiles are cropped.

    weight [out, in] float8, scale_inv [ceil(out/bo), ceil(in/bi)] -> float32 [out, in].
    """
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim].repeat_interleave(block[1], dim=1)
    return weight.float() * scale[:, :in_dim]


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: not found") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed by ``model.safetensors.index.json``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = directory / INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' table")
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).exists():
        files = [WEIGHTS_NAME]
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{directory}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            tensors.update(load_file(str(directory / name)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{directory / name}: cannot read safetensors ({exc})") from exc
    return tensors


def _dequantize_all(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Replace each ``X.weight`` that has an ``X.weight_scale_inv`` by its dequantized bfloat16 value.

    bfloat16, as DeepSeek's fp8_cast_bf16.py writes it: every FP8 value times a float32 scale fits in it exactly
    enough for inference, and it keeps the other tensors' dtype (bf16 in the released weights).
    """
    out = {}
    for key, value in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        scale = tensors.get(f"{key}_scale_inv")
        out[key] = dequantize_fp8(value, scale, block).to(torch.bfloat16) if scale is not None else value
    return out


def _load_strict(model: DSKModel, state: dict[str, torch.Tensor], where: Path, assign: bool) -> None:
    if model.config.tie_embeddings and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state = {**state, "lm_head.weight": state["embed_tokens.weight"]}
    expected = model.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s), e.g. {', '.join(unexpected[:3])}")
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if shapes:
        problems.append("shape mismatch " + "; ".join(shapes[:3]))
    if problems:
        raise CheckpointError(f"{where}: weights do not match the config: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=assign)
    if assign and model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight


def _finish(model: DSKModel, state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype | str | None) -> DSKModel:
    """Load ``state`` into ``model``: ``dtype="keep"`` keeps each stored tensor (dtype and bits), else cast."""
    if dtype == "keep":
        _load_strict(model, state, where, assign=True)
        return model.eval()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise CheckpointError(f"dtype = {dtype!r}: expected 'keep' or a torch dtype name such as 'bfloat16'")
        dtype = getattr(torch, dtype)
    model.to(dtype or torch.float32)
    _load_strict(model, state, where, assign=False)
    return model.eval()


def load_hf(path: str | Path, dtype: torch.dtype | str | None = None) -> DSKModel:
    """Load an HF-format DeepSeek-V3 directory (see :func:`load_pretrained`)."""
    directory = Path(path)
    hf = _read_json(directory / CONFIG_NAME)
    tensors = _read_safetensors(directory)
    quant = hf.get("quantization_config") or {}
    if any(k.endswith("_scale_inv") for k in tensors):
        block = tuple(quant.get("weight_block_size") or (128, 128))
        tensors = _dequantize_all(tensors, (int(block[0]), int(block[1])))
    n_layers = int(hf.get("num_hidden_layers", 0))
    depth = hf_mtp_depth(list(tensors), n_layers)
    table = hf_to_model_table(hf, mtp_depth=depth, where=str(directory / CONFIG_NAME))
    cfg = model_config_from_table(table, str(directory / CONFIG_NAME))
    model = build_model(cfg)
    return _finish(model, hf_to_dsk_state(tensors, n_layers), directory, dtype)


def load_dsk(path: str | Path, dtype: torch.dtype | str | None = None) -> DSKModel:
    """Load a dsk checkpoint directory (see CHECKPOINT.md and :func:`load_pretrained`)."""
    directory = Path(path)
    meta = _read_json(directory / CONFIG_NAME)
    where = directory / CONFIG_NAME
    if meta.get("format") != DSK_FORMAT or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{where}: not a dsk checkpoint (expected 'format': {DSK_FORMAT!r} and a 'model' table)")
    if int(meta.get("format_version", 0)) > DSK_FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {meta['format_version']} is newer than this dsk reads")
    cfg = model_config_from_table(meta["model"], str(where))
    model = build_model(cfg, meta.get("vocab_size"))
    from safetensors.torch import load_file

    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        raise CheckpointError(f"{weights}: not found")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: cannot read safetensors ({exc})") from exc
    return _finish(model, state, directory, dtype)


def checkpoint_format(path: str | Path) -> str:
    """``"hf"`` or ``"dsk"`` for a checkpoint directory, from its config.json."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory")
    meta = _read_json(directory / CONFIG_NAME)
    if meta.get("format") == DSK_FORMAT:
        return "dsk"
    if meta.get("model_type") == "deepseek_v3" or "DeepseekV3ForCausalLM" in (meta.get("architectures") or []):
        return "hf"
    raise CheckpointError(
        f"{directory / CONFIG_NAME}: neither a dsk checkpoint ('format': {DSK_FORMAT!r}) "
        "nor an HF DeepSeek-V3 one ('model_type': 'deepseek_v3')"
    )


def load_pretrained(path: str | Path, dtype: torch.dtype | str | None = None) -> DSKModel:
    """Load an HF-format DeepSeek-V3 directory or a dsk checkpoint directory as a :class:`DSKModel` in eval mode.

    Args:
        path: a directory with ``config.json`` and ``*.safetensors`` (HF: ``model.safetensors`` or shards with
            ``model.safetensors.index.json``; FP8 blocks with ``weight_scale_inv`` are dequantized; MTP layers
            ``model.layers.{num_hidden_layers + k}`` are loaded into ``model.mtp`` when present).
        dtype: parameter dtype (a torch dtype or its name); None = float32; ``"keep"`` keeps every stored tensor
            as it is (dtype and bits, used by :func:`convert`).

    Raises:
        CheckpointError: the directory is missing or malformed, or describes a model dsk cannot build.
    """
    fmt = checkpoint_format(path)
    return load_dsk(path, dtype) if fmt == "dsk" else load_hf(path, dtype)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, unbound expert slices): give each its own.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def _write_dir(
    path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], copy_files: tuple[Path, ...] = ()
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``copy_files``) into a temporary sibling, then rename it."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(_contiguous_copies(tensors), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        for f in copy_files:
            shutil.copy2(f, tmp / f.name)
        if target.exists():
            # keep the old checkpoint until the new one is complete, then swap
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def _weights_dtype(model: DSKModel) -> torch.dtype:
    return model.embed_tokens.weight.dtype


def save_hf(model: DSKModel, path: str | Path, copy_files: tuple[Path, ...] = ()) -> Path:
    """Write ``model`` as an HF DeepSeek-V3 directory (``config.json`` + ``model.safetensors``).

    Args:
        copy_files: files copied into the directory as they are (tokenizer files).

    Raises:
        CheckpointError: the model uses components the HF format cannot express.
    """
    config = model_config_to_hf(model.config, model.vocab_size, _weights_dtype(model))
    state = dsk_to_hf_state(model.state_dict(), model.config.n_layers, model.config.tie_embeddings)
    return _write_dir(path, state, config, copy_files)


def save_dsk(
    model: DSKModel, path: str | Path, extra: dict[str, Any] | None = None, copy_files: tuple[Path, ...] = ()
) -> Path:
    """Write ``model`` as a dsk checkpoint directory (CHECKPOINT.md).

    Args:
        extra: more JSON entries for config.json (e.g. ``{"tokenizer": ...}``); format keys cannot be overridden.
        copy_files: files copied into the directory as they are (tokenizer files).
    """
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    config = {
        **(extra or {}),
        "format": DSK_FORMAT,
        "format_version": DSK_FORMAT_VERSION,
        "vocab_size": model.vocab_size,
        "dtype": str(_weights_dtype(model)).removeprefix("torch."),
        "model": config_to_table(model.config),
    }
    return _write_dir(path, state, config, copy_files)


#: files that travel with the weights when a checkpoint is converted (DeepSeek's convert.py copies them too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Convert a checkpoint directory to ``to`` = ``"hf"`` or ``"dsk"``, keeping every tensor's dtype and bits.

    FP8 HF checkpoints are dequantized to bfloat16 on the way (the dsk model has no FP8 weights). Tokenizer
    files (``TOKENIZER_FILES``) are copied; a dsk config's extra entries (e.g. ``tokenizer``) are kept when
    converting to dsk.
    """
    if to not in ("hf", "dsk"):
        raise CheckpointError(f"unknown target format {to!r}: use 'hf' or 'dsk'")
    model = load_pretrained(src, dtype="keep")
    files = tuple(Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file())
    if to == "hf":
        return save_hf(model, dst, files)
    extra = None
    if checkpoint_format(src) == "dsk":
        meta = _read_json(Path(src) / CONFIG_NAME)
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "vocab_size", "dtype", "model")}
    return save_dsk(model, dst, extra, files)

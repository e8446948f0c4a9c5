"""Checkpoints: HF-format directories and dsk checkpoint directories (formats in CHECKPOINT.md).

``load_pretrained(path)`` reads either format and returns a :class:`DSKModel`; ``save_hf`` / ``save_dsk`` write
them; ``convert`` goes from one to the other keeping every tensor's dtype and bits.

The HF mapping is composed, as torchtitan's state-dict adapters are: this module maps the skeleton only (the
``model.`` prefix, embedding, final norm, output head and its tying, the per-layer names and norms, the layer-level
sizes) and the file format (shards, FP8 blocks with ``weight_scale_inv``). Each slot of the ``[model]`` table is
mapped by the :class:`dsk.api.HFAdapter` that its component registered (``register(..., hf="pkg.hf:Adapter")``):
its config fields, and its tensors with names relative to its module. Reading, the adapters *claim* the slots of
the HF config; writing, the adapter of the component in each slot writes its part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel

from dsk.api import HFCheckpoint, HFLayout, ResolvedSlot, slot_kind
from dsk.errors import InputError
from dsk.model.build import build_model
from dsk.model.config import ModelConfig
from dsk.model.transformer import DSKModel

if TYPE_CHECKING:  # pragma: no cover
    from dsk.registry import Registry

DSK_FORMAT = "dsk-model"
DSK_FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
HF_MODEL_TYPE = "deepseek_v3"
HF_ARCHITECTURE = "DeepseekV3ForCausalLM"

#: The slots inside every decoder layer and the block module holding them (as ``dsk.model.build`` builds the
#: blocks; HF names the modules the same). The FFN of layer i is ``dense_ffn`` below ``first_k_dense``, else ``ffn``.
#: Every other slot of the ``[model]`` table is a model-level component, held by the model attribute of its name;
#: it owns the HF decoder layers past ``num_hidden_layers``.
_LAYER_SLOTS = {"attention": "self_attn", "ffn": "mlp", "dense_ffn": "mlp"}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_DSK_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


class CheckpointError(InputError):
    """A checkpoint directory is missing, malformed or describes a model dsk cannot build (names the file)."""


def default_registry() -> Registry:
    """The registry of the installed plugins (built fresh: there is no process-wide registry)."""
    from dsk.plugins import make_plugin_manager
    from dsk.registry import build_registry

    return build_registry(make_plugin_manager())


def _model_slots() -> Iterator[tuple[str, str, bool]]:
    """(slot, kind, optional) for every component slot of the ``[model]`` table, in field order."""
    for name, info in ModelConfig.model_fields.items():
        marker = slot_kind(info)
        if marker is not None and not marker[2]:
            yield name, marker[0], marker[1] is None and not info.is_required()


def _layer_slot(cfg: ModelConfig, module: str, layer_idx: int) -> str | None:
    """The slot whose component is ``module`` of block ``layer_idx`` (blocks past ``n_layers`` use ``ffn``)."""
    if module == _LAYER_SLOTS["attention"]:
        return "attention"
    if module == _LAYER_SLOTS["ffn"]:
        return "dense_ffn" if layer_idx < cfg.first_k_dense else "ffn"
    return None


def _problems_text(problems: list[str]) -> str:
    # sorted: each problem starts with the field it is about, so the message reads like an index
    return "; ".join(sorted(set(problems)))


# ---------------------------------------------------------------------------------------------------------------
# config mapping
# ---------------------------------------------------------------------------------------------------------------
def _skeleton_problems(hf: dict[str, Any]) -> list[str]:
    problems = []
    if hf.get("model_type", HF_MODEL_TYPE) != HF_MODEL_TYPE:
        problems.append(f"model_type = {hf.get('model_type')!r}: only {HF_MODEL_TYPE!r} is supported")
    problems += [
        f"{key} is missing" for key in ("vocab_size", "hidden_size", "num_hidden_layers") if hf.get(key) is None
    ]
    return problems


def _claim_slots(ckpt: HFCheckpoint, registry: Registry) -> tuple[dict[str, Any], list[str]]:
    """(slot -> the adapter that claims it, every problem of the config), asking each slot kind's adapters."""
    problems = _skeleton_problems(ckpt.config)
    claimed: dict[str, Any] = {}
    for slot, kind, optional in _model_slots():
        candidates = [(spec, spec.hf_adapter()) for spec in registry.hf_specs(kind)]
        takers = [(spec, adapter) for spec, adapter in candidates if adapter.claims(slot, ckpt)]
        if len(takers) > 1:
            names = " and ".join(f"'{spec.qualified}'" for spec, _ in takers)
            problems.append(f"model.{slot}: the HF mappings of {names} all claim this config; disable one plugin")
        elif takers:
            claimed[slot] = takers[0][1]
            problems += takers[0][1].unsupported_hf_fields(ckpt)
        elif not optional:
            why = "; ".join(
                f"{spec.name}: {', '.join(adapter.unsupported_hf_fields(ckpt)) or 'does not claim it'}"
                for spec, adapter in candidates
            )
            problems.append(
                f"model.{slot}: no registered {kind} maps this config"
                + (f" ({why})" if why else f" (no {kind} with an HF mapping is installed)")
            )
    return claimed, problems


def unsupported_hf_fields(
    hf: dict[str, Any], keys: frozenset[str] | set[str] = frozenset(), registry: Registry | None = None
) -> list[str]:
    """HF config values that dsk cannot reproduce, sorted (empty when the model loads exactly).

    Args:
        hf: the parsed ``config.json``.
        keys: the checkpoint's tensor names (model-level components such as extra prediction heads are found by
            their tensors).
        registry: whose adapters map the slots; None = the installed plugins'.
    """
    ckpt = HFCheckpoint(config=hf, keys=frozenset(keys))
    return sorted(set(_claim_slots(ckpt, registry or default_registry())[1]))


def hf_to_model_table(
    hf: dict[str, Any],
    keys: frozenset[str] | set[str] = frozenset(),
    where: str = CONFIG_NAME,
    registry: Registry | None = None,
) -> dict[str, Any]:
    """The dsk ``[model]`` table equivalent to an HF config: the skeleton's fields, then each claimed slot's table.

    Args:
        hf: the parsed ``config.json``.
        keys: the checkpoint's tensor names.
        where: file name used in error messages.
        registry: whose adapters map the slots; None = the installed plugins'.

    Raises:
        CheckpointError: a field has a value dsk does not implement, or no component maps a slot (all at once).
    """
    ckpt = HFCheckpoint(config=hf, keys=frozenset(keys), where=where)
    claimed, problems = _claim_slots(ckpt, registry or default_registry())
    if problems:
        raise CheckpointError(_problems_text(problems), file=where)
    n_layers = int(hf["num_hidden_layers"])
    table: dict[str, Any] = {
        "vocab_size": int(hf["vocab_size"]),
        "dim": int(hf["hidden_size"]),
        "n_layers": n_layers,
        "first_k_dense": min(int(hf.get("first_k_dense_replace") or 0), n_layers),
        "max_seq_len": int(hf.get("max_position_embeddings", 4096)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "init_std": float(hf.get("initializer_range", 0.02)),
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }
    for slot, adapter in claimed.items():
        try:
            table[slot] = adapter.config_from_hf(slot, ckpt)
        except ValueError as exc:
            raise CheckpointError(f"model.{slot}: {exc}", file=where) from exc
    return table


def model_config_from_table(table: dict[str, Any], where: str, registry: Registry | None = None) -> ModelConfig:
    """Validate a ``[model]`` table, its slots resolved through ``registry`` (None = the installed plugins')."""
    from dsk.recipe.validate import validate_config

    config, problems = validate_config(registry or default_registry(), ModelConfig, table, "model", "[model]")
    if problems or config is None:
        detail = "; ".join(f"{p.path}: {p.message}" if p.path else p.message for p in problems)
        raise CheckpointError(f"the model table does not validate: {detail}", file=where)
    assert isinstance(config, ModelConfig)
    return config


def _adapter_of(value: ResolvedSlot, registry: Registry) -> Any:
    """The HF adapter the component in a slot registered, or None."""
    from dsk.registry import LookupFailed

    try:
        spec = registry.get(value.kind, f"{value.provider}:{value.name}" if value.provider else value.name)
    except LookupFailed:
        return None
    return spec.hf_adapter()


def _slot_adapters(cfg: ModelConfig, registry: Registry) -> tuple[dict[str, Any], list[str]]:
    """(slot -> adapter of its component, problems) for every filled slot of ``cfg``."""
    adapters, problems = {}, []
    for slot, kind, _optional in _model_slots():
        value = getattr(cfg, slot)
        if value is None:
            continue
        adapter = _adapter_of(value, registry)
        if adapter is None:
            problems.append(f"model.{slot} = {value.name!r}: this {kind} has no HF mapping")
        adapters[slot] = adapter
    return adapters, problems


def model_config_to_hf(
    cfg: ModelConfig, vocab_size: int, dtype: torch.dtype, registry: Registry | None = None
) -> dict[str, Any]:
    """The HF ``config.json`` dict of a dsk model: the skeleton's fields, then each slot adapter's.

    An empty optional slot asks every adapter of its kind for the fields that say the component is absent.

    Raises:
        CheckpointError: a component has no HF mapping or uses something the format cannot express, or two
            components set one field to different values (all problems at once).
    """
    registry = registry or default_registry()
    adapters, problems = _slot_adapters(cfg, registry)
    out: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "dtype": str(dtype).removeprefix("torch."),
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.first_k_dense,
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    set_by = dict.fromkeys(out, "the model skeleton")
    for slot, kind, _optional in _model_slots():
        value = getattr(cfg, slot)
        if value is not None:
            writers = [(adapters[slot], value.config)] if adapters[slot] is not None else []
        else:
            writers = [(spec.hf_adapter(), None) for spec in registry.hf_specs(kind)]
        for adapter, config in writers:
            try:
                fields = adapter.config_to_hf(config, f"model.{slot}")
            except ValueError as exc:
                problems.append(str(exc))
                continue
            for key, field_value in fields.items():
                if key in out and out[key] != field_value:
                    problems.append(f"{key}: model.{slot} writes {field_value!r}, {set_by[key]} wrote {out[key]!r}")
                    continue
                out[key] = field_value
                set_by.setdefault(key, f"model.{slot}")
    if problems:
        raise CheckpointError("cannot save in HF DeepseekV3 format: " + _problems_text(problems))
    return out


def config_to_table(config: BaseModel) -> dict[str, Any]:
    """Every field of a config as JSON-ready values; slots become ``{"type": name, **options}`` tables.

    Unlike TOML, JSON keeps ``None`` (an optional field set to None can differ from its default), so nothing is
    dropped.
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
class _StateMapper:
    """The skeleton's HF <-> dsk tensor names, handing each slot's tensors to its component's adapter."""

    def __init__(self, cfg: ModelConfig, adapters: dict[str, Any], where: str = "", shared: dict | None = None):
        self.cfg = cfg
        self.adapters = adapters
        self.where = f"{where}: " if where else ""
        self.layout = HFLayout(
            n_layers=cfg.n_layers, block_from_hf=self.block_from_hf, block_to_hf=self.block_to_hf, shared=shared or {}
        )

    def _map_block(self, tensors: dict[str, Any], layer_idx: int, to_hf: bool) -> dict[str, Any]:
        """One block's tensors (keys relative to the layer): the slot modules through their adapters."""
        out: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            module, dot, rest = key.partition(".")
            if dot and _layer_slot(self.cfg, module, layer_idx) is not None:
                parts.setdefault(module, {})[rest] = value
            else:
                out[key] = value  # the block's own norms: the same name on both sides
        for module, part in parts.items():
            adapter = self.adapters.get(_layer_slot(self.cfg, module, layer_idx))
            if adapter is not None:
                try:
                    part = adapter.state_to_hf(part, self.layout) if to_hf else adapter.state_from_hf(part, self.layout)
                except ValueError as exc:
                    raise CheckpointError(f"{self.where}model.layers.{layer_idx}.{module}: {exc}") from exc
            out.update({f"{module}.{k}": v for k, v in part.items()})
        return out

    def block_from_hf(self, tensors: dict[str, Any], layer_idx: int) -> dict[str, Any]:
        """HF decoder layer ``layer_idx`` (keys relative to it) -> dsk block names."""
        return self._map_block(tensors, layer_idx, to_hf=False)

    def block_to_hf(self, tensors: dict[str, Any], layer_idx: int) -> dict[str, Any]:
        """dsk block ``layer_idx`` (keys relative to it) -> HF decoder layer names."""
        return self._map_block(tensors, layer_idx, to_hf=True)

    def _model_level(self) -> list[tuple[str, Any]]:
        return [(slot, a) for slot, a in self.adapters.items() if slot not in _LAYER_SLOTS and a is not None]

    def from_hf(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        extra: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key.endswith("rotary_emb.inv_freq"):  # old HF checkpoints saved this derived buffer
                continue
            if key == "lm_head.weight":
                out[key] = value
            elif m := _LAYER.match(key):
                if int(m[1]) < self.cfg.n_layers:
                    layers.setdefault(int(m[1]), {})[m[2]] = value
                else:
                    extra[key] = value
            elif key.startswith("model."):
                out[key[len("model.") :]] = value
            else:
                out[key] = value  # unknown: reported by the strict load
        for i, block in sorted(layers.items()):
            out.update({f"layers.{i}.{k}": v for k, v in self.block_from_hf(block, i).items()})
        owners = self._model_level()
        if extra and len(owners) > 1:
            names = ", ".join(f"model.{slot}" for slot, _ in owners)
            raise CheckpointError(f"{self.where}the layers past num_hidden_layers could belong to any of {names}")
        if extra and owners:
            slot, adapter = owners[0]
            try:
                mapped = adapter.state_from_hf(extra, self.layout)
            except ValueError as exc:
                raise CheckpointError(f"{self.where}model.{slot}: {exc}") from exc
            out.update({f"{slot}.{k}": v for k, v in mapped.items()})
        else:
            out.update({k[len("model.") :]: v for k, v in extra.items()})  # unexpected: the strict load names them
        return out

    def to_hf(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        layers: dict[int, dict[str, torch.Tensor]] = {}
        owned: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot, _ in self._model_level()}
        for key, value in state.items():
            head, _, rest = key.partition(".")
            if key == "lm_head.weight":
                if not self.cfg.tie_embeddings:
                    out[key] = value
            elif m := _DSK_LAYER.match(key):
                layers.setdefault(int(m[1]), {})[m[2]] = value
            elif head in owned:
                owned[head][rest] = value
            else:
                out[f"model.{key}"] = value
        for i, block in sorted(layers.items()):
            out.update({f"model.layers.{i}.{k}": v for k, v in self.block_to_hf(block, i).items()})
        for slot, adapter in self._model_level():
            try:
                out.update(adapter.state_to_hf(owned[slot], self.layout))
            except ValueError as exc:
                raise CheckpointError(f"{self.where}model.{slot}: {exc}") from exc
        return out


def hf_to_dsk_state(
    tensors: dict[str, torch.Tensor], cfg: ModelConfig, registry: Registry | None = None, where: str = ""
) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to the dsk names of the model ``cfg`` describes; tensors are not copied.

    The skeleton's names lose the ``model.`` prefix; each slot's tensors go through its component's adapter; the
    decoder layers past ``num_hidden_layers`` go to the model-level component (when one is configured).
    """
    adapters, _ = _slot_adapters(cfg, registry or default_registry())
    return _StateMapper(cfg, adapters, where).from_hf(tensors)


def dsk_to_hf_state(
    state: dict[str, torch.Tensor], cfg: ModelConfig, registry: Registry | None = None
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_dsk_state`; the output head is left out when tied to the embedding.

    Raises:
        CheckpointError: a component in a slot has no HF mapping.
    """
    adapters, problems = _slot_adapters(cfg, registry or default_registry())
    if problems:
        raise CheckpointError("cannot save in HF DeepseekV3 format: " + _problems_text(problems))
    # the tensors outside every component, for adapters that store copies of them (e.g. a head per layer)
    shared = {k: v for k, v in state.items() if not _DSK_LAYER.match(k) and k.partition(".")[0] not in adapters}
    return _StateMapper(cfg, adapters, shared=shared).to_hf(state)


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """``W = W_fp8 * scale_inv`` per [block_out, block_in] tile (spec §2.2); ragged edge tiles are cropped.

    weight [out, in] float8, scale_inv [ceil(out/bo), ceil(in/bi)] -> float32 [out, in] (the product of an E4M3
    value and a float32 scale, rounded once to float32).
    """
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:out_dim].repeat_interleave(block[1], dim=1)
    return weight.float() * scale[:, :in_dim]


#: the FP8 formats a DeepSeek-V3 checkpoint's ``quantization_config.fmt`` may name, and their torch dtypes
_FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def fp8_block_size(hf: dict[str, Any], where: str) -> tuple[int, int]:
    """The ``[block_out, block_in]`` of a DeepSeek-V3 FP8 checkpoint's ``quantization_config`` (default 128 x 128).

    Raises:
        CheckpointError: the config names another quantisation method or format, or a malformed block size.
    """
    quant = hf.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise CheckpointError(f"{where}: quantization_config must be a JSON object, got {quant!r}")
    method = quant.get("quant_method", "fp8")
    if method != "fp8":
        raise CheckpointError(f"{where}: quantization_config.quant_method = {method!r}: only 'fp8' can be read")
    fmt = quant.get("fmt", "e4m3")
    if fmt not in _FP8_FORMATS:
        raise CheckpointError(f"{where}: quantization_config.fmt = {fmt!r}: expected one of {sorted(_FP8_FORMATS)}")
    block = quant.get("weight_block_size") or [128, 128]
    if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(
            f"{where}: quantization_config.weight_block_size = {block!r}: expected [block_out, block_in]"
        )
    return int(block[0]), int(block[1])


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


def _dequantize_all(
    tensors: dict[str, torch.Tensor], block: tuple[int, int], keep: bool, where: str
) -> dict[str, torch.Tensor]:
    """Replace each ``X.weight`` that has an ``X.weight_scale_inv`` by its dequantized value.

    float32 (one rounding of ``W_fp8 * scale_inv``); with ``keep`` (:func:`convert`, ``dtype="keep"``) it is cast
    to the dtype of the checkpoint's other floating-point weights, as DeepSeek's fp8_cast_bf16.py writes bfloat16
    next to the released bf16 tensors.
    """
    others = [
        v.dtype
        for k, v in tensors.items()
        if v.is_floating_point() and v.element_size() > 1 and not k.endswith("_scale_inv")
    ]
    keep_dtype = max(set(others), key=others.count) if keep and others else torch.float32
    out = {}
    for key, value in tensors.items():
        if key.endswith("_scale_inv"):
            if key.removesuffix("_scale_inv") not in tensors:
                raise CheckpointError(f"{where}: {key} has no weight {key.removesuffix('_scale_inv')}")
            continue
        scale = tensors.get(f"{key}_scale_inv")
        if scale is None:
            out[key] = value
            continue
        if value.dim() != 2 or value.element_size() != 1:
            raise CheckpointError(f"{where}: {key} has a scale_inv but is {value.dtype} {tuple(value.shape)}")
        want = tuple(-(-n // b) for n, b in zip(value.shape, block, strict=True))
        if tuple(scale.shape) != want:
            raise CheckpointError(
                f"{where}: {key}_scale_inv has shape {tuple(scale.shape)}; {key} {tuple(value.shape)} in "
                f"{block[0]} x {block[1]} blocks needs {want}"
            )
        out[key] = dequantize_fp8(value, scale, block).to(keep_dtype)
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


def load_hf(path: str | Path, dtype: torch.dtype | str | None = None, registry: Registry | None = None) -> DSKModel:
    """Load an HF-format directory (see :func:`load_pretrained`)."""
    registry = registry or default_registry()
    directory = Path(path)
    where = str(directory / CONFIG_NAME)
    hf = _read_json(directory / CONFIG_NAME)
    tensors = _read_safetensors(directory)
    if hf.get("quantization_config") is not None or any(k.endswith("_scale_inv") for k in tensors):
        tensors = _dequantize_all(tensors, fp8_block_size(hf, where), dtype == "keep", str(directory))
    table = hf_to_model_table(hf, frozenset(tensors), where=where, registry=registry)
    cfg = model_config_from_table(table, where, registry)
    model = build_model(cfg)
    return _finish(model, hf_to_dsk_state(tensors, cfg, registry, str(directory)), directory, dtype)


def load_dsk(path: str | Path, dtype: torch.dtype | str | None = None, registry: Registry | None = None) -> DSKModel:
    """Load a dsk checkpoint directory (see CHECKPOINT.md and :func:`load_pretrained`)."""
    directory = Path(path)
    meta = _read_json(directory / CONFIG_NAME)
    where = directory / CONFIG_NAME
    if meta.get("format") != DSK_FORMAT or not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{where}: not a dsk checkpoint (expected 'format': {DSK_FORMAT!r} and a 'model' table)")
    if int(meta.get("format_version", 0)) > DSK_FORMAT_VERSION:
        raise CheckpointError(f"{where}: format_version {meta['format_version']} is newer than this dsk reads")
    cfg = model_config_from_table(meta["model"], str(where), registry)
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
    if meta.get("model_type") == HF_MODEL_TYPE or HF_ARCHITECTURE in (meta.get("architectures") or []):
        return "hf"
    raise CheckpointError(
        f"{directory / CONFIG_NAME}: neither a dsk checkpoint ('format': {DSK_FORMAT!r}) "
        f"nor an HF DeepSeek-V3 one ('model_type': {HF_MODEL_TYPE!r})"
    )


def load_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = None, registry: Registry | None = None
) -> DSKModel:
    """Load an HF-format DeepSeek-V3 directory or a dsk checkpoint directory as a :class:`DSKModel` in eval mode.

    Args:
        path: a directory with ``config.json`` and ``*.safetensors`` (HF: ``model.safetensors`` or shards with
            ``model.safetensors.index.json``; FP8 blocks with ``weight_scale_inv`` are dequantized to float32
            (DeepSeek-V3's published FP8 weights: E4M3 with one scale per 128 x 128 block); a model-level
            component, e.g. extra prediction heads, is loaded when its tensors are present).
        dtype: parameter dtype (a torch dtype or its name); None = float32; ``"keep"`` keeps every stored tensor
            as it is (dtype and bits, used by :func:`convert`).
        registry: the components (and their HF adapters) the model is built from; None = the installed plugins'.

    Raises:
        CheckpointError: the directory is missing or malformed, or describes a model dsk cannot build.
    """
    registry = registry or default_registry()
    fmt = checkpoint_format(path)
    return load_dsk(path, dtype, registry) if fmt == "dsk" else load_hf(path, dtype, registry)


# ---------------------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------------------
def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, slices an adapter unbound from a stack):
    # give each its own.
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


def save_hf(
    model: DSKModel, path: str | Path, copy_files: tuple[Path, ...] = (), registry: Registry | None = None
) -> Path:
    """Write ``model`` as an HF DeepSeek-V3 directory (``config.json`` + ``model.safetensors``).

    Args:
        copy_files: files copied into the directory as they are (tokenizer files).
        registry: where the components' HF adapters are registered; None = the installed plugins'.

    Raises:
        CheckpointError: the model uses components the HF format cannot express.
    """
    registry = registry or default_registry()
    config = model_config_to_hf(model.config, model.vocab_size, _weights_dtype(model), registry)
    state = dsk_to_hf_state(model.state_dict(), model.config, registry)
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


def convert(src: str | Path, dst: str | Path, to: str, registry: Registry | None = None) -> Path:
    """Convert a checkpoint directory to ``to`` = ``"hf"`` or ``"dsk"``, keeping every tensor's dtype and bits.

    FP8 HF checkpoints are dequantized on the way (the dsk model has no FP8 weights), to the dtype of their other
    weights (bfloat16 in the published DeepSeek-V3 checkpoint). Tokenizer
    files (``TOKENIZER_FILES``) are copied; a dsk config's extra entries (e.g. ``tokenizer``) are kept when
    converting to dsk. ``registry``: the components and their HF adapters; None = the installed plugins'.
    """
    if to not in ("hf", "dsk"):
        raise CheckpointError(f"unknown target format {to!r}: use 'hf' or 'dsk'")
    registry = registry or default_registry()
    model = load_pretrained(src, dtype="keep", registry=registry)
    files = tuple(Path(src) / name for name in TOKENIZER_FILES if (Path(src) / name).is_file())
    if to == "hf":
        return save_hf(model, dst, files, registry)
    extra = None
    if checkpoint_format(src) == "dsk":
        meta = _read_json(Path(src) / CONFIG_NAME)
        extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "vocab_size", "dtype", "model")}
    return save_dsk(model, dst, extra, files)

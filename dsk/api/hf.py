"""The HF checkpoint contract: how a component maps its config and weights to and from HF-format checkpoints.

Torch-free and re-exported by :mod:`dsk.api`. The core's ``dsk.model.hf`` (``load_pretrained``, ``save_hf``,
``dsk convert``) is the only caller; a plugin implements :class:`HFAdapter` for its component and names it when it
registers the component (``hf="pkg.hf:Adapter"``). The core maps the skeleton only: the ``model.`` prefix, the
embedding, final norm, output head (tied or not), the per-layer names and norms, the layer-level sizes, the file
format (shards, FP8 block scales). Every technique's fields and tensor names live in its plugin's adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["HFAdapter", "HFCheckpoint", "HFLayout"]


@dataclass(frozen=True)
class HFCheckpoint:
    """What an :class:`HFAdapter` sees of an HF-format checkpoint being read.

    Attributes:
        config: the parsed ``config.json`` (fields may be missing: adapters read them with ``.get``).
        keys: the names of every tensor in the checkpoint's safetensors files.
        where: the config file's path, for messages.
    """

    config: dict[str, Any]
    keys: frozenset[str] = frozenset()
    where: str = "config.json"


@dataclass(frozen=True)
class HFLayout:
    """How the model skeleton lays out an HF state dict, handed to an adapter's weight methods.

    Attributes:
        n_layers: ``num_hidden_layers``; HF decoder layers ``model.layers.{i}`` with ``i >= n_layers`` are not main
            layers, and belong to the model-level component of the model (one outside the layers).
        block_from_hf: ``(tensors, layer_idx) -> tensors``: map one decoder layer's HF tensors (keys relative to
            ``model.layers.{i}.``) to dsk names relative to a block, through that layer's attention and FFN adapters;
            for model-level components that contain whole blocks.
        block_to_hf: the inverse of ``block_from_hf``.
        shared: the model's tensors outside every component, by dsk name (``embed_tokens.weight``,
            ``lm_head.weight``), for components whose HF layout stores copies of them; empty when reading.
    """

    n_layers: int
    block_from_hf: Callable[[dict[str, Any], int], dict[str, Any]]
    block_to_hf: Callable[[dict[str, Any], int], dict[str, Any]]
    shared: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class HFAdapter(Protocol):
    """Maps one component's config fields and weights to and from an HF checkpoint (``DeepseekV3ForCausalLM``).

    A component declares its adapter when it registers: ``register("attention", "mla", "pkg.mla:MLA",
    config=MLAConfig, hf="pkg.hf:MLAAdapter")`` (a lazy ``"module:attr"`` naming a class, instantiated without
    arguments, or an instance). ``load_pretrained``, ``save_hf`` and ``dsk convert`` compose the adapters of the
    components in the model's slots; the core maps only the skeleton (embedding, norms, head, layer names,
    layer-level sizes) and the file format.

    ``slot`` is a field name of the ``[model]`` table (``attention``, ``ffn``, ``dense_ffn``, ...). Names on the
    two sides are relative to where the component sits: dsk names to its module; HF names to its module inside a
    decoder layer (``model.layers.{i}.self_attn.`` for the attention, ``model.layers.{i}.mlp.`` for an FFN), or to
    the checkpoint root for a model-level component. A tensor an adapter does not recognise is returned under its
    own name, so the strict load names it. Problems are raised as ``ValueError`` with a message naming the field.
    """

    def claims(self, slot: str, ckpt: HFCheckpoint) -> bool:
        """Whether this component fills ``slot`` of the model ``ckpt`` describes (its defining fields are there).

        Exactly one registered component may claim a slot that has a default; none claiming leaves an optional
        slot empty.
        """
        ...

    def unsupported_hf_fields(self, ckpt: HFCheckpoint) -> list[str]:
        """Config values this component cannot reproduce, each ``"field = value: why"`` (empty: it loads exactly)."""
        ...

    def config_from_hf(self, slot: str, ckpt: HFCheckpoint) -> dict[str, Any]:
        """The slot's table: ``type`` and the options, nested slots (e.g. a router) as nested tables."""
        ...

    def config_to_hf(self, config: Any, where: str) -> dict[str, Any]:
        """The HF config fields this component sets, from its validated config (``where`` = its key, for messages).

        ``config`` is None when the slot is empty (an optional slot left out): return the fields that say the
        component is absent (e.g. a depth of 0, since HF's defaults may assume one), or ``{}``.

        Raises:
            ValueError: the config uses something the HF format cannot express.
        """
        ...

    def state_from_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """This component's tensors under dsk names; copies that the HF layout stores redundantly are dropped.

        Raises:
            ValueError: the tensors are incomplete (e.g. one expert of a stack is missing).
        """
        ...

    def state_to_hf(self, state: dict[str, Any], layout: HFLayout) -> dict[str, Any]:
        """The inverse of :meth:`state_from_hf` (tensors are not copied)."""
        ...

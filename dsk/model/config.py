"""The model table of a recipe: ``[model]`` sizes and the component slots each layer is built from.

Torch-free: the recipe validator imports it. The slots are filled from the registry, so a recipe chooses
``[model.attention] type = "mla"`` or ``"mha"``, ``[model.ffn] type = "moe"`` and so on.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from dsk.api import BaseConfig, ResolvedSlot, Slot, SlotField


class ModelConfig(BaseConfig):
    """Sizes of the transformer skeleton and the components of its layers (``[model]``).

    Layer ``i`` is ``x + attention(norm(x))`` then ``x + ffn(norm(x))`` (pre-norm, spec §1.9); the FFN is
    ``dense_ffn`` for ``i < first_k_dense`` and ``ffn`` (the MoE) after, as DeepSeek-V3's first three layers.
    """

    vocab_size: int | None = Field(
        None,
        ge=1,
        le=2**24,
        description="vocabulary size; leave unset to take it from the tokenizer when the model is built",
    )
    dim: int = Field(128, ge=1, le=2**18, description="hidden size D (at most 262144: V3 is 7168)")
    n_layers: int = Field(4, ge=1, le=4096, description="number of transformer layers (MTP blocks not counted)")
    first_k_dense: int = Field(
        1, ge=0, description="the first k layers use dense_ffn instead of ffn (DeepSeek-V3: 3, first_k_dense_replace)"
    )
    max_seq_len: int = Field(
        512, ge=1, le=2**24, description="longest sequence (prompt + generated) the model supports"
    )
    norm_eps: float = Field(1e-6, gt=0, description="epsilon of every RMSNorm")
    init_std: float = Field(
        0.02, gt=0, description="std of the normal init of linear and embedding weights (paper: 0.006, HF: 0.02)"
    )
    tie_embeddings: bool = Field(False, description="share the output head's weight with the token embedding")
    attention: Annotated[ResolvedSlot, Slot("attention", "mla")] = SlotField(
        "attention", default="mla", description="attention layer of every block"
    )
    ffn: Annotated[ResolvedSlot, Slot("ffn", "moe")] = SlotField(
        "ffn", default="moe", description="feed-forward layer of the layers >= first_k_dense (and of the MTP blocks)"
    )
    dense_ffn: Annotated[ResolvedSlot, Slot("ffn", "dense")] = SlotField(
        "ffn", default="dense", description="feed-forward layer of the first first_k_dense layers"
    )
    mtp: Annotated[ResolvedSlot | None, Slot("mtp", "mtp")] = SlotField(
        "mtp", default=None, description="multi-token prediction heads (none when the table is absent)"
    )

    @model_validator(mode="after")
    def _dense_layers_fit(self) -> ModelConfig:
        if self.first_k_dense > self.n_layers:
            raise ValueError(
                f"first_k_dense = {self.first_k_dense} is more than n_layers = {self.n_layers}; "
                f"allowed: 0..{self.n_layers}"
            )
        return self

"""Configs of the attention layers: MLA (DeepSeek-V2/V3) and the standard MHA baseline.

Torch-free: imported by ``dsk --help`` and recipe validation. Field names follow the HF ``DeepseekV3Config``
(spec §2.1) so that a loader can copy them across; the defaults are DeepSeek-V3's (spec §4.1).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_serializer, field_validator, model_validator

from dsk.api import BaseConfig

__all__ = ["MHAConfig", "MLAConfig", "YarnConfig"]


class YarnConfig(BaseConfig):
    """YaRN context extension of RoPE, with the semantics of HF ``_compute_yarn_parameters`` (spec §1.5, §2.3 item 4).

    Applied whenever the table is present (HF behaviour); the reference code applies it only when
    ``max_seq_len > original_max_position_embeddings``.
    """

    type: Literal["yarn"] = Field("yarn", description="RoPE scaling kind; only 'yarn' is supported")
    factor: float = Field(40.0, ge=1.0, description="context extension factor s (low frequencies are divided by it)")
    original_max_position_embeddings: int = Field(
        4096, ge=1, description="context length of pre-training, L_orig in the correction-range formula"
    )
    beta_fast: float = Field(32.0, gt=0, description="rotations beyond which a frequency is kept (extrapolated)")
    beta_slow: float = Field(1.0, gt=0, description="rotations below which a frequency is divided by factor")
    mscale: float = Field(
        1.0,
        ge=0,
        description="numerator of the cos/sin attention factor mscale(factor, mscale)/mscale(factor, mscale_all_dim); "
        "0 = unset (HF then uses 0.1*ln(factor)+1)",
    )
    mscale_all_dim: float = Field(
        1.0,
        ge=0,
        description="softmax scale is multiplied by (0.1*mscale_all_dim*ln(factor)+1)^2; 0 = unset (no softmax rescale)",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_hf_rope_type(cls, data: Any) -> Any:
        # HF writes the kind as `type` (old configs), `rope_type` (new ones) or both; accept either spelling.
        if isinstance(data, dict) and "rope_type" in data:
            data = dict(data)
            rope_type = data.pop("rope_type")
            if data.setdefault("type", rope_type) != rope_type:
                raise ValueError(f"rope_scaling.rope_type = {rope_type!r} disagrees with type = {data['type']!r}")
        return data

    @model_validator(mode="after")
    def _betas_ordered(self) -> YarnConfig:
        if self.beta_fast <= self.beta_slow:
            raise ValueError(
                f"rope_scaling.beta_fast = {self.beta_fast} must be > rope_scaling.beta_slow = {self.beta_slow}"
            )
        return self


class MLAConfig(BaseConfig):
    """Multi-head Latent Attention (spec §1.6, report eqs 1-11)."""

    n_heads: int = Field(128, ge=1, le=4096, description="attention heads H")
    q_lora_rank: int | None = Field(
        1536,
        ge=1,
        le=2**16,
        description="rank of the query compression c_Q; 0 (None in Python) = plain q_proj (DeepSeek-V2-Lite)",
    )

    @field_validator("q_lora_rank", mode="before")
    @classmethod
    def _zero_is_none(cls, v: Any) -> Any:
        # TOML has no None: a recipe writes 0 for "no query compression" (and resolved.toml writes None as 0)
        return None if v == 0 and not isinstance(v, bool) else v

    @field_serializer("q_lora_rank")
    def _none_is_zero(self, v: int | None) -> int:
        return 0 if v is None else v

    kv_lora_rank: int = Field(512, ge=1, le=2**16, description="rank of the joint KV latent c_KV (the cached vector)")
    qk_nope_head_dim: int = Field(128, ge=1, le=2**14, description="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = Field(
        64, ge=2, le=2**14, description="per-head query dims with RoPE; the rope key is shared by heads"
    )
    v_head_dim: int = Field(128, ge=1, le=2**14, description="per-head value dims")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    rope_scaling: YarnConfig | None = Field(None, description="optional YaRN table (HF rope_scaling semantics)")
    decode_cache: Literal["latent", "full"] = Field(
        "latent",
        description="KV cache layout: 'latent' caches kv_lora_rank+qk_rope_head_dim values per token and decodes "
        "with the absorbed path; 'full' caches per-head K and V (naive baseline)",
    )

    @field_validator("qk_rope_head_dim")
    @classmethod
    def _rope_dim_even(cls, v: int) -> int:
        if v % 2:
            raise ValueError(f"qk_rope_head_dim = {v}: must be even (RoPE rotates pairs of dims)")
        return v

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key dims: qk_nope_head_dim + qk_rope_head_dim."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def linear_in_features(self, dim: int) -> dict[str, int]:
        """The Ks besides D (:class:`dsk.api.LinearShapes`): q_b_proj's, kv_b_proj's and o_proj's (H * v_head_dim)."""
        ks = {} if self.q_lora_rank is None else {"q_lora_rank": self.q_lora_rank}
        return {**ks, "kv_lora_rank": self.kv_lora_rank, "v_head_dim": self.n_heads * self.v_head_dim}


class MHAConfig(BaseConfig):
    """Standard multi-head attention with RoPE on the whole head and a full K/V cache (the baseline)."""

    n_heads: int = Field(16, ge=1, le=4096, description="attention heads H (one K/V head per query head)")
    head_dim: int | None = Field(
        None,
        ge=2,
        le=2**14,
        description="per-head dims; None = model dim // n_heads (the model dim must then be divisible)",
    )
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")

    @field_validator("head_dim")
    @classmethod
    def _head_dim_even(cls, v: int | None) -> int | None:
        if v is not None and v % 2:
            raise ValueError(f"head_dim = {v}: must be even (RoPE rotates pairs of dims)")
        return v

    def linear_in_features(self, dim: int) -> dict[str, int]:
        """The Ks besides D (:class:`dsk.api.LinearShapes`): o_proj's, n_heads * head_dim."""
        if self.head_dim is None:
            return {"n_heads": self.n_heads * (dim // self.n_heads)}
        return {"head_dim": self.n_heads * self.head_dim}

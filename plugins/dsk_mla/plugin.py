"""Hook implementations of dsk_mla (torch-free: the modules are named as lazy strings)."""

from dsk import hookimpl
from dsk_mla.config import MHAConfig, MLAConfig


@hookimpl
def register_model_components(register):
    """Register the attention layers: ``mla`` (DeepSeek-V3) and ``mha`` (the baseline)."""
    register(
        "attention",
        "mla",
        "dsk_mla.mla:MLA",
        config=MLAConfig,
        hf="dsk_mla.hf:MLAAdapter",
        summary="Multi-head Latent Attention: low-rank joint KV latent, decoupled RoPE, compressed KV cache",
    )
    register(
        "attention",
        "mha",
        "dsk_mla.mha:MHA",
        config=MHAConfig,
        summary="Standard multi-head attention with RoPE and a full K/V cache (baseline)",
    )

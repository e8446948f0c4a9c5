"""dsk_mla: Multi-head Latent Attention (DeepSeek-V2/V3) and the standard MHA baseline."""

__version__ = "0.1.0"

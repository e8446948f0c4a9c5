"""dsk_mtp: DeepSeek-V3 multi-token prediction heads (training loss and drafts for speculative decoding)."""

__version__ = "0.1.0"

"""dsk_fp8: (being written)."""

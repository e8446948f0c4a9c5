"""dsk_recompute: (being written)."""

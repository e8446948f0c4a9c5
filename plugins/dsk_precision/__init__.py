"""dsk_precision: (being written)."""

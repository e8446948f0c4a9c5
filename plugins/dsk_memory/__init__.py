"""dsk_memory: (being written)."""

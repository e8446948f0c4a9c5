"""dsk_recompute: activation recomputation per transformer block (feature ``recompute``: selective or full)."""

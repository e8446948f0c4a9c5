"""Hook implementations of dsk_recompute (torch-free, lazy)."""

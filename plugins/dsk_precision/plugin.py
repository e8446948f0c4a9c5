"""Hook implementations of dsk_precision (torch-free, lazy)."""

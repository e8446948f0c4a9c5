"""Hook implementations of dsk_fp8 (torch-free, lazy)."""

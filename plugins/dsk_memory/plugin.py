"""Hook implementations of dsk_memory (torch-free, lazy)."""

"""``python -m dsk.kernels``: build the CPU kernels ahead of time (``make setup`` runs it) and say how they stand."""

from dsk.kernels import status

print(f"dsk CPU kernels: {status()}")

"""Hook implementations of dsk_optim: registers the ``adamw`` optimizer (torch-free, lazy)."""

from dsk import hookimpl
from dsk_optim.config import AdamWConfig


@hookimpl
def register_optimizers(register):
    """Register the built-in optimizer (kind ``optimizer``)."""
    register(
        "optimizer",
        "adamw",
        "dsk_optim.adamw:build_adamw",
        config=AdamWConfig,
        summary="AdamW, decay on matrices only, warm-up + cosine schedule, fused kernel where torch has it",
    )

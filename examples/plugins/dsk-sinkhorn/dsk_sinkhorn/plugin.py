"""Registers router/sinkhorn with dsk. Torch-free: `dsk --help`, `dsk plugins` and `dsk recipe validate` import this
module, so the implementation is named by a lazy "module:attr" string."""

from dsk import hookimpl
from dsk_sinkhorn.config import SinkhornConfig


@hookimpl
def register_model_components(register):
    """Register router/sinkhorn."""
    register(
        "router",
        "sinkhorn",
        "dsk_sinkhorn.router:SinkhornRouter",
        config=SinkhornConfig,
        summary="top-k router balanced by Sinkhorn-Knopp iterations in training (S-BASE)",
    )

"""Registers the ``mtp`` component (kind ``mtp``). Torch-free: the module is named by a lazy string."""

from __future__ import annotations

from dsk import hookimpl
from dsk_mtp.config import MTPConfig


@hookimpl
def register_model_components(register):
    register(
        "mtp",
        "mtp",
        "dsk_mtp.mtp:MTP",
        config=MTPConfig,
        hf="dsk_mtp.hf:MTPAdapter",
        summary="multi-token prediction heads sharing embedding and output head (DeepSeek-V3 §2.2)",
    )

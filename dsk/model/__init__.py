"""The transformer skeleton that fills its slots from the registry, KV-cached generation and HF checkpoints.

Importing ``dsk.model`` (or ``dsk.model.config``) does not import torch; the names below are loaded on use.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelConfig": "dsk.model.config",
    "build_model": "dsk.model.build",
    "DSKModel": "dsk.model.transformer",
    "ModelOutput": "dsk.model.transformer",
    "ModelStage": "dsk.model.transformer",
    "split_layers": "dsk.model.transformer",
    "training_loss": "dsk.model.loss",
    "collect_side_channels": "dsk.model.loss",
    "generate": "dsk.model.generate",
    "speculative_generate": "dsk.model.generate",
    "GenerationResult": "dsk.model.generate",
    "load_pretrained": "dsk.model.hf",
    "save_hf": "dsk.model.hf",
    "save_dsk": "dsk.model.hf",
    "convert": "dsk.model.hf",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsk.model' has no attribute {name!r}")

"""``[features.compile]``: torch.compile applied to each transformer block, as torchtitan does.

Each :class:`dsk.api.runtime.Block` (the model's layers and every MTP head's block) is compiled in place with
``Block.compile(...)``: the module keeps its parameters and names (the compiled call is stored beside them), so
checkpoints, the optimizer's parameter names and the HF key mapping are those of the eager model. Compiling per
block, not the whole model, keeps the compile time of one block (the blocks share their code, so a model with L
identical blocks traces them once each but reuses the generated kernels) and leaves the embedding, head and the
loss eager.

The feature comes after ``bf16``, ``fp8`` and ``recompute`` (torchtitan: activation checkpointing, then compile):
autocast is entered outside the compiled blocks (dynamo guards on its state), FP8's ``LinearImpl`` is traced
inside them, and the recompute wrapping is compiled with the block. The C++ CPU kernels are pybind calls that
torch.compile cannot trace; :func:`dsk.api.runtime.cpu_kernel_supports` says no while dynamo traces, so compiled
blocks run the components' PyTorch paths and inductor fuses them (docs/precision.md has the measurement).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dsk.api import Feature
from dsk_precision.config import CompileConfig

__all__ = ["Compile", "blocks_of"]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model`` (layers and MTP blocks), in module order."""
    from dsk.api.runtime import Block

    return [m for m in model.modules() if isinstance(m, Block)]


class Compile(Feature):
    """Compiles every block of the model in place (``Block.compile``); off unless ``[features.compile]`` is on."""

    stages = ("transform_model",)

    def __init__(self, config: CompileConfig | None = None):
        super().__init__(config if config is not None else CompileConfig())
        self.compiled: list[str] = []

    def options(self) -> dict[str, Any]:
        """The keyword arguments given to ``torch.compile`` for each block."""
        cfg = self.config
        out: dict[str, Any] = {"backend": cfg.backend, "fullgraph": cfg.fullgraph, "dynamic": cfg.dynamic}
        if cfg.backend == "inductor":  # the other backends take no mode
            out["mode"] = cfg.mode
        return out

    def transform_model(self, model: nn.Module, run: Any) -> None:
        """Compile each block in place; the model, its modules and its state-dict names are unchanged."""
        names = {id(m): name for name, m in model.named_modules()}
        options = self.options()
        for block in blocks_of(model):
            block.compile(**options)
            self.compiled.append(names[id(block)])
        return None

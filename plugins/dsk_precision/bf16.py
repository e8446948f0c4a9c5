"""BF16 mixed precision: the model's forward runs under ``torch.autocast(dtype=bfloat16)``, everything else in FP32.

What runs in which dtype (the DeepSeek-V3 report's BF16 baseline, §3.3 of the report and spec §4.9):

- parameters stay FP32 (the master weights); autocast casts each weight to BF16 where a GEMM reads it, and its
  gradient comes back through that cast as FP32, so gradients accumulate in FP32 and the optimizer is FP32
  (unless the recipe picks a BF16-moment optimizer such as ``adamw_bf16``);
- GEMMs (attention and expert projections, the output head, the MTP projection) run in BF16; norms, softmax, RoPE
  angles and the router's affinities run in FP32 (the components upcast them, autocast's own FP32 list does the
  rest); the routed experts' grouped GEMM casts its operands itself, since ``torch._grouped_mm`` is not on
  autocast's lists;
- the loss is computed outside the model's forward, so its log-softmax runs in FP32 on BF16 logits
  (:func:`dsk.api.runtime.cross_entropy` upcasts).

The autocast region is entered by a forward pre-hook on the top model and left by a forward hook registered with
``always_call=True`` (it runs even when the forward raises), so no module is wrapped and the state-dict names are
unchanged; the backward replays the dtypes autograd recorded. The C++ CPU kernels take only FP32/FP64 operands,
so under autocast the components take their PyTorch paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsk.api import Feature
from dsk_precision.config import BF16Config

__all__ = ["BF16", "PrecisionPolicy"]


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of a mixed-precision run, for a sharding strategy to build its own policy from.

    Attributes:
        param_dtype: the dtype the parameters are computed in (the master copy stays ``master_dtype``).
        compute_dtype: the autocast dtype of the forward's GEMMs.
        reduce_dtype: the dtype gradients are reduced in across ranks.
        master_dtype: the dtype of the parameters, their gradients and the optimizer.
    """

    param_dtype: torch.dtype
    compute_dtype: torch.dtype
    reduce_dtype: torch.dtype
    master_dtype: torch.dtype = torch.float32

    def fsdp_policy(self) -> Any:
        """The FSDP2 ``MixedPrecisionPolicy`` of this policy (parameters all-gathered in ``param_dtype``)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


class BF16(Feature):
    """``[features.bf16]``: runs the model's forward under BF16 autocast; parameters, gradients, optimizer FP32."""

    stages = ("transform_model",)

    def __init__(self, config: BF16Config | None = None):
        super().__init__(config if config is not None else BF16Config())
        reduce = torch.float32 if self.config.reduce_dtype == "float32" else torch.bfloat16
        self.policy = PrecisionPolicy(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16, reduce_dtype=reduce)
        self._handles: list[Any] = []

    def transform_model(self, model: nn.Module, run: Any) -> None:
        """Register the autocast hooks on the top model (in place; no module is replaced or renamed)."""
        # one autocast context per forward in flight: a forward may run inside another (a drafter's forward in
        # speculative decoding), and each hook pair must leave exactly the context its pre-hook entered
        contexts: list[torch.autocast] = []
        dtype, cache = self.policy.compute_dtype, self.config.cache_casts

        def enter(module: nn.Module, args: tuple) -> None:
            device = args[0].device.type if args and isinstance(args[0], torch.Tensor) else _device_of(module)
            ctx = torch.autocast(device, dtype=dtype, cache_enabled=cache)
            ctx.__enter__()
            contexts.append(ctx)

        def leave(module: nn.Module, args: tuple, output: Any) -> None:
            if contexts:  # the pre-hook's own error leaves nothing to exit
                contexts.pop().__exit__(None, None, None)

        self._handles = [
            model.register_forward_pre_hook(enter),
            model.register_forward_hook(leave, always_call=True),
        ]
        return None

    def remove(self) -> None:
        """Take the hooks off again (the model then runs in its parameters' dtype)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _device_of(module: nn.Module) -> str:
    param = next(module.parameters(), None)
    return param.device.type if param is not None else "cpu"

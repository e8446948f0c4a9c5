"""AdamW with BF16 first and second moments (``[optimizer] type = "adamw_bf16"``): half the optimizer-state bytes.

DeepSeek-V3 (§3.3.2) tracks AdamW's moments in BF16 "without observable performance degradation". torch's AdamW
cannot hold them: its fused and foreach kernels require the state dtype to equal the parameter's, and its
``load_state_dict`` casts every floating state tensor to the parameter's dtype, so a BF16 moment would come back
FP32 after a checkpoint round trip. This optimizer stores ``exp_avg`` and ``exp_avg_sq`` in bfloat16, computes each
update in float32 (upcast, update, use the FP32 values for this step, round back to BF16 for storage) with
``torch._foreach`` ops, and keeps the moments BF16 through ``load_state_dict``.

Rounding is round-to-nearest-even (a plain cast), not stochastic. With dsk's default beta2 = 0.95 a moment moves
by 5 % of its distance to the new gradient statistic per step, far above BF16's half-ulp (2^-9, 0.2 %), so
nearest rounding tracks it; stochastic rounding would need random bits for every element at every step and the
generator's state in each checkpoint to keep ``--resume`` exact. With beta2 >= 0.998, (1 - beta2) drops below the
half-ulp and the second moment can stall under nearest rounding (docs/memory.md states this caveat).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dsk.api.runtime import named_unique_parameters
from dsk_memory.config import AdamWBF16Config

__all__ = ["AdamWBF16", "build_adamw_bf16", "MOMENTS"]

#: the state tensors stored in bfloat16
MOMENTS = ("exp_avg", "exp_avg_sq")


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose moments are stored in bfloat16.

    Per parameter p with gradient g at step t (lr, betas, eps, weight_decay of its group)::

        p <- p * (1 - lr * weight_decay)
        m <- m + (1 - beta1) * (g - m)          # in FP32 from the stored BF16 m
        v <- beta2 * v + (1 - beta2) * g * g    # in FP32 from the stored BF16 v
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
        store bf16(m), bf16(v)

    which is torch's AdamW formula; with FP32 parameters the first step equals torch's foreach AdamW bit for bit.

    Args:
        params, lr, betas, eps, weight_decay: as torch's AdamW.
        chunk: elements per foreach batch (see :meth:`_batches`); any value gives the same numbers.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        chunk: int = 1 << 18,
    ):
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.chunk = chunk

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One AdamW update of every parameter that has a gradient; returns the closure's loss (if any)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            # buckets of parameters that can share one foreach call: same device, dtype and step count
            buckets: dict[tuple[Any, ...], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.preserve_format)
                state["step"] += 1
                buckets.setdefault((p.device, p.dtype, state["step"]), []).append(p)
            for (_device, _dtype, step), params in buckets.items():
                for batch in self._batches(params):
                    self._update(group, batch, step)
        return loss

    def _batches(self, params: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, ...]]]:
        """``(param, grad, exp_avg, exp_avg_sq)`` slices in batches of about ``chunk`` elements.

        The update makes two FP32 temporaries per element and runs ~10 passes over them; on slices of ``chunk``
        elements they stay in cache between passes instead of streaming through memory each time (measured ~3x
        faster than whole tensors on 8M parameters, one CPU thread, chunk 2^18). Large contiguous tensors are cut
        into flat slices (views, updated in place), small ones share a batch; the arithmetic per element is the
        same either way.
        """
        batches: list[list[tuple[torch.Tensor, ...]]] = [[]]
        filled = 0
        for p in params:
            state = self.state[p]
            # FSDP2 shards are DTensors, which have no _foreach_copy_: the update is elementwise, the local shards do
            tensors = tuple(
                t.to_local() if hasattr(t, "to_local") else t
                for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])
            )
            n = p.numel()
            if n > self.chunk and all(t.is_contiguous() for t in tensors):
                flat = [t.view(-1) for t in tensors]
                pieces = [tuple(f[i : i + self.chunk] for f in flat) for i in range(0, n, self.chunk)]
            else:
                pieces = [tensors]
            for piece in pieces:
                if filled and filled + piece[0].numel() > self.chunk:
                    batches.append([])
                    filled = 0
                batches[-1].append(piece)
                filled += piece[0].numel()
        return [b for b in batches if b]

    def _update(self, group: dict[str, Any], batch: list[tuple[torch.Tensor, ...]], step: int) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        params, grads, exp_avgs, exp_avg_sqs = (list(t) for t in zip(*batch, strict=True))
        grads = [g.float() for g in grads]  # .float() is the tensor itself when already FP32: read only
        m32 = [m.float() for m in exp_avgs]
        v32 = [v.float() for v in exp_avg_sqs]
        torch._foreach_lerp_(m32, grads, 1.0 - beta1)
        torch._foreach_mul_(v32, beta2)
        torch._foreach_addcmul_(v32, grads, grads, value=1.0 - beta2)
        torch._foreach_copy_(exp_avgs, m32)  # round to nearest BF16 for storage
        torch._foreach_copy_(exp_avg_sqs, v32)
        bias1 = 1.0 - beta1**step
        bias2_sqrt = math.sqrt(1.0 - beta2**step)
        denom = v32  # stored already: its FP32 buffer becomes the denominator (one allocation fewer)
        torch._foreach_sqrt_(denom)
        torch._foreach_div_(denom, bias2_sqrt)
        torch._foreach_add_(denom, eps)
        fp32 = params[0].dtype == torch.float32
        # a lower-precision parameter is updated in FP32 and rounded once, like the moments
        work = params if fp32 else [p.float() for p in params]
        if wd != 0:
            torch._foreach_mul_(work, 1.0 - lr * wd)
        torch._foreach_addcdiv_(work, m32, denom, value=-lr / bias1)
        if not fp32:
            torch._foreach_copy_(params, work)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, then the moments back in BF16 (torch casts floating state to the
        parameter's dtype; BF16 -> FP32 -> BF16 is exact, so the values are the saved ones)."""
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in MOMENTS:
                if key in state and state[key].dtype != torch.bfloat16:
                    state[key] = state[key].to(torch.bfloat16)


def build_adamw_bf16(config: AdamWBF16Config, model: nn.Module) -> AdamWBF16:
    """AdamWBF16 over the model's trainable parameters in ``adamw``'s two groups.

    Matrices (``ndim >= 2``) decay, vectors (norm weights, biases) do not; each group records its parameter names
    (``group["names"]``), with which the checkpoint saves the state by name. The rule is the one of
    ``dsk_optim``'s ``adamw``, so switching between the two changes only the moments' dtype.
    """
    decay, no_decay = [], []
    for name, p in named_unique_parameters(model):
        (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": config.weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return AdamWBF16(groups, lr=config.lr, betas=config.betas, eps=config.eps)

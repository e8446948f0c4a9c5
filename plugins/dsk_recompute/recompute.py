"""Activation recomputation per transformer block: ``full`` (torch.utils.checkpoint) or ``selective``.

Every :class:`dsk.api.runtime.Block` (``model.layers`` and each MTP head's ``block``) gets a forward wrapper on the
instance: the module tree, the parameter names and so the checkpoints stay exactly what they were. While gradients
are on and there is no KV cache, the wrapper runs the block under non-reentrant ``torch.utils.checkpoint``; a
no-grad forward (eval, generation) or a cached one calls the block directly, at its old cost.

* ``full``: the block keeps its inputs only; the backward reruns the whole block.
* ``selective``, method ``regions`` (the default): :mod:`dsk_recompute.regions` keeps each recomputable region's
  inputs instead of its outputs and reruns the region when the backward needs them.
* ``selective``, method ``sac``: torch's selective-checkpoint contexts with :class:`RecomputePolicy`. An op run inside one of the
  recomputed regions (:func:`dsk.api.runtime.current_regions`; DeepSeek-V3's set: ``norm``,
  ``attention.up_projection``, ``ffn.activation``) is recomputed, GEMMs included (the MLA up-projections are
  GEMMs). Outside them the heavy ops are saved: matrix products (``mm``, ``addmm``, ``bmm``, ``_grouped_mm``),
  fused attention, and every op of a ``dsk*`` namespace (the plugins' C++ kernels, which their autograd nodes run
  through the dispatcher so that this policy sees one op instead of the allocations inside). The cheap ops
  outside the regions (residual adds, RoPE, reshapes, the router's sigmoid and top-k, index ops) are recomputed
  too: selective checkpointing keeps *every* output of a saved op, also when the backward needs none of it (the
  output of an add that only feeds the next op), so saving them costs more memory than no checkpointing at all,
  while rerunning them costs a few element-wise passes (bench/bench_memory.py measures both).

The re-executed forward runs inside :func:`dsk.api.runtime.recompute_scope`, so a router counts each token's
expert load once (it checks :func:`dsk.api.runtime.recomputing`) and keeps the first forward's balance loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsk.api import Feature
from dsk.api.runtime import Block, current_regions, recompute_scope
from dsk_recompute.config import DEFAULT_REGIONS, RecomputeConfig
from dsk_recompute.regions import RegionRecompute

__all__ = ["Recompute", "RecomputePolicy", "apply_recompute", "remove_recompute", "recomputed_blocks"]

_aten = torch.ops.aten

#: ops whose outputs selective mode saves outside the recomputed regions: the matrix products and fused attention
SAVED_OPS = frozenset(
    {
        _aten.mm,
        _aten.addmm,
        _aten.bmm,
        _aten.baddbmm,
        _aten._grouped_mm,
        _aten._scaled_dot_product_flash_attention_for_cpu,
        _aten._scaled_dot_product_flash_attention,
        _aten._scaled_dot_product_efficient_attention,
        _aten._scaled_dot_product_cudnn_attention,
    }
)


class RecomputePolicy:
    """The selective-checkpoint policy: recompute inside ``regions``, save the heavy ops elsewhere.

    Called by torch for every op of a block's forward with the op's ``OpOverload``; returns a ``CheckpointPolicy``.

    Args:
        regions: the regions whose ops are recomputed.
        also_saved: more ops (``OpOverloadPacket``) to save outside the regions (bench/bench_memory.py tries some).
            Only ops that every rerun of a block runs exactly as the forward did: selective checkpointing hands
            back a saved op's outputs by its position among the calls of that op, and a component may skip work
            when it knows it is recomputing (the router skips its load count, a ``_to_copy`` and an ``add_``).
    """

    def __init__(self, regions: tuple[str, ...] = DEFAULT_REGIONS, also_saved: frozenset = frozenset()):
        self.regions = frozenset(regions)
        self.saved = SAVED_OPS | also_saved

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if not self.regions.isdisjoint(current_regions()):
            return CheckpointPolicy.PREFER_RECOMPUTE
        if getattr(op, "overloadpacket", None) in self.saved or getattr(op, "namespace", "").startswith("dsk"):
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    def context_fn(self) -> tuple[Any, Any]:
        """``checkpoint``'s (forward, recompute) contexts: SAC's caching modes, the recompute also in the scope."""
        forward_ctx, recompute_ctx = create_selective_checkpoint_contexts(self)
        return forward_ctx, _both(recompute_scope(), recompute_ctx)

    def __repr__(self) -> str:
        return f"RecomputePolicy(regions={sorted(self.regions)})"


def _full_context_fn() -> tuple[Any, Any]:
    """``checkpoint``'s contexts for full recomputation: nothing in the forward, the recompute scope in the rerun."""
    return contextlib.nullcontext(), recompute_scope()


@contextlib.contextmanager
def _both(first: Any, second: Any) -> Iterator[None]:
    with first, second:
        yield


class _RecomputedForward:
    """The forward put on a block instance: the block's own forward, under ``checkpoint`` when it trains."""

    def __init__(self, forward: Any, mode: str, policy: RecomputePolicy | None, regions: frozenset[str] | None = None):
        self.forward = forward  # the bound class forward (a deepcopy of the model rebinds it to the copy)
        self.mode = mode
        self.policy = policy
        self.regions = regions  # selective by region (the default method): the regions recomputed
        self.graph_regions: dict[tuple, bool] = {}  # what RegionRecompute learnt about each region call site

    def __call__(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        if cache is not None or not torch.is_grad_enabled():
            return self.forward(x, pos, mask, cache)  # nothing is saved for a backward: nothing to drop
        if self.regions is not None:
            with RegionRecompute(self.regions, self.graph_regions):
                return self.forward(x, pos, mask, cache)
        context_fn = self.policy.context_fn if self.policy is not None else _full_context_fn
        # A fresh alias of `pos` per block: a component may cache what it derives from a tensor by identity (MLA's
        # RoPE table, built once per forward and reused by the next layers). Selective checkpointing replays the
        # ops of the forward in order, so the rerun may skip ops the forward ran (its cached cheap ops are
        # recomputed anyway) but must not run ops the forward skipped; with its own `pos` each block's forward
        # builds its table itself, so its rerun can only find more in the cache, never less.
        pos = pos.detach()
        return checkpoint(self.forward, x, pos, mask, None, use_reentrant=False, context_fn=context_fn)


def recomputed_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` that run under recomputation."""
    return [
        m for m in model.modules() if isinstance(m, Block) and isinstance(m.__dict__.get("forward"), _RecomputedForward)
    ]


def apply_recompute(
    model: nn.Module,
    mode: str = "selective",
    regions: tuple[str, ...] = DEFAULT_REGIONS,
    policy: RecomputePolicy | None = None,
    method: str = "regions",
) -> list[nn.Module]:
    """Run every :class:`dsk.api.runtime.Block` of ``model`` under recomputation (in place; names unchanged).

    Args:
        model: the model (its ``layers`` and its MTP heads' blocks are found as ``Block`` submodules).
        mode: ``"selective"`` or ``"full"``.
        regions: selective mode's recomputed regions.
        policy: selective mode's policy with ``method = "sac"`` (default: ``RecomputePolicy(regions)``).
        method: selective mode's mechanism: ``"regions"`` (:mod:`dsk_recompute.regions`: saved-tensor hooks that
            keep each recomputable region's inputs) or ``"sac"`` (torch's selective-checkpoint contexts).

    Returns:
        the blocks wrapped. A block already wrapped is wrapped again with the new options.
    """
    if mode not in ("selective", "full"):
        raise ValueError(f"recompute mode = {mode!r}: expected 'selective' or 'full'")
    if method not in ("regions", "sac"):
        raise ValueError(f"recompute method = {method!r}: expected 'regions' or 'sac'")
    by_region = frozenset(regions) if mode == "selective" and method == "regions" else None
    if mode == "selective" and by_region is None:
        policy = policy if policy is not None else RecomputePolicy(regions)
    else:
        policy = None
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.__dict__.pop("forward", None)
        block.forward = _RecomputedForward(block.forward, mode, policy, by_region)
    return blocks


def remove_recompute(model: nn.Module) -> None:
    """Undo :func:`apply_recompute`: the blocks run their own forward again."""
    for block in recomputed_blocks(model):
        del block.__dict__["forward"]


class Recompute(Feature):
    """Feature ``recompute``: wraps each transformer block at model-transform time (see the module docstring)."""

    stages = ("transform_model",)

    def __init__(self, config: RecomputeConfig | None = None):
        super().__init__(config if config is not None else RecomputeConfig())
        self.blocks: list[nn.Module] = []

    def transform_model(self, model: nn.Module, run: Any) -> nn.Module | None:
        cfg: RecomputeConfig = self.config
        self.blocks = apply_recompute(model, cfg.mode, cfg.recompute_regions(), method=cfg.method)
        return None

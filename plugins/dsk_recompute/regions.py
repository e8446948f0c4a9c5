"""Selective recomputation by region: keep a recomputable region's inputs, recompute its outputs in the backward.

A component computes DeepSeek-V3's recompute set as ``recomputable(name, fn, *inputs)`` regions
(:func:`dsk.api.runtime.recomputable`): the RMSNorms (``norm``), the MLA up-projections
(``attention.up_projection``: the per-head K and V from the cached latent, the query from its latent) and the
SwiGLU activation (``ffn.activation``). While a block's training forward runs under :class:`RegionRecompute`:

* the handler runs each recomputed region without recording its graph (no grad) as one autograd node
  (:class:`_RegionFunction`) that keeps only the region's inputs, and remembers which storages its outputs live
  in: so nothing the region computes inside (the normalised latent, SwiGLU's ``silu(gate)``) is kept;
* a saved-tensor hook sees every tensor an op outside saves for the backward. A tensor in a region output's
  storage (the output, or any view of it: MLA's per-head ``v`` is a view of the up-projection's GEMM, RoPE saves a
  complex view of the query) is replaced by a small handle, so nothing keeps the output alive either;
* in the backward the region runs once more, with gradients and inside :func:`dsk.api.runtime.recompute_scope`,
  the first time anything needs it: a consumer unpacking a handle (the saved tensor is rebuilt over the
  recomputed storage with its dtype, size, stride and offset) or the region's own node, which then back-propagates
  through the recomputed graph (into the region's inputs and the parameters it used) and frees it. A region input
  that is itself a region output (the query latent is the output of a norm) is held as a handle too, so chains
  recompute from the first kept tensor.

Why not torch's selective-checkpoint contexts (kept as ``method = "sac"``): they route every op of the block
through a Python dispatch mode twice (forward and rerun), about 110 ops per MoE block; measured on the quickstart
model that overhead alone made selective slower than full recomputation (bench/bench_memory.py). Here only the
saved tensors pass through Python (a dictionary lookup each), and only the region's own ops run again.

The recomputed values are bitwise the forward's (the same ops on the same inputs, deterministic on CPU), so the
gradients are exactly those without recomputation.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.autograd.graph import saved_tensors_hooks

from dsk.api.runtime import recompute_scope, region, region_handler

__all__ = ["RegionRecompute"]


class _Region:
    """One call of a recomputable region: its function, its kept inputs, and (while the backward needs them) the
    outputs recomputed with their graph."""

    __slots__ = ("name", "fn", "inputs", "needs_grad", "graph", "leaves", "outputs")

    def __init__(self, name: str, fn: Any, inputs: tuple, needs_grad: tuple[bool, ...], graph: bool):
        self.name, self.fn, self.inputs, self.needs_grad, self.graph = name, fn, inputs, needs_grad, graph
        self.leaves: list[Any] | None = None
        self.outputs: list[torch.Tensor] | None = None

    def recomputed(self) -> list[torch.Tensor]:
        """The outputs, recomputed on first use (bitwise the forward's); with their graph for a region that is its
        own autograd node (``graph``)."""
        if self.outputs is None:
            inputs = [x.materialize() if isinstance(x, _Handle) else x for x in self.inputs]
            if not self.graph:
                with torch.no_grad(), recompute_scope(), region_handler(None), region(self.name):
                    self.outputs = _tensors(self.fn(*inputs))
                self.fn = self.inputs = None
                return self.outputs
            self.leaves = [
                x.detach().requires_grad_(g) if isinstance(x, torch.Tensor) else x
                for x, g in zip(inputs, self.needs_grad, strict=True)
            ]
            with torch.enable_grad(), recompute_scope(), region_handler(None), region(self.name):
                self.outputs = _tensors(self.fn(*self.leaves))
        return self.outputs

    def backward(self, grads: tuple) -> tuple:
        """Back-propagate ``grads`` through the recomputed region; the gradients of its tensor inputs."""
        outputs = self.recomputed()
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        grads_in = tuple(x.grad if g else None for x, g in zip(self.leaves, self.needs_grad, strict=True))
        self.fn = self.inputs = self.leaves = self.outputs = None  # done: free the recomputed graph
        return grads_in


class _RegionFunction(torch.autograd.Function):
    """A recomputed region as one autograd node: the forward keeps nothing, the backward recomputes it."""

    @staticmethod
    def forward(ctx, record: _Region, *inputs):  # type: ignore[override]
        ctx.record = record
        with torch.no_grad():
            out = record.fn(*inputs)
        outs = _tensors(out)
        ctx.single = isinstance(out, torch.Tensor)
        return outs[0] if ctx.single else tuple(outs)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, *ctx.record.backward(grads))


class _Handle:
    """What the backward holds instead of a tensor in a region output's storage."""

    __slots__ = ("region", "index", "dtype", "size", "stride", "offset")

    def __init__(self, region: _Region, index: int, t: torch.Tensor):
        self.region, self.index = region, index
        self.dtype, self.size, self.stride, self.offset = t.dtype, t.size(), t.stride(), t.storage_offset()

    def materialize(self) -> torch.Tensor:
        base = self.region.recomputed()[self.index].detach()
        out = torch.empty(0, dtype=self.dtype, device=base.device)
        return out.set_(base.untyped_storage(), self.offset, self.size, self.stride)


def _tensors(out: Any) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


class RegionRecompute:
    """The region handler and saved-tensor hooks of one block forward (a fresh instance per forward).

    Args:
        regions: the region names recomputed; other ``recomputable`` regions run and are saved as usual.
        graph_regions: shared between the forwards: call site (region name, the function) -> whether the region
            keeps tensors of its own for the backward. A call site is first run plainly, with only its outputs
            dropped; when the ops inside saved tensors that are neither inputs nor parameters, at least a quarter
            of the outputs' bytes (a norm that copies a strided input to normalise it), later calls run it as its
            own autograd node, which keeps nothing inside either. A region whose ops save only its inputs and small
            statistics (RMSNorm's 1/rms, the up-projection GEMMs, the SwiGLU node) stays plain: dropping its
            outputs is all there is to gain, and its backward then costs one forward of the region, without a
            second backward pass (measured: the node costs about 8% of a quickstart step when every norm is one).
    """

    def __init__(self, regions: frozenset[str], graph_regions: dict[tuple, bool] | None = None):
        self.regions = regions
        self.graph_regions = {} if graph_regions is None else graph_regions
        self._scan: set[int] | None = None  # while a region is tried plainly: its inputs' storages
        self._internal: dict[int, int] = {}  # ... and the storages its ops kept: address -> bytes
        # storage address -> (region, output index, weak reference to that output): the output's liveness
        # proves the address still belongs to it
        self._outputs: dict[int, tuple[_Region, int, weakref.ref]] = {}

    def __enter__(self) -> RegionRecompute:
        self._hooks = saved_tensors_hooks(self._pack, self._unpack)
        self._handler = region_handler(self._run)
        self._hooks.__enter__()
        self._handler.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handler.__exit__(*exc)
        self._hooks.__exit__(*exc)
        self._outputs.clear()  # the handles hold their regions; nothing else needs the addresses

    def _run(self, name: str, fn: Any, inputs: tuple) -> Any:
        if name not in self.regions:
            with region(name):
                return fn(*inputs)
        needs_grad = tuple(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs)
        site = (name, id(getattr(fn, "__self__", None)), getattr(fn, "__func__", fn))
        graph = self.graph_regions.get(site)
        record = _Region(name, fn, tuple(self._keep(x) for x in inputs), needs_grad, bool(graph))
        with region(name):
            if graph:
                out = _RegionFunction.apply(record, *inputs)
            else:
                out = self._run_plain(site, fn, inputs, probe=graph is None)
        for i, t in enumerate(_tensors(out)):
            ptr = _address(t)
            if ptr is not None:
                self._outputs.setdefault(ptr, (record, i, weakref.ref(t)))
        return out

    def _run_plain(self, site: tuple, fn: Any, inputs: tuple, probe: bool) -> Any:
        if not probe:
            return fn(*inputs)
        self._scan = {p for x in inputs if isinstance(x, torch.Tensor) and (p := _address(x)) is not None}
        self._internal = {}
        try:
            out = fn(*inputs)
        finally:
            self._scan = None
        out_bytes = sum(t.untyped_storage().nbytes() for t in _tensors(out))
        self.graph_regions[site] = 4 * sum(self._internal.values()) >= out_bytes > 0
        return out

    def _handle(self, t: torch.Tensor) -> _Handle | None:
        ptr = _address(t)
        hit = self._outputs.get(ptr) if ptr is not None else None
        if hit is None:
            return None
        record, index, ref = hit
        alive = ref()
        if alive is None or _address(alive) != ptr:
            return None
        return _Handle(record, index, t)

    def _keep(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return self._handle(x) or x.detach()

    def _pack(self, t: torch.Tensor) -> Any:
        if self._scan is not None:
            base = t if t._base is None else t._base
            ptr = _address(t)
            if ptr is not None and ptr not in self._scan and not (base.is_leaf and base.requires_grad):
                self._internal[ptr] = t.untyped_storage().nbytes()  # the region being tried keeps a tensor
        return self._handle(t) or t

    @staticmethod
    def _unpack(x: Any) -> torch.Tensor:
        return x.materialize() if isinstance(x, _Handle) else x


def _address(t: torch.Tensor) -> int | None:
    """The address of a plain strided tensor's storage (None for subclasses, meta tensors, empty storages)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.device.type == "meta":
        return None
    ptr = t.untyped_storage().data_ptr()
    return ptr or None

"""Saved-activation bytes: what a forward leaves alive for its backward, whoever keeps it.

Autograd's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``) see the tensors autograd nodes save, but
not what selective activation checkpointing stores (its dispatch mode caches op outputs itself), nor what a C++
kernel's autograd node keeps in ``ctx`` through checkpoint's own hooks. So this module measures storage instead:

1. While the forward runs, a ``TorchDispatchMode`` sees the output of every op (an op run inside another mode's
   handler, such as selective checkpointing's, still reaches it, since modes call down the stack) and records a
   weak reference to each output's storage with its size in bytes. Factory ops and the allocations a C++ kernel
   makes through the dispatcher (``at::empty``) are ops too.
2. When the forward returns, the garbage collector runs, and the bytes of the recorded storages that are still
   alive are summed, once per storage (views and in-place results share one), leaving out the storages of the
   tensors the forward returned (the loss) and of the model's parameters and buffers (none is created by a
   forward, but a buffer filled lazily on the first call would be: warm up once before measuring).

What is counted is what the backward will need or what something else still holds: autograd's saved tensors, the
checkpoint caches, anything a module kept (a router's last balance loss). Tensors created before the forward (the
batch) are not counted. The figure is exact bytes of CPU (or device) storage, not the allocator's rounding.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["SavedActivations", "StorageTracker", "saved_activation_bytes"]


@dataclass
class SavedActivations:
    """The result of :func:`saved_activation_bytes`.

    Attributes:
        bytes: bytes of the storages created by the forward and alive after it (outputs and parameters excluded).
        n_storages: how many such storages.
        created_bytes: bytes of every storage the forward created, alive or not (a peak-traffic hint).
        output: what the forward returned.
    """

    bytes: int
    n_storages: int
    created_bytes: int
    output: Any


class StorageTracker(TorchDispatchMode):
    """A dispatch mode that records (weakly) every storage the ops run under it create."""

    def __init__(self) -> None:
        super().__init__()
        # storage id -> (weak reference, bytes); ids are reused once a storage dies, so a dead entry is replaced
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and not t.is_meta:
                self._record(t)
        return out

    def _record(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        seen = self.storages.get(key)
        if seen is None or seen[0].expired():
            self.storages[key] = (StorageWeakRef(storage), storage.nbytes())
        elif storage.nbytes() > seen[1]:  # resized in place
            self.storages[key] = (seen[0], storage.nbytes())

    def alive(self, exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
        """(bytes, count) of the recorded storages still alive, leaving out those of ``exclude``."""
        skip = {t.untyped_storage()._cdata for t in exclude}
        total = count = 0
        for key, (ref, nbytes) in self.storages.items():
            if key in skip or ref.expired():
                continue
            total += nbytes
            count += 1
        return total, count

    def created(self) -> int:
        """Bytes of every storage recorded (alive or freed)."""
        return sum(nbytes for _, nbytes in self.storages.values())


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def saved_activation_bytes(forward: Callable[[], Any], model: torch.nn.Module | None = None) -> SavedActivations:
    """Run ``forward()`` and measure the bytes it leaves alive for the backward (see the module docstring).

    Args:
        forward: runs the forward (and the loss) and returns what the caller keeps, typically the loss alone;
            every tensor in the result (tensors, dataclasses, lists, dicts of them) is excluded from the count.
        model: its parameters and buffers are excluded as well.

    Returns:
        :class:`SavedActivations`; call ``backward`` on its ``output`` afterwards as usual.
    """
    tracker = StorageTracker()
    with tracker:
        output = forward()
    gc.collect()  # a reference cycle made by the forward would otherwise count until the collector runs
    exclude = _tensors(output)
    if model is not None:
        exclude += list(model.parameters()) + list(model.buffers())
    total, count = tracker.alive(exclude)
    return SavedActivations(bytes=total, n_storages=count, created_bytes=tracker.created(), output=output)

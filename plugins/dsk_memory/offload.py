"""``[features.offload]``: the optimizer state, and the update, in CPU memory (ZeRO-Offload's CPU Adam on one device).

The optimizer that ``[optimizer]`` built (``adamw``, ``adamw_bf16``, any component) is moved onto FP32 master
copies of the parameters in CPU memory: its moments are created there, and its ``step()`` runs on the CPU. The
device keeps only the working parameters and their gradients. Each optimizer step then moves exactly one tensor
each way per parameter that has a gradient:

    device p.grad  --copy-->  host master.grad    (non_blocking into pinned buffers on a GPU; one sync before the
                                                   CPU reads them)
    inner.step() on the host masters               (the update runs where the states are)
    host master    --copy-->  device p            (non_blocking from pinned memory; stream-ordered before the next
                                                   forward, and the next step's host update only starts after the
                                                   sync that follows its own gradient copies)

The wrapper keeps ``param_groups`` over the *device* parameters with their ``"names"`` (the build path clips
their gradients, the checkpoint saves the state by name) and forwards every other key (``lr`` set by
``BuiltRun.set_lr``, ``weight_decay``...) to the inner optimizer before each step. ``state`` maps each device
parameter to the inner optimizer's state of its master, so the checkpoint holds the same tensors as without
offload. Declared after the other optimizer-wrapping features, so it wraps last.

On a CPU run nothing is gained (the "device" is the CPU); the mechanics are the same and are what the tests check.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from dsk.api import Feature
from dsk_memory.config import OffloadConfig

__all__ = ["CPUOffloadOptimizer", "Offload"]


class Offload(Feature):
    """Wraps the run's optimizer in a :class:`CPUOffloadOptimizer`."""

    stages = ("wrap_optimizer",)
    config: OffloadConfig

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module, run: Any) -> torch.optim.Optimizer:
        """The optimizer, moved onto CPU master weights."""
        return CPUOffloadOptimizer(optimizer, pin_memory=self.config.pin_memory)


class _StateOfDeviceParams(Mapping):
    """``optimizer.state`` seen by device parameter: the inner optimizer's state of each one's master."""

    def __init__(self, owner: CPUOffloadOptimizer):
        self._owner = owner

    def __getitem__(self, p: torch.Tensor) -> dict[str, Any]:
        master = self._owner.master_of.get(p)
        if master is None or master not in self._owner.inner.state:
            raise KeyError(p)
        return self._owner.inner.state[master]

    def __iter__(self) -> Iterator[torch.Tensor]:
        inner = self._owner.inner.state
        return (p for p, m in self._owner.master_of.items() if m in inner)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """An optimizer whose state and update live in CPU memory, stepping the device parameters through FP32 masters.

    Args:
        inner: the optimizer built over the device parameters (its groups record ``"names"``); its param groups
            are re-pointed at the CPU masters, and its state (empty when freshly built) moves to the CPU.
        pin_memory: stage the copies in pinned CPU memory when CUDA is available (asynchronous copies).

    Attributes:
        inner: the optimizer that runs on the CPU masters.
        masters: per group, the FP32 CPU master of each parameter (``masters[g][i]`` for ``param_groups[g]``).
        master_of: device parameter -> its master.
    """

    def __init__(self, inner: torch.optim.Optimizer, *, pin_memory: bool = True):
        self.inner = inner
        self.pinned = bool(pin_memory) and torch.cuda.is_available()
        self.masters: list[list[torch.Tensor]] = []
        self.master_of: dict[torch.Tensor, torch.Tensor] = {}
        groups = []
        old_state = dict(inner.state)
        inner.state.clear()
        for group in inner.param_groups:
            device_params = list(group["params"])
            masters = [self._new_master(p) for p in device_params]
            for p, m in zip(device_params, masters, strict=True):
                self.master_of[p] = m
                if p in old_state:  # a state made before the wrap moves with its parameter
                    inner.state[m] = {k: _to_cpu(v) for k, v in old_state[p].items()}
            group["params"] = masters
            self.masters.append(masters)
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": device_params})
        super().__init__(groups, dict(inner.defaults))
        self.state = _StateOfDeviceParams(self)  # type: ignore[assignment]

    def _new_master(self, p: torch.Tensor) -> torch.Tensor:
        master = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=self.pinned)
        with torch.no_grad():
            master.copy_(p.detach())
        return master

    # -- the step ----------------------------------------------------------------------------------------------
    def _push_hyperparameters(self) -> None:
        """Every group key but ``params`` (lr set by the schedule, weight decay...) onto the inner groups."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            for key, value in outer.items():
                if key != "params":
                    inner[key] = value

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Gradients to the host, the inner optimizer's step on the masters, the masters back to the device."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_hyperparameters()
        moved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group, masters in zip(self.param_groups, self.masters, strict=True):
            for p, m in zip(group["params"], masters, strict=True):
                if p.grad is None:
                    m.grad = None
                    continue
                if m.grad is None:  # one staging buffer per parameter, reused every step
                    m.grad = torch.empty(m.shape, dtype=torch.float32, device="cpu", pin_memory=self.pinned)
                m.grad.copy_(p.grad, non_blocking=True)
                moved.append((p, m))
        if any(p.device.type == "cuda" for p, _ in moved):
            torch.cuda.current_stream().synchronize()  # the host reads the gradients next
        self.inner.step()
        for p, m in moved:
            p.copy_(m, non_blocking=True)
        return loss

    # -- checkpoints -------------------------------------------------------------------------------------------
    def sync_from_model(self) -> None:
        """Copy the device parameters into the masters (after weights were loaded into the model)."""
        with torch.no_grad():
            for p, m in self.master_of.items():
                m.copy_(p.detach())

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state dict (positions are the same as this wrapper's)."""
        self._push_hyperparameters()
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load into the inner optimizer (which places its state with the CPU masters), take its group values,
        and refresh the masters from the device parameters.

        ``--resume`` loads the model weights before the optimizer state, so the masters start from the saved
        weights; with FP32 parameters (dsk keeps FP32 master weights in the model) they are exactly the masters
        of the uninterrupted run.
        """
        self.inner.load_state_dict(state_dict)
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            for key, value in inner.items():
                if key != "params":
                    outer[key] = value
        self.sync_from_model()


def _to_cpu(value: Any) -> Any:
    return value.to("cpu") if isinstance(value, torch.Tensor) else value

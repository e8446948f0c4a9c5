"""``[features.ema]``: an exponential moving average of the parameters, kept in CPU memory (DeepSeek-V3 §3.3.1).

DeepSeek-V3 keeps an EMA of the weights "in CPU memory, updated asynchronously after each training step" to
estimate early how the model would do after learning-rate decay, at no cost in device memory. Here:

- the average is FP32, on the CPU, created in ``after_weights`` from the stage's real initial weights (a previous
  stage's checkpoint or a trainer's init checkpoint, not the random draw);
- after each optimizer step (every ``update_every``-th), ``ema <- decay * ema + (1 - decay) * weight``;
- on a GPU the weights are copied device -> host with ``non_blocking=True`` into pinned buffers on the current
  stream, so the copies run behind the training kernels and the host does not wait; an event marks them, and the
  update is applied when they have landed: at the next update, or when the average is read (a checkpoint). The
  copies are ordered on the stream before the next step's kernels, so they see exactly this step's weights, and
  the delayed arithmetic gives the same numbers as the immediate one (a test checks it on CPU). On a CPU run the
  copy is a plain read and the update runs at once;
- the state (the averages by parameter name, the update count) goes into every checkpoint and comes back with
  ``--resume``; the JSON mark ``"model_weights": "ema"`` lets ``dsk eval --ema`` / ``dsk generate --ema`` load
  them instead of the trained weights (``dsk.train.checkpoint.load_feature_weights``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dsk.api import Feature
from dsk.api.runtime import RunSetupError
from dsk_memory.config import EMAConfig

__all__ = ["EMA", "WEIGHTS_PREFIX"]

#: state keys of the averaged tensors: ``weights/<parameter name>``
WEIGHTS_PREFIX = "weights/"


class EMA(Feature):
    """The EMA of the trainable parameters in CPU FP32; see the module docstring.

    Attributes:
        names: the averaged parameters' names (``model.named_parameters()``, a tied weight once).
        shadow: their averages, FP32 CPU tensors in the order of ``names``.
        updates: how many updates were applied or are in flight.
        asynchronous: stage device -> host copies and apply them when they land (True when the weights are on a
            GPU); False applies each update at once.
    """

    stages = ("after_weights", "after_step", "state")

    def __init__(self, config: EMAConfig):
        super().__init__(config)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []
        self.updates = 0
        self.asynchronous = False
        self._staging: list[torch.Tensor] | None = None
        self._in_flight = False
        self._event: Any = None

    # -- set-up ------------------------------------------------------------------------------------------------
    def after_weights(self, model: nn.Module, run: Any) -> None:
        """Start the average at the model's initial weights (FP32 copies in CPU memory)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.shadow = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self.updates = 0
        self.asynchronous = any(p.device.type == "cuda" for p in self.params)
        self._staging = None
        self._in_flight = False
        return None

    # -- the update --------------------------------------------------------------------------------------------
    def after_step(self, run: Any, step: int) -> None:
        """After optimizer step ``step``: fold the weights into the average (every ``update_every``-th step)."""
        if step % self.config.update_every:
            return None
        self._land()
        gathered = self._gathered(run)
        if gathered is not None:  # a sharded model: the strategy's full state (on the writing rank)
            if gathered:
                self._apply([gathered[name] for name in self.names])
        elif self.asynchronous:
            self._stage()
        else:
            self._apply(self.params)
        self.updates += 1
        return None

    def _gathered(self, run: Any) -> dict[str, torch.Tensor] | None:
        """The whole model's weights where a parallel strategy sharded them (FSDP2, expert shards), else None.

        A sharding strategy replaces the parameters this average was started from, so the update reads the full
        state the strategy gathers for checkpoints (collective: every rank runs it; the writing rank gets the
        tensors, the others ``{}``, and only the writing rank's average is ever saved). Replicated parameters
        (one process, replicate, ZeRO-1) are read in place, at no cost.
        """
        parallel = getattr(run, "parallel", None)
        base = getattr(run, "base_model", None)
        if parallel is None or base is None:
            return None
        return parallel.model_state_dict(base)

    def _apply(self, sources: list[torch.Tensor]) -> None:
        """``shadow <- shadow + (1 - decay) * (source - shadow)`` over all tensors at once (CPU)."""
        with torch.no_grad():
            values = [s.detach().float() for s in sources]  # the tensor itself when already FP32 on the CPU
            torch._foreach_lerp_(self.shadow, values, 1.0 - self.config.decay)

    def _stage(self) -> None:
        """Issue the device -> host copies of this step's weights (non-blocking into pinned buffers on a GPU)."""
        if self._staging is None:
            pin = torch.cuda.is_available()
            self._staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.params]
        with torch.no_grad():
            for buf, p in zip(self._staging, self.params, strict=True):
                buf.copy_(p.detach(), non_blocking=True)
        if any(p.device.type == "cuda" for p in self.params):
            self._event = torch.cuda.Event()
            self._event.record()
        self._in_flight = True

    def _land(self) -> None:
        """Wait for staged copies (if any) and apply their update."""
        if not self._in_flight:
            return
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        self._apply(self._staging)
        self._in_flight = False

    # -- reading -----------------------------------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name (pending copies applied first)."""
        self._land()
        return dict(zip(self.names, self.shadow, strict=True))

    def state_dict(self) -> dict[str, Any]:
        """The averages (``weights/<name>``), the update count, the decay and the ``model_weights`` mark."""
        state: dict[str, Any] = {"model_weights": "ema", "updates": self.updates, "decay": self.config.decay}
        for name, tensor in self.weights().items():
            state[WEIGHTS_PREFIX + name] = tensor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the averages of a checkpoint (``--resume``).

        Raises:
            RunSetupError: the saved averages are not those of this model's parameters (names or shapes).
        """
        saved = {k[len(WEIGHTS_PREFIX) :]: v for k, v in state.items() if k.startswith(WEIGHTS_PREFIX)}
        missing = sorted(set(self.names) - set(saved))
        unexpected = sorted(set(saved) - set(self.names))
        shapes = [n for n, t in zip(self.names, self.shadow, strict=True) if n in saved and saved[n].shape != t.shape]
        if missing or unexpected or shapes:
            raise RunSetupError(
                f"the EMA of the checkpoint does not match the model (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}, other shape {shapes[:3]})"
            )
        self._in_flight = False
        self._event = None
        with torch.no_grad():
            for name, tensor in zip(self.names, self.shadow, strict=True):
                tensor.copy_(saved[name])
        self.updates = int(state.get("updates", 0))

"""The training loss, computed apart from ``DSKModel.forward`` (so a pipeline's last stage can compute it), and the
model's side channels: the components' auxiliary losses and step statistics, declared through the protocols of
``dsk.api`` (:class:`~dsk.api.AuxLossSource`, :class:`~dsk.api.StepStatistics`,
:class:`~dsk.api.AfterOptimizerStep`) and collected once, when the run is built.

Label convention (the HF one, shared with ``dsk.data.batching``): ``labels`` is aligned with ``input_ids``;
``labels[:, t]`` is the token at position t when it is a training target, else -100 (padding, prompt, BOS). The loss
shifts: the logits at t-1 are scored against ``labels[:, t]``, and MTP depth k at t-1 against ``labels[:, t+k]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsk.api.contracts import AfterOptimizerStep, AuxLossSource, StepStatistics
from dsk.data.batching import IGNORE_INDEX
from dsk.model.regions import profile_part

__all__ = [
    "LossOutput",
    "SideChannels",
    "aggregate_metrics",
    "collect_side_channels",
    "cross_entropy",
    "lm_loss",
    "training_loss",
]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Summed CE over targets != -100, divided by ``denominator`` (default: their count, at least 1).

    logits [..., V], labels [...] -> scalar. The log-softmax runs in at least float32 (bf16 logits lose the
    small probabilities the loss is made of).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if denominator is None:
        denominator = (labels != IGNORE_INDEX).sum()
    # An all-padding batch gives 0 rather than 0/0.
    return total / denominator.clamp(min=1).to(total.dtype)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE of logits [B, T, V] against aligned labels [B, T] (targets ``labels[:, 1:] != -100``)."""
    # logits at t-1 score the token at t: shift the labels, not the logits (slicing [B, T, V] would copy it forward
    # and scatter its gradient into a zero [B, T, V] backward); the last position scores nothing
    return cross_entropy(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))


@dataclass
class SideChannels:
    """The components that contribute to the loss or keep step statistics, found once in a built model."""

    aux: list[tuple[str, AuxLossSource]] = field(default_factory=list)
    stats: list[tuple[str, StepStatistics]] = field(default_factory=list)
    after_step: list[tuple[str, AfterOptimizerStep]] = field(default_factory=list)

    def aux_loss(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Sum of the auxiliary losses of the last forward (each cast to ``dtype`` first), or None when no
        component has one."""
        parts = [a for a in (m.aux_loss() for _, m in self.aux) if a is not None]
        if not parts:
            return None
        return torch.stack([p.to(dtype) if dtype is not None else p for p in parts]).sum()

    def stat_tensors(self) -> list[torch.Tensor]:
        """The step statistics buffers, in module order (a data-parallel strategy sums them)."""
        return [t for _, m in self.stats for t in m.step_stat_tensors()]

    def zero_stats(self) -> None:
        """Drop a skipped step's statistics, so a skipped batch never moves a router bias."""
        with torch.no_grad():
            for t in self.stat_tensors():
                t.zero_()

    def after_optimizer_step(self) -> None:
        """Every component's ``after_optimizer_step()`` (router bias updates)."""
        for _, m in self.after_step:
            m.after_optimizer_step()

    def metrics(self, merge: Any = None) -> dict[str, float | list[float]]:
        """Per-component step metrics keyed ``"<module path>.<metric>"`` plus ``"<metric>/mean"`` and ``"/max"``.

        E.g. ``layers.3.mlp.maxvio`` for each MoE layer and ``maxvio/mean``, ``maxvio/max`` over the layers. Scalar
        metrics are aggregated; list-valued ones (per-expert loads) are passed through per module only. Read before
        :meth:`after_optimizer_step`, which resets the counters. ``merge`` adds the metrics of components other
        ranks hold (see :func:`aggregate_metrics`).
        """
        return aggregate_metrics(self.module_metrics(), merge)

    def module_metrics(self) -> dict[str, float | list[float]]:
        """Per-component step metrics keyed ``"<module path>.<metric>"`` (no aggregates)."""
        out: dict[str, float | list[float]] = {}
        for name, m in self.stats:
            for key, value in m.step_metrics().items():
                if isinstance(value, (list, tuple)):
                    out[f"{name}.{key}"] = [float(v) for v in value]
                else:
                    out[f"{name}.{key}"] = float(value)
        return out


def aggregate_metrics(per_module: dict[str, float | list[float]], merge: Any = None) -> dict[str, float | list[float]]:
    """``per_module`` (merged with the other ranks' by ``merge`` when given, e.g. a pipeline's
    :meth:`~dsk.api.ParallelStrategy.merge_component_metrics`) plus ``"<metric>/mean"`` and ``"/max"`` over the
    modules of each scalar metric."""
    out = dict(merge(per_module) if merge is not None else per_module)
    per_key: dict[str, list[float]] = {}
    for name in sorted(out, key=_module_order):
        value = out[name]
        if not isinstance(value, (list, tuple)):
            per_key.setdefault(name.rpartition(".")[2], []).append(float(value))
    for key, values in per_key.items():
        out[f"{key}/mean"] = sum(values) / len(values)
        out[f"{key}/max"] = max(values)
    return out


def _module_order(name: str) -> tuple:
    """Sort key of ``"<module path>.<metric>"``: numeric path parts as numbers (layers.10 after layers.9)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def collect_side_channels(model: nn.Module) -> SideChannels:
    """Find the model's components implementing the side-channel protocols (the root module itself excluded)."""
    side = SideChannels()
    for name, m in model.named_modules():
        if m is model or not name:
            continue
        if isinstance(m, AuxLossSource):
            side.aux.append((name, m))
        if isinstance(m, StepStatistics):
            side.stats.append((name, m))
        if isinstance(m, AfterOptimizerStep):
            side.after_step.append((name, m))
    return side


@dataclass
class LossOutput:
    """The training loss of one forward and its parts.

    Attributes:
        loss: ``lm_loss + mtp_loss + aux_loss``.
        lm_loss: mean next-token cross-entropy over the targets ``labels[:, 1:] != -100``.
        mtp_loss: weighted MTP loss ``(lambda/D) sum_k L^k`` (None without MTP heads).
        aux_loss: sum of the components' auxiliary losses of this forward (None when there are none).
        output: the model output the loss was computed from.
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    output: Any = field(default=None, repr=False)

    @property
    def logits(self) -> torch.Tensor:
        """The forward's next-token logits [B, T, V]."""
        return self.output.logits

    @property
    def mtp_logits(self) -> list[torch.Tensor] | None:
        """The forward's MTP logits per depth (None without MTP heads)."""
        return self.output.mtp_logits

    def parts(self) -> dict[str, torch.Tensor]:
        """The losses that are set, by name (``loss``, ``lm_loss``, ``mtp_loss``, ``aux_loss``)."""
        names = ("loss", "lm_loss", "mtp_loss", "aux_loss")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


def loss_from_output(model: nn.Module, out: Any, labels: torch.Tensor, side: SideChannels | None = None) -> LossOutput:
    """The training loss of a forward's output (with MTP logits when the model has MTP heads).

    ``model.mtp.loss`` scores the MTP depths; the auxiliary losses come from ``side`` (collected from ``model``
    when not given).
    """
    with profile_part("loss"):
        main = lm_loss(out.logits, labels)
    loss = main
    mtp_loss = None
    mtp = getattr(model, "mtp", None)
    if mtp is not None and out.mtp_logits is not None:
        with profile_part("mtp", absorb=True):
            mtp_loss = mtp.loss(out.mtp_logits, labels)
        loss = loss + mtp_loss
    side = side if side is not None else collect_side_channels(model)
    aux_loss = side.aux_loss(loss.dtype)
    if aux_loss is not None:
        loss = loss + aux_loss
    return LossOutput(loss=loss, lm_loss=main, mtp_loss=mtp_loss, aux_loss=aux_loss, output=out)


def training_loss(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    side: SideChannels | None = None,
) -> LossOutput:
    """Forward ``input_ids`` [B, T] (MTP heads included) and return the training loss against ``labels`` [B, T]."""
    out = model(input_ids, pos=pos, mask=mask, with_mtp=True)
    return loss_from_output(model, out, labels, side)


def staged_training_loss(
    stages: Sequence[nn.Module],
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    pos: torch.Tensor | None = None,
    side: SideChannels | None = None,
) -> LossOutput:
    """The training loss of ``stages`` (from :meth:`DSKModel.stage`) run one after the other, as a pipeline does."""
    pos = torch.arange(input_ids.shape[1], device=input_ids.device) if pos is None else pos
    x: Any = input_ids
    for stage in stages:
        x = stage(x, input_ids, pos, mask)
    return loss_from_output(model, x, labels, side)

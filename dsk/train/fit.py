"""The run estimate from a validated recipe (``dsk plan``, and the fit check ``dsk train`` runs before it builds).

:func:`estimate_run` builds the recipe's model on the meta device (no memory: DeepSeek-V3 in a few seconds, a tiny
model in milliseconds), takes its parts' costs (:func:`dsk.model.cost.part_costs`) into a
:class:`dsk.api.RunEstimate`, and lets every config model of the recipe that implements :class:`dsk.api.SharesCost`
state its share (features, ``[optimizer]``, ``[parallel.*]``, any other slot); the core names no technique.

:func:`check_fit` compares the most loaded rank's estimate with what the device has and refuses (exit 2) a run
that clearly cannot fit. The rule is one-sided: refuse when the parameters, gradients and optimizer state (exact
from the shapes: equal to what bench/reference/pipeline-cpu.txt measures per rank) plus :data:`ACTIVATION_FLOOR` of
the saved activations exceed the memory available. The activations are counted for the PyTorch paths (what a GPU
runs, within a few percent: tests/unit/model/test_estimate.py); the CPU kernels save less (0.75x on the quickstart
model, 0.56x at a pipeline stage of recipes/dualpipe.toml), so only half of them is taken as certain. What the
estimate leaves out (allocator rounding, workspaces, the backward's temporaries) comes on top, so a run that passes
may still run out of memory; one that is refused could not have run.
"""

from __future__ import annotations

import os
from typing import Any

from dsk.api import ResolvedSlot, RunEstimate, SharesCost
from dsk.train.context import RunSetupError

__all__ = ["ACTIVATION_FLOOR", "available_memory", "check_fit", "estimate_run", "meta_model", "share_configs"]

#: the share of the estimated saved activations the fit check takes as certain (see the module docstring)
ACTIVATION_FLOOR = 0.5

GIB = 1024.0**3


def meta_model(resolved: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The model of ``[model]`` built on the meta device (no memory), with the tokenizer's vocabulary when the
    model leaves it unset (as ``dsk train`` takes it)."""
    import torch

    from dsk.model import build_model

    cfg = resolved["model"]
    vocab = cfg.vocab_size if cfg.vocab_size is not None else vocab_size
    if vocab is None:
        tokenizer = resolved.get("tokenizer")
        if tokenizer is None:
            from dsk.data.tokenizers import load_tokenizer

            vocab = load_tokenizer("char").vocab_size
        else:
            vocab = tokenizer.build().vocab_size
    with torch.device("meta"):
        return build_model(cfg, vocab)


def seq_len_of(resolved: dict[str, Any]) -> int:
    """The trainer's sequence length, else the model's context."""
    trainer = getattr(resolved.get("trainer"), "config", None)
    return int(getattr(trainer, "seq_len", None) or resolved["model"].max_seq_len)


def share_configs(resolved: dict[str, Any]) -> list[tuple[str, SharesCost]]:
    """``(recipe key, config)`` of every slot of ``resolved`` whose config implements :class:`dsk.api.SharesCost`,
    in the order they share: features, ``[optimizer]``, ``[parallel.*]``, the other slots, then stably by the
    config's ``cost_share_phase`` (default 0)."""
    found: list[tuple[str, Any]] = []

    def add(key: str, slot: Any) -> None:
        if isinstance(slot, ResolvedSlot) and isinstance(slot.config, SharesCost):
            found.append((key, slot.config))

    for section in ("features", "optimizer", "parallel"):
        value = resolved.get(section)
        if isinstance(value, dict):
            for key, slot in value.items():
                add(f"{section}.{key}", slot)
        else:
            add(section, value)
    for section, value in resolved.items():
        if section not in ("features", "optimizer", "parallel", "model"):
            add(section, value)
    return sorted(found, key=lambda kc: int(getattr(type(kc[1]), "cost_share_phase", 0)))


def estimate_run(
    resolved: dict[str, Any], world_size: int, *, model: Any = None, vocab_size: int | None = None
) -> RunEstimate:
    """The run's :class:`dsk.api.RunEstimate` on ``world_size`` processes, every share applied.

    Args:
        resolved: the validated recipe's sections (one stage's).
        world_size: processes of the run.
        model: the recipe's model already built (on any device, e.g. the meta device); built on meta if None.
        vocab_size: the vocabulary when ``[model]`` leaves it unset (default: the recipe's tokenizer's).
    """
    from dsk.model.cost import part_costs

    seq_len = seq_len_of(resolved)
    if model is None:
        model = meta_model(resolved, vocab_size)
    trainer = getattr(resolved.get("trainer"), "config", None)
    rows = int(getattr(trainer, "batch_size", None) or 1)
    estimate = RunEstimate(
        parts=part_costs(model, seq_len),
        world_size=world_size,
        seq_len=seq_len,
        dim=int(model.config.dim),
        tokens_per_micro_batch=rows * seq_len,
        grad_accum=int(getattr(trainer, "grad_accum", None) or 1),
    )
    for _, config in share_configs(resolved):
        config.share_cost(estimate, resolved)
    return estimate


def available_memory(device: str) -> tuple[float, str] | None:
    """``(bytes, what)`` the device can still give this process, or None when it cannot be told.

    CUDA: the free memory ``torch.cuda.mem_get_info`` reports for the device. CPU: ``MemAvailable`` of
    ``/proc/meminfo`` (the memory that can be had without swapping), else the physical pages ``os.sysconf`` counts
    as available, shared by the ranks on this machine (``LOCAL_WORLD_SIZE``).
    """
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return float(free), f"{device} free memory"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    per = f" / {local} local ranks" if local > 1 else ""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024.0 / local, f"CPU MemAvailable{per}"
    except OSError:
        pass
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return float(pages * size) / local, f"CPU available memory{per}"


def check_fit(resolved: dict[str, Any], world_size: int, device: str, *, vocab_size: int | None = None) -> None:
    """Raise :class:`dsk.train.context.RunSetupError` (exit 2) when the most loaded rank clearly cannot fit the
    memory ``device`` has available (the rule of the module docstring); a run it cannot size (no ``[model]``)
    passes. The message gives the estimate with its parts against the device's memory.
    """
    if resolved.get("model") is None:
        return
    have = available_memory(device)
    if have is None:
        return
    available, what = have
    estimate = estimate_run(resolved, world_size, vocab_size=vocab_size)
    need = estimate.most_loaded()
    on_cpu = not device.startswith("cuda")  # CPU-resident copies (offload, EMA) share the memory there
    device_bytes = need.total + (need.cpu if on_cpu else 0.0)
    if device_bytes - (1.0 - ACTIVATION_FLOOR) * need.activations <= available:
        return
    where = f" (pipeline rank {need.rank})" if len(estimate.layouts()) > 1 else ""
    cpu = f", CPU-resident {need.cpu / GIB:.1f}" if need.cpu and not device.startswith("cuda") else ""
    raise RunSetupError(
        f"the run needs about {device_bytes / GIB:.1f} GiB per rank{where} (params {need.params / GIB:.1f}, grads "
        f"{need.grads / GIB:.1f}, optimizer {need.optimizer / GIB:.1f}, activations {need.activations / GIB:.1f}"
        f"{cpu}) but the device has {available / GIB:.1f} GiB available ({what}); even with half the activations "
        "it would not fit (`dsk plan RECIPE --gpus N` shows how it is counted): make the model or "
        "trainer.batch_size smaller, or run on more ranks"
    )

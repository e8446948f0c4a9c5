"""Optimizer state as safetensors tensors + a JSON skeleton (any optimizer whose groups record parameter names).

The optimizer state is saved without pickle: every tensor of ``optimizer.state`` goes into a safetensors file under
``"<parameter name>/<state key>"`` (``layers.0.mlp.gate.weight/exp_avg``), and the rest (hyper-parameters of each
group, the parameter names of each group, non-tensor state values) into JSON. Keying by parameter name rather
than by position makes a mismatch between checkpoint and model an error that names the parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["optimizer_state_to_tensors", "load_optimizer_state", "named_unique_parameters"]

OPTIMIZER_FORMAT = "dsk-optimizer"
OPTIMIZER_FORMAT_VERSION = 1


def named_unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters with their first name (a tied weight appears once)."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


def _group_names(optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = []
    for i, group in enumerate(optimizer.param_groups):
        if "names" not in group or len(group["names"]) != len(group["params"]):
            raise ValueError(
                f"optimizer param group {i} has no parameter names (group['names']); see dsk.api.OptimizerConfig"
            )
        names.append(list(group["names"]))
    return names


def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the optimizer state into safetensors-ready tensors and a JSON-ready skeleton.

    Returns:
        ``(tensors, meta)``: ``tensors["<name>/<key>"]`` for each tensor state value; ``meta`` holds the class name,
        each group's hyper-parameters and names, and the non-tensor state values.
    """
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    for group, names in zip(optimizer.param_groups, _group_names(optimizer), strict=True):
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k not in ("params", "names")}
        groups.append({"names": names, **hyper})
        for name, p in zip(names, group["params"], strict=True):
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
                else:
                    scalars.setdefault(name, {})[key] = value
    meta = {
        "format": OPTIMIZER_FORMAT,
        "format_version": OPTIMIZER_FORMAT_VERSION,
        "class": type(optimizer).__name__,
        "param_groups": groups,
        "scalars": scalars,
    }
    return tensors, meta


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any], where: str = "optimizer"
) -> None:
    """Restore what :func:`optimizer_state_to_tensors` produced into an optimizer built the same way.

    Raises:
        ValueError: another optimizer class, other groups or parameter names (the message names them).
    """
    if meta.get("format") != OPTIMIZER_FORMAT:
        raise ValueError(f"{where}: not a dsk optimizer state (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > OPTIMIZER_FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {meta['format_version']} is newer than this dsk reads")
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(f"{where}: state of a {meta.get('class')}, the run uses {type(optimizer).__name__}")
    current = _group_names(optimizer)
    saved = [list(g["names"]) for g in meta["param_groups"]]
    if saved != current:
        missing = sorted({n for g in current for n in g} - {n for g in saved for n in g})
        extra = sorted({n for g in saved for n in g} - {n for g in current for n in g})
        raise ValueError(
            f"{where}: parameter groups differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    by_param: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, state_key = key.rpartition("/")
        by_param.setdefault(name, {})[state_key] = tensor
    state: dict[int, dict[str, Any]] = {}
    param_groups = []
    index = 0
    for group_meta, names in zip(meta["param_groups"], saved, strict=True):
        ids = []
        for name in names:
            entry = dict(by_param.get(name, {}))
            entry.update(meta.get("scalars", {}).get(name, {}))
            if entry:
                state[index] = entry
            ids.append(index)
            index += 1
        hyper = {k: (tuple(v) if k == "betas" else v) for k, v in group_meta.items() if k != "names"}
        param_groups.append({**hyper, "names": names, "params": ids})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})

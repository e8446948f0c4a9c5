"""Hook implementations of dsk_fp8 (torch-free, lazy): the ``fp8`` feature and its recipe check."""

from __future__ import annotations

from typing import Any

from dsk import hookimpl
from dsk_fp8.config import FP8Config


@hookimpl
def register_features(register):
    register(
        "feature",
        "fp8",
        "dsk_fp8.feature:FP8Feature",
        config=FP8Config,
        summary="FP8 (E4M3) GEMMs for attention and experts: 1xB activation tiles, BxB weight blocks, FP32 promotion",
    )


def block_size_problems(model: Any, block_size: int, feature_key: str) -> list[Any]:
    """A Problem for each K of the model's linear layers that ``block_size`` does not divide.

    The model dim D is every block's input; the component configs state their own Ks through
    :class:`dsk.api.LinearShapes` (MTP blocks are built from the same attention and ffn slots).
    """
    from dsk.api import LinearShapes, Problem

    hint = f"set features.{feature_key}.block_size = 32 (or another power of two dividing it), or change the dim"
    where = f"features.{feature_key}.block_size = {block_size}"
    problems = []
    if model.dim % block_size:
        problems.append(Problem("model.dim", f"model.dim = {model.dim} (a GEMM's K) is not divisible by {where}", hint))
    slots = ["attention"]
    if getattr(model, "first_k_dense", 0) > 0:
        slots.append("dense_ffn")
    if getattr(model, "first_k_dense", 0) < model.n_layers or getattr(model, "mtp", None) is not None:
        slots.append("ffn")
    for slot_key in slots:
        config = getattr(getattr(model, slot_key, None), "config", None)
        if not isinstance(config, LinearShapes):
            continue  # a third-party component without shapes: checked when the model is built
        for key, k in config.linear_in_features(model.dim).items():
            if k % block_size:
                problems.append(
                    Problem(
                        f"model.{slot_key}.{key}",
                        f"model.{slot_key}.{key} gives a GEMM reduction length K = {k}, not divisible by {where}",
                        hint,
                    )
                )
    return problems


@hookimpl
def validate_recipe(resolved):
    """With ``[features.fp8]`` on, every K of the model must be a multiple of its block size."""
    features = resolved.get("features") or {}
    model = resolved.get("model")
    if model is None:
        return None
    problems = []
    for key, slot in features.items():
        if getattr(slot, "name", None) == "fp8" and isinstance(slot.config, FP8Config):
            problems.extend(block_size_problems(model, slot.config.block_size, key))
    return problems

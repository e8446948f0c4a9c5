"""Hook implementations of dsk_precision: the ``bf16`` and ``compile`` features (torch-free, lazy)."""

from __future__ import annotations

from dsk import hookimpl
from dsk_precision.config import BF16Config, CompileConfig


@hookimpl
def register_features(register):
    """Register the precision features (kind ``feature``)."""
    register(
        "feature",
        "bf16",
        "dsk_precision.bf16:BF16",
        config=BF16Config,
        summary="BF16 mixed precision: BF16 autocast forward, FP32 master weights, gradients and optimizer",
    )
    register(
        "feature",
        "compile",
        "dsk_precision.compile:Compile",
        config=CompileConfig,
        after=("bf16", "fp8", "recompute"),
        summary="torch.compile per transformer block (torchtitan style), off by default",
    )


# What torch.compile (torch 2.13) cannot do with a feature, with the torch error that shows it (docs/precision.md).
RECOMPUTE_REFUSAL = (
    "torch.compile cannot trace recomputation inside a block: dynamo skips the saved-tensor hooks recompute "
    'installs ("Attempted to inline function marked as skipped ... saved_tensors_hooks.__init__") and the '
    'storage identity it reads ("Dynamo does not know how to trace method `data_ptr` of class `UntypedStorage`"), '
    "falls back to eager for those frames, and the compiled step's loss after one update was not eager's "
    "(4.6519 against 4.6109 on the tiny test model)"
)


@hookimpl
def validate_recipe(resolved):
    """Compositions of ``compile`` that torch refuses, as problems at ``features.<key>`` (see docs/precision.md)."""
    from dsk.api import Problem

    features = resolved.get("features") or {}
    by_name = {slot.name: key for key, slot in features.items()}
    compile_key = by_name.get("compile")
    if compile_key is None:
        return None
    problems = []
    if "recompute" in by_name:
        problems.append(
            Problem(
                f"features.{compile_key}",
                f"features.{compile_key} cannot compose with features.{by_name['recompute']}: {RECOMPUTE_REFUSAL}",
                f"turn one off: --set features.{compile_key}.enabled=false or "
                f"--set features.{by_name['recompute']}.enabled=false",
            )
        )
    return problems

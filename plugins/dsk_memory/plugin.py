"""Hook implementations of dsk_memory: the ``ema`` and ``offload`` features, the ``adamw_bf16`` optimizer
(torch-free: implementations are named by lazy strings)."""

from dsk import hookimpl
from dsk_memory.config import AdamWBF16Config, EMAConfig, OffloadConfig

#: features that may wrap the optimizer: offload wraps last, so the CPU copy holds what they built
_OPTIMIZER_WRAPPERS = ("bf16", "fp8", "recompute", "compile", "ema")


@hookimpl
def register_features(register):
    """Register the memory features (kind ``feature``)."""
    register(
        "feature",
        "ema",
        "dsk_memory.ema:EMA",
        config=EMAConfig,
        summary="exponential moving average of the weights in CPU memory, saved with every checkpoint",
    )
    register(
        "feature",
        "offload",
        "dsk_memory.offload:Offload",
        config=OffloadConfig,
        after=_OPTIMIZER_WRAPPERS,
        summary="optimizer state and update in CPU memory (FP32 masters; one copy each way per step)",
    )


@hookimpl
def register_optimizers(register):
    """Register the BF16-moment AdamW (kind ``optimizer``)."""
    register(
        "optimizer",
        "adamw_bf16",
        "dsk_memory.adamw_bf16:build_adamw_bf16",
        config=AdamWBF16Config,
        summary="AdamW with bfloat16 moments (half the state bytes), FP32 update math, decay on matrices only",
    )

"""Hook implementations of dsk_parallel (torch-free: implementations are lazy strings)."""

from __future__ import annotations

from dsk import hookimpl
from dsk_parallel.data_config import FSDPConfig, ReplicateConfig, Zero1Config
from dsk_parallel.expert_config import NodeLimitedConfig
from dsk_parallel.expert_validate import validate_node_limited  # noqa: F401  (a validate_recipe hookimpl)
from dsk_parallel.pipeline_config import PipelineConfig
from dsk_parallel.pipeline_validate import validate_pipeline, validate_pipeline_launch  # noqa: F401  (hookimpls)


@hookimpl
def register_parallel_strategies(register):
    """Register the data-parallel and expert-parallel strategies (kind ``parallel``)."""
    register(
        "parallel",
        "replicate",
        "dsk_parallel.data:Replicate",
        config=ReplicateConfig,
        summary="data parallelism: the model replicated on every rank, gradients all-reduced (torch replicate)",
    )
    register(
        "parallel",
        "fsdp",
        "dsk_parallel.data:FSDP",
        config=FSDPConfig,
        summary="data parallelism with parameters, gradients and optimizer state sharded (FSDP2 fully_shard)",
    )
    register(
        "parallel",
        "zero1",
        "dsk_parallel.data:Zero1",
        config=Zero1Config,
        summary="data parallelism with the optimizer state sharded over the ranks (ZeRO-1, as DeepSeek-V3)",
    )
    register(
        "parallel",
        "node_limited",
        "dsk_parallel.expert:NodeLimitedExperts",
        config=NodeLimitedConfig,
        summary="expert parallelism: routed experts sharded over ranks, all-to-all dispatch to at most max_nodes nodes",
    )

    register(
        "parallel",
        "1f1b",
        "dsk_parallel.pipeline:OneFOneB",
        config=PipelineConfig,
        summary="pipeline parallelism with torch's 1F1B schedule: one model stage per rank (the baseline)",
    )
    register(
        "parallel",
        "dualpipev",
        "dsk_parallel.pipeline:DualPipeV",
        config=PipelineConfig,
        summary="pipeline parallelism with torch's DualPipeV: 2 x pp stages in a V, embedding and head on rank 0",
    )
    register(
        "parallel",
        "dualpipe",
        "dsk_parallel.pipeline:DualPipe",
        config=PipelineConfig,
        summary="DeepSeek's bidirectional DualPipe: micro-batches from both ends, every stage on two ranks",
    )


@hookimpl
def default_parallel_strategy(world_size):
    """``--nproc N`` with no ``[parallel]`` section: plain data parallelism, as a torchrun user expects."""
    return "replicate" if world_size > 1 else None

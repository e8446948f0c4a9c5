"""The process layout every dsk_parallel strategy shares: its rank and world, the writing rank, object broadcasts.

Without a pipeline every rank is a data rank, so the data rank is the rank. With a ``[parallel.*]`` pipeline table
of ``pp`` ranks the world is ``pp`` x DP, pipeline outermost (rank = pp_rank * DP + dp_rank): the data and expert
strategies then see DP as their world and their rank within the pipeline stage's DP ranks as their rank
(:func:`pipeline_ranks`), and build their meshes with a ``pp`` dimension. Collectives run over ``self.group``
(None: the default group); under NCCL, objects travel through the rank's GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from dsk.api import ParallelStrategy

__all__ = ["RankLayout", "local_rank", "pipeline_ranks"]


def local_rank() -> int:
    """This rank's index on its machine (``LOCAL_RANK``, set by the launcher; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def pipeline_ranks(run: Any, world: int) -> int:
    """The pipeline-parallel degree of the run's recipe: a ``[parallel.*]`` pipeline table's ``pp`` (default: every
    rank), 1 without one."""
    from dsk_parallel.pipeline_config import PipelineConfig

    section = getattr(run, "section", None)
    for slot in ((section("parallel") if section is not None else None) or {}).values():
        config = getattr(slot, "config", None)
        if isinstance(config, PipelineConfig):
            return config.pp if config.pp is not None else world
    return 1


class RankLayout(ParallelStrategy):
    """Rank, world size, writer (rank 0), data rank, device, ``broadcast_object`` and ``barrier`` from
    torch.distributed; a subclass calls :meth:`_read_world` in ``setup`` and may set ``self.group``."""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._rank, self._world = 0, 1
        self._cuda = False  # NCCL: collectives (and object broadcasts) need the rank's GPU
        self.group: Any = None
        self.pp, self.pp_rank = 1, 0

    def _read_world(self, run: Any = None) -> bool:
        """Take rank and world size from the default process group; False when there is none (one process).

        Under a pipeline of ``pp`` ranks (:func:`pipeline_ranks`) they are this rank's index among its stage's DP
        data-parallel ranks and DP (``self.pp``, ``self.pp_rank`` say where the rank sits in the pipeline).
        """
        self.pp, self.pp_rank = 1, 0
        if not dist.is_available() or not dist.is_initialized():
            self._rank, self._world, self._cuda = 0, 1, False
            return False
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._cuda = torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()
        pp = pipeline_ranks(run, self._world)
        if pp > 1 and self._world % pp == 0:  # the pipeline strategy reports a world that is not pp x DP
            self.pp, self.pp_rank = pp, self._rank // (self._world // pp)
            self._rank, self._world = self._rank % (self._world // pp), self._world // pp
        return True

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def is_writer(self) -> bool:
        return self._rank == 0

    @property
    def data_rank(self) -> int:
        return self._rank  # PP = 1: every rank is a data rank

    @property
    def data_world_size(self) -> int:
        return self._world

    @property
    def device(self) -> str | None:
        return f"cuda:{local_rank()}" if self._cuda else None

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every rank (pickled by torch between this program's own processes)."""
        if self._world == 1:
            return obj
        box = [obj]
        device = torch.device(f"cuda:{local_rank()}") if self._cuda else None
        dist.broadcast_object_list(box, src=src, group=self.group, device=device)
        return box[0]

    def barrier(self) -> None:
        if self._world > 1:
            dist.barrier(group=self.group)

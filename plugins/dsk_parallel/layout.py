"""The process layout every dsk_parallel strategy shares: its rank and world, the writing rank, object broadcasts.

Until pipelines exist every rank is a data rank (PP = 1), so the data rank is the rank. Collectives run over
``self.group`` (None: the default group); under NCCL, objects travel through the rank's GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from dsk.api import ParallelStrategy

__all__ = ["RankLayout", "local_rank"]


def local_rank() -> int:
    """This rank's index on its machine (``LOCAL_RANK``, set by the launcher; 0 without one)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


class RankLayout(ParallelStrategy):
    """Rank, world size, writer (rank 0), data rank, device, ``broadcast_object`` and ``barrier`` from
    torch.distributed; a subclass calls :meth:`_read_world` in ``setup`` and may set ``self.group``."""

    def __init__(self, config: Any = None):
        super().__init__(config)
        self._rank, self._world = 0, 1
        self._cuda = False  # NCCL: collectives (and object broadcasts) need the rank's GPU
        self.group: Any = None

    def _read_world(self) -> bool:
        """Take rank and world size from the default process group; False when there is none (one process)."""
        if not dist.is_available() or not dist.is_initialized():
            self._rank, self._world, self._cuda = 0, 1, False
            return False
        self._rank, self._world = dist.get_rank(), dist.get_world_size()
        self._cuda = torch.cuda.is_available() and "nccl" in str(dist.get_backend()).lower()
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

"""Template of a ``parallel`` plugin: plain data parallelism that all-reduces the gradients itself."""

SUMMARY = "data parallelism: the model replicated on every rank, gradients averaged by one all-reduce per step"
MODULE = "strategy"
TABLE = "[parallel.data]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.run.check_parallel`"

CONFIG = '''\
"""Options of the $comp strategy: a [parallel.<key>] table. Torch-free; every field defaulted."""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Data parallelism over every rank of the run's default process group."""

    bucket_mb: float = Field(25.0, gt=0, description="gradients are all-reduced in flat buckets of about this size")
'''

IMPL = '''\
"""The $comp strategy: data parallelism on torch.distributed.

Contract (docs/plugins.md, "parallel"): a dsk.api.ParallelStrategy built as `$Class(config)`. dsk starts the
processes (`dsk train --nproc N`, or torchrun) and initialises the default process group; the strategy reads its
layout in `setup`, says which slice of each global batch this rank reads (`data_rank` / `data_world_size`), makes
every gradient the mean over the ranks (`sync_gradients`, once per optimizer step), reduces what the core asks it
to (`all_reduce`, `broadcast_object`, `barrier`) and names the writing rank (`is_writer`). One process is a
layout like any other: everything below works with a world of 1.

Overlap the all-reduce with the backward (gradient hooks), or shard the optimizer state, to make it yours.
"""

import torch
import torch.distributed as dist
from dsk.api import SHARDED_PARAM, ParallelStrategy

from .config import $Config

_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class $Class(ParallelStrategy):
    """Replicated model; one flat all-reduce per bucket of gradients after the backward."""

    name = "$comp"

    def __init__(self, config: $Config | None = None):
        super().__init__(config if config is not None else $Config())
        self._rank, self._world, self._cuda = 0, 1, False

    # -- layout ------------------------------------------------------------------------------------------------
    def setup(self, run) -> None:
        """Read rank and world size from the default process group (none: one process)."""
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
            self._cuda = "nccl" in str(dist.get_backend()).lower()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def data_rank(self) -> int:
        return self._rank

    @property
    def data_world_size(self) -> int:
        return self._world

    @property
    def device(self) -> str | None:
        if self._cuda:
            return f"cuda:{torch.cuda.current_device()}"
        return None

    # -- model -------------------------------------------------------------------------------------------------
    def wrap_model(self, model, run):
        """Every rank starts from rank 0's weights and buffers (the model is otherwise unchanged)."""
        if self._world > 1:
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    if not getattr(t, SHARDED_PARAM, False):
                        self._collective(t, lambda w: dist.broadcast(w, src=0))
        return model

    def sync_gradients(self, model) -> None:
        """Each gradient becomes the mean over the ranks: flat buckets, one all-reduce each."""
        if self._world == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad and not getattr(p, SHARDED_PARAM, False)]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)  # a parameter this rank's batch missed still takes part
        limit = int(self.config.bucket_mb * 2**20)
        bucket, size = [], 0
        for p in params:
            bucket.append(p.grad)
            size += p.grad.numel() * p.grad.element_size()
            if size >= limit:
                self._reduce_flat(bucket)
                bucket, size = [], 0
        if bucket:
            self._reduce_flat(bucket)

    def _reduce_flat(self, grads: list[torch.Tensor]) -> None:
        by_dtype: dict = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in group])
            self.all_reduce(flat, "mean")
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    # -- reductions --------------------------------------------------------------------------------------------
    def _collective(self, tensor: torch.Tensor, op) -> None:
        """Run `op` on `tensor`, through this rank's GPU under NCCL when the tensor is on the CPU."""
        work = tensor.cuda() if self._cuda and tensor.device.type != "cuda" else tensor
        op(work)
        if work is not tensor:
            tensor.copy_(work)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce in place over the ranks (sum, max, or mean = sum / world size)."""
        if op not in _OPS:
            raise ValueError(f"all_reduce op {op!r}: expected one of {sorted(_OPS)}")
        if self._world > 1:
            self._collective(tensor, lambda w: dist.all_reduce(w, op=_OPS[op]))
            if op == "mean":
                tensor.div_(self._world)
        return tensor

    def broadcast_object(self, obj, src: int = 0):
        if self._world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=torch.device(self.device) if self._cuda else None)
        return box[0]

    def barrier(self) -> None:
        if self._world > 1:
            dist.barrier()
'''

TEST = '''\
"""$comp against dsk's parallel-strategy contract suite (layout, single-process equivalence, resume)."""

import torch
from dsk.testing.contracts.model import check_config_round_trip, check_registration
from dsk.testing.contracts.run import check_parallel

from $pkg import plugin
from $pkg.config import $Config
from $pkg.strategy import $Class


def test_meets_the_parallel_contract():
    check_parallel($Class, $Config, name="$comp", table={"bucket_mb": 1.0}, nproc=1)


def test_one_process_reduces_nothing():
    strategy = $Class($Config())
    strategy.setup(None)
    t = torch.tensor([1.0, 2.0])
    assert strategy.world_size == 1 and strategy.is_writer
    assert torch.equal(strategy.all_reduce(t, "mean"), torch.tensor([1.0, 2.0]))


def test_config_round_trip():
    check_config_round_trip($Config, {"bucket_mb": 4.0})


def test_registered_as_parallel():
    check_registration(plugin, "parallel", "$comp")
'''

RECIPE = {
    "parallel.data": 'type = "$comp"',
}

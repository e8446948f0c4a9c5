"""DualPipe's bidirectional pipeline schedule on torch.distributed point-to-point ops (spec §3).

A schedule executor, not a strategy: :class:`DualPipeSchedule` runs one training (or forward-only) step of a model of
PP stages on PP ranks with micro-batches fed from both ends. Rank r holds two stages, ``modules[0]`` = stage r of
direction 0 (data flows pp rank 0 -> PP-1) and ``modules[1]`` = stage PP-1-r of direction 1 (PP-1 -> 0), so every
stage lives on two ranks and the caller sums the gradients of the two copies afterwards. Pipeline rank 0 feeds the
first half of the micro-batches (direction 0), rank PP-1 the second half (direction 1); each direction ends on the
other end rank, whose stage returns a scalar loss.

The schedule (spec §3.3). Let ``n = PP/2``, ``h = min(r, PP-1-r)`` (the distance to the nearer end) and
``C = n_chunks/2``. A rank's *phase 0* is the direction in which it sits h stages from the start (direction 0 on the
first half of the ranks, direction 1 on the second half), *phase 1* the other; F = forward chunk, B = backward chunk,
W = deferred weight-gradient chunk, ``F0&B1`` = a pair that DualPipe overlaps:

1. ``2(n-h-1)`` x F0                         warm-up of the near direction
2. ``h+1`` x (F0, F1)
3. ``n-h-1`` x (B1 zero-bubble, W, F1)
4. ``C-PP+h+1`` x (F0&B1, F1&B0)             the steady state; on its first iteration the two middle ranks run F0
                                              and B1 apart (no pair) to shorten the bubble
5. ``n-h-1`` x (B1, F1&B0)
6. ``h+1`` x (B1, B0)                        zero-bubble from halfway on (which of the two first: parity of h)
7. ``n-h-1`` x (W, B0 zero-bubble)
8. ``h+1`` x W                               the weight-gradient queue is then empty

Every chunk first posts its receives (and the sends queued by the chunks before it), waits for every request, and
only then computes, exactly as the reference implementation commits its P2P ops; the order of posts and waits is part
of the schedule (it is what keeps blocking waits deadlock-free), so :func:`_plan` emits communication and compute
ops together and both :meth:`DualPipeSchedule.step` and :func:`dualpipe_actions` read that one list.

What overlaps here, and what would not on a GPU. On gloo/CPU in one Python thread *nothing* overlaps in compute: an
``F0&B1`` pair runs the forward, then the backward. The pairing still shapes the communication: the receives of both
chunks of a pair (the forward's activation and the backward's output gradient) are posted together and waited for
together, and the sends of both results go out in the next commit as one batch, so a pair costs one round of
latency instead of two. Each wait finishes before the next compute starts (no asynchronous comm/compute overlap,
like the reference). On NCCL with CUDA streams a real implementation interleaves the two chunks of a pair (one
chunk's attention / MLP with the other's all-to-all dispatch and combine, the paper's Fig. 4) and runs P2P on its own
stream; this executor does neither, its pairs are the place where that would go.

Zero bubble (spec §3.5). A B chunk marked zero-bubble computes only the gradient of the stage input (what the
previous rank waits for) and queues the weight-gradient work; a W step runs the oldest queued item. The split uses
torch's own zero-bubble machinery, ``torch.distributed.pipelining._backward.stage_backward_input`` (input gradients,
keeping the graph and capturing the gradients at the nodes where the weight gradients branch off) and
``stage_backward_weight`` (the weight gradients from those captured gradients, without redoing the input part). A
first stage's input is integer token ids, so it has no input gradient: its zero-bubble B computes nothing and its W
is the whole backward. With ``zero_bubble=False`` every B computes everything and W steps only commit communication.
Deferred or not, the gradients are the same sums in the same micro-batch order.

Gradients accumulate (sum) into the modules' ``.grad`` over the step's micro-batches; nothing is scaled.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

# message tags: the activation and the output gradient of each direction (a rank pair carries up to four streams of
# same-shaped tensors; the tags keep them apart on gloo, while the schedule's order already matches them on NCCL)
_TAG_ACT = (0, 1)
_TAG_GRAD = (2, 3)


class _Op(NamedTuple):
    """One op of a rank's schedule: compute ("F", "B", "W"), communication ("recv_f", "send_f", "recv_b", "send_b":
    the activation / output gradient of micro-batch ``mb`` of ``direction``), or "commit" (post and wait)."""

    kind: str
    direction: int
    mb: int
    deferred: bool = False  # B only: a zero-bubble B (input gradients only; its weight gradients wait for a W)


def _check_sizes(pp_size: int, n_chunks: int | None = None, pp_rank: int | None = None) -> None:
    """ValueError for a pipeline size / micro-batch count the schedule cannot run."""
    if pp_size < 2 or pp_size % 2:
        raise ValueError(f"DualPipe needs an even pipeline size >= 2, got pp_size={pp_size}")
    if pp_rank is not None and not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside 0..{pp_size - 1}")
    if n_chunks is not None and (n_chunks % 2 or n_chunks < 2 * pp_size):
        raise ValueError(
            f"DualPipe needs an even n_chunks >= 2 * pp_size = {2 * pp_size} (half of them per direction), "
            f"got n_chunks={n_chunks}"
        )


class _Planner:
    """Builds one rank's op list by walking the 8 steps; the reference's chunk helpers, as op emitters."""

    def __init__(self, pp_rank: int, pp_size: int, forward_only: bool, zero_bubble: bool) -> None:
        self.rank, self.size = pp_rank, pp_size
        self.second_half = int(pp_rank >= pp_size // 2)
        self.forward_only, self.zero_bubble = forward_only, zero_bubble
        self.ops: list[_Op] = []
        self._next_mb: dict[tuple[str, int], int] = {}
        self._deferred: deque[tuple[int, int]] = deque()  # (direction, mb) of the zero-bubble Bs not yet W'd

    def _direction(self, phase: int) -> int:
        return phase ^ self.second_half

    def is_first(self, direction: int) -> bool:
        return self.rank == (0 if direction == 0 else self.size - 1)

    def is_last(self, direction: int) -> bool:
        return self.rank == (self.size - 1 if direction == 0 else 0)

    def _emit(self, kind: str, direction: int, deferred: bool = False) -> int:
        mb = self._next_mb.get((kind, direction), 0)
        self._next_mb[(kind, direction)] = mb + 1
        self.ops.append(_Op(kind, direction, mb, deferred))
        return mb

    # communication (each a no-op where the stage has no such neighbour or the step has no backward)
    def recv_f(self, phase: int) -> None:
        if not self.is_first(d := self._direction(phase)):
            self._emit("recv_f", d)

    def send_f(self, phase: int) -> None:
        if not self.is_last(d := self._direction(phase)):
            self._emit("send_f", d)

    def recv_b(self, phase: int) -> None:
        if not self.forward_only and not self.is_last(d := self._direction(phase)):
            self._emit("recv_b", d)

    def send_b(self, phase: int) -> None:
        if not self.forward_only and not self.is_first(d := self._direction(phase)):
            self._emit("send_b", d)

    def commit(self) -> None:
        self.ops.append(_Op("commit", -1, -1))

    # compute
    def backward(self, phase: int, zb: bool) -> None:
        if self.forward_only:
            return
        d = self._direction(phase)
        deferred = zb and self.zero_bubble
        mb = self._emit("B", d, deferred)
        if deferred:
            self._deferred.append((d, mb))

    # chunks: receive, commit, compute, queue the send
    def forward_chunk(self, phase: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_f(phase)
        self.commit()
        self._emit("F", self._direction(phase))
        if send:
            self.send_f(phase)

    def backward_chunk(self, phase: int, zb: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_b(phase)
        self.commit()
        self.backward(phase, zb)
        if send:
            self.send_b(phase)

    def pair_chunk(self, phase_f: int, phase_b: int, recv_f: bool = True) -> None:
        """An overlapped F&B pair: both chunks' receives in one commit, F then B, both sends queued."""
        if recv_f:
            self.recv_f(phase_f)
        self.recv_b(phase_b)
        self.commit()
        self._emit("F", self._direction(phase_f))
        self.backward(phase_b, zb=False)
        self.send_f(phase_f)
        self.send_b(phase_b)

    def weight_chunk(self) -> None:
        if self.forward_only:
            return
        self.commit()
        if self._deferred:
            d, mb = self._deferred.popleft()
            self.ops.append(_Op("W", d, mb))
        elif self.zero_bubble:
            raise AssertionError("DualPipe schedule: a W step with no deferred weight gradient")


def _plan(pp_rank: int, pp_size: int, n_chunks: int, *, forward_only: bool, zero_bubble: bool) -> list[_Op]:
    """The ordered ops (communication and compute) of one step on pipeline rank ``pp_rank`` (module docstring)."""
    _check_sizes(pp_size, n_chunks, pp_rank)
    p = _Planner(pp_rank, pp_size, forward_only, zero_bubble)
    n, h, chunks_per_dir = pp_size // 2, min(pp_rank, pp_size - 1 - pp_rank), n_chunks // 2
    middle = h == n - 1  # the ranks PP/2-1 and PP/2

    for _ in range(2 * (n - h - 1)):  # 1: nF0
        p.forward_chunk(0)

    p.recv_f(0)  # 2: nF0F1 (the next F0's receive is posted with each F1's)
    for i in range(h + 1):
        p.forward_chunk(0, recv=False, send=middle)
        p.recv_f(0)
        p.forward_chunk(1, send=not middle or i < h)
        if not middle:
            p.send_f(0)

    for _ in range(n - h - 1):  # 3: nB1W1F1, zero bubble
        p.backward_chunk(1, zb=True)
        p.recv_f(1)
        p.weight_chunk()
        p.forward_chunk(1, recv=False)

    for i in range(chunks_per_dir - pp_size + h + 1):  # 4: nF0B1F1B0, the steady state
        if i == 0 and middle:  # F0 and B1 apart, their sends after both
            p.forward_chunk(0, recv=False, send=False)
            p.send_f(1)
            p.backward_chunk(1, send=False)
            p.send_f(0)
            p.send_b(1)
        else:
            p.pair_chunk(0, 1, recv_f=i > 0)
        p.pair_chunk(1, 0)

    for _ in range(n - h - 1):  # 5: nB1F1B0
        p.backward_chunk(1)
        p.pair_chunk(1, 0)

    zb = False  # 6: nB1B0, zero bubble from halfway on
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        p.backward_chunk(1, zb=zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        p.backward_chunk(0, zb=zb)

    for _ in range(n - h - 1):  # 7: nWB0, zero bubble
        p.weight_chunk()
        p.backward_chunk(0, zb=True)

    for _ in range(h + 1):  # 8: nW
        p.weight_chunk()
    if p._deferred:
        raise AssertionError(f"DualPipe schedule: {len(p._deferred)} weight-gradient chunks left over")
    p.commit()  # the last sends
    return p.ops


def dualpipe_actions(
    pp_rank: int, pp_size: int, n_chunks: int, *, zero_bubble: bool = True, forward_only: bool = False
) -> list[tuple[str, int, int]]:
    """The compute actions ``(kind, direction, micro_batch)`` that pipeline rank ``pp_rank`` executes in one step, in
    order; kind is "F", "B" or "W" (a W names the zero-bubble B whose weight gradients it computes). The same list
    :meth:`DualPipeSchedule.step` runs (both read :func:`_plan`). Pure Python: no communication."""
    ops = _plan(pp_rank, pp_size, n_chunks, forward_only=forward_only, zero_bubble=zero_bubble)
    return [(op.kind, op.direction, op.mb) for op in ops if op.kind in ("F", "B", "W")]


class DualPipeSchedule:
    """Runs DualPipe steps on one pipeline rank (module docstring).

    ``modules[0]`` is this rank's stage of direction 0 (first stage iff ``pp_rank == 0``, last iff
    ``pp_rank == pp_size - 1``), ``modules[1]`` its stage of direction 1 (first iff ``pp_rank == pp_size - 1``, last
    iff ``pp_rank == 0``). A module is called ``y = module(x)`` on its direction's micro-batches in increasing order;
    a last stage returns a scalar loss, every other stage a tensor of the step's ``shape`` / ``dtype``, whose values
    the schedule frees once it is sent (unless it is a view or a leaf; see :meth:`_free`).
    ``group`` is the pipeline process group and ``peers[i]`` the global rank of pipeline rank i.

    Set ``record = True`` to fill :attr:`trace` with ``(kind, direction, micro_batch, t_start, t_end)`` for every
    compute action and ``("comm", -1, -1, t0, t1)`` for every wait on communication (``time.perf_counter``; on a
    GPU each compute action is synchronised before and after, so that its times are its execution's).
    """

    def __init__(
        self,
        modules: tuple[nn.Module, nn.Module],
        *,
        pp_rank: int,
        pp_size: int,
        group: dist.ProcessGroup | None,
        peers: list[int] | None = None,
        device: torch.device | str = "cpu",
        zero_bubble: bool = True,
    ) -> None:
        _check_sizes(pp_size, pp_rank=pp_rank)
        if len(modules) != 2:
            raise ValueError(f"DualPipeSchedule takes two modules (one per direction), got {len(modules)}")
        if peers is None:
            peers = [dist.get_global_rank(group, i) for i in range(pp_size)]
        if len(peers) != pp_size:
            raise ValueError(f"peers has {len(peers)} global ranks for pp_size={pp_size}")
        if dist.is_initialized() and peers[pp_rank] != dist.get_rank():
            raise ValueError(f"peers[{pp_rank}] = {peers[pp_rank]} is not this process's global rank {dist.get_rank()}")
        self.modules = modules
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.group, self.peers = group, list(peers)
        self.device = torch.device(device)
        self.zero_bubble = zero_bubble
        # batch_isend_irecv groups the ops into one NCCL group call (needed there to avoid deadlocks); on gloo the
        # ops are posted one by one (batch_isend_irecv has reportedly hung on gloo, pytorch/PiPPy#1130)
        self._batch_p2p = dist.is_initialized() and dist.get_backend(group) == "nccl"
        self.record = False
        self.trace: list[tuple[str, int, int, float, float]] = []

    # the two neighbours of each direction (pipeline ranks): data flows prev -> this -> next
    def _prev(self, direction: int) -> int:
        return self.pp_rank - 1 if direction == 0 else self.pp_rank + 1

    def _next(self, direction: int) -> int:
        return self.pp_rank + 1 if direction == 0 else self.pp_rank - 1

    def _is_first(self, direction: int) -> bool:
        return self.pp_rank == (0 if direction == 0 else self.pp_size - 1)

    def _is_last(self, direction: int) -> bool:
        return self.pp_rank == (self.pp_size - 1 if direction == 0 else 0)

    def step(
        self,
        inputs0: list[torch.Tensor] | None,
        inputs1: list[torch.Tensor] | None,
        *,
        n_chunks: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        forward_only: bool = False,
    ) -> dict[int, list[torch.Tensor]]:
        """One step over ``n_chunks`` micro-batches (``n_chunks/2`` per direction).

        ``inputs0`` (on pipeline rank 0) and ``inputs1`` (on rank PP-1) are the first stages' micro-batch inputs,
        ``n_chunks/2`` each; other ranks pass None. ``shape`` / ``dtype``: every stage-to-stage tensor. Training
        back-propagates each last stage's loss (gradient 1) and sums the gradients into the modules' ``.grad``;
        ``forward_only`` (call it under ``torch.no_grad()``) runs only the forward chunks. Returns the detached losses
        of the directions that end on this rank, ``{direction: [loss of micro-batch 0, 1, ...]}`` (``{}`` elsewhere).
        """
        _check_sizes(self.pp_size, n_chunks, self.pp_rank)
        if not forward_only and not torch.is_grad_enabled():
            raise RuntimeError("DualPipeSchedule.step: training needs grad mode (forward_only=True under no_grad)")
        per_dir = n_chunks // 2
        given = {0: inputs0, 1: inputs1}
        for d in (0, 1):
            if self._is_first(d) and (given[d] is None or len(given[d]) != per_dir):
                got = None if given[d] is None else len(given[d])
                raise ValueError(f"pipeline rank {self.pp_rank} feeds direction {d}: inputs{d} needs {per_dir} "
                                 f"micro-batches (n_chunks / 2), got {got}")  # fmt: skip
        ops = _plan(self.pp_rank, self.pp_size, n_chunks, forward_only=forward_only, zero_bubble=self.zero_bubble)

        self.trace = []
        self._shape, self._dtype, self._forward_only = tuple(shape), dtype, forward_only
        self._inputs = given
        self._x: tuple[dict[int, torch.Tensor], ...] = ({}, {})  # received activations, by micro-batch
        self._y: tuple[dict[int, torch.Tensor], ...] = ({}, {})  # stage outputs / losses awaiting send or backward
        self._dy: tuple[dict[int, torch.Tensor], ...] = ({}, {})  # received output gradients
        self._dx: tuple[dict[int, torch.Tensor], ...] = ({}, {})  # input gradients awaiting send
        self._losses: dict[int, list[torch.Tensor]] = {d: [] for d in (0, 1) if self._is_last(d)}
        self._weight_work: deque[Callable[[], None]] = deque()
        self._pending: list[tuple[str, torch.Tensor, int, int]] = []  # (send|recv, tensor, pipeline peer, tag)
        self._sent: list[torch.Tensor] = []  # activations to free once their sends completed
        self._received: list[torch.Tensor] = []  # activation buffers to mark requires_grad once filled
        try:
            for op in ops:
                self._run(op)
            if self._weight_work:
                raise AssertionError("DualPipeSchedule: weight-gradient work left over after the step")
            return self._losses
        finally:
            self._inputs = None
            self._x = self._y = self._dy = self._dx = ({}, {})
            self._pending, self._sent, self._received = [], [], []

    def _run(self, op: _Op) -> None:
        d, mb = op.direction, op.mb
        if op.kind == "recv_f":
            buf = torch.empty(self._shape, dtype=self._dtype, device=self.device)
            self._x[d][mb] = buf
            self._received.append(buf)
            self._pending.append(("recv", buf, self._prev(d), _TAG_ACT[d]))
        elif op.kind == "send_f":
            y = self._y[d][mb] if not self._forward_only else self._y[d].pop(mb)
            self._sent.append(y)
            self._pending.append(("send", y.detach().contiguous(), self._next(d), _TAG_ACT[d]))
        elif op.kind == "recv_b":
            buf = torch.empty(self._shape, dtype=self._dtype, device=self.device)
            self._dy[d][mb] = buf
            self._pending.append(("recv", buf, self._next(d), _TAG_GRAD[d]))
        elif op.kind == "send_b":
            self._pending.append(("send", self._dx[d].pop(mb), self._prev(d), _TAG_GRAD[d]))
        elif op.kind == "commit":
            self._commit()
        else:
            synced = self.record and self.device.type == "cuda"  # traced on a GPU: time the work, not its launch
            if synced:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            if op.kind == "F":
                self._forward(d, mb)
            elif op.kind == "B":
                self._backward(d, mb, op.deferred)
            elif self.zero_bubble:  # W: the oldest deferred weight-gradient work (FIFO, as the Bs were deferred)
                self._weight_work.popleft()()
            else:
                return  # W without zero bubble: nothing was deferred (the commit before it already ran)
            if self.record:
                if synced:
                    torch.cuda.synchronize(self.device)
                self.trace.append((op.kind, d, mb, t0, time.perf_counter()))

    def _commit(self) -> None:
        """Post the queued sends and receives and wait for every one of them (before the next compute)."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        if self._batch_p2p:
            p2p = [
                dist.P2POp(dist.isend if kind == "send" else dist.irecv, t, self.peers[peer], self.group, tag)
                for kind, t, peer, tag in self._pending
            ]
            works = dist.batch_isend_irecv(p2p)
        else:
            works = [
                (dist.isend if kind == "send" else dist.irecv)(t, self.peers[peer], group=self.group, tag=tag)
                for kind, t, peer, tag in self._pending
            ]
        for work in works:
            work.wait()
        if self.record:
            self.trace.append(("comm", -1, -1, t0, time.perf_counter()))
        self._pending = []
        for buf in self._received:
            buf.requires_grad_(True)
        self._received = []
        for y in self._sent:
            self._free(y)
        self._sent = []

    def _free(self, y: torch.Tensor) -> None:
        """Release a sent activation's storage while keeping the tensor as the root of its backward.

        The backward needs only ``y``'s autograd node and shape, not its values: the ops that produced ``y`` saved
        their own inputs, and one that saved ``y`` itself as its output holds a separate handle on the storage, so
        the memory then simply stays alive. ``y`` is swapped for a stride-0 view of one zero of the same shape (the
        autograd shape checks still pass). Not done for a view (its storage is another tensor's) nor for a tensor
        without a graph (a leaf: perhaps the module's own state). A module must not read its returned tensor later.
        """
        if self._forward_only or y._base is not None or y.grad_fn is None:
            return
        y.data = torch.zeros((), dtype=y.dtype, device=y.device).expand(y.shape)

    def _forward(self, d: int, mb: int) -> None:
        x = self._inputs[d][mb] if self._is_first(d) else self._x[d][mb]
        y = self.modules[d](x)
        if self._forward_only:
            self._x[d].pop(mb, None)
        if self._is_last(d):
            if not isinstance(y, torch.Tensor) or y.numel() != 1:
                raise ValueError(f"the last stage of direction {d} must return a scalar loss, got {_describe(y)}")
            self._losses[d].append(y.detach())
        elif not isinstance(y, torch.Tensor) or tuple(y.shape) != self._shape or y.dtype != self._dtype:
            raise ValueError(f"stage output of direction {d} is {_describe(y)}, the step sends {self._shape} "
                             f"{self._dtype}")  # fmt: skip
        if not self._forward_only or not self._is_last(d):
            self._y[d][mb] = y

    def _backward(self, d: int, mb: int, deferred: bool) -> None:
        """Back-propagate micro-batch ``mb`` of direction ``d``: everything, or (``deferred``) the input gradient
        now and the weight gradients queued for a W step."""
        root = self._y[d].pop(mb)
        dy = None if self._is_last(d) else self._dy[d].pop(mb)
        x = None if self._is_first(d) else self._x[d].pop(mb)
        module = self.modules[d]
        if not deferred:
            torch.autograd.backward([root], None if dy is None else [dy])
        elif x is None:  # a first stage has no input gradient: the whole backward is weight-gradient work
            self._weight_work.append(lambda: torch.autograd.backward([root], None if dy is None else [dy]))
        else:
            weights = [w for w in module.parameters() if w.requires_grad]
            _, groups = stage_backward_input([root], None if dy is None else [dy], [x], iter(weights))
            self._weight_work.append(lambda: _weight_grads(weights, groups))
        if x is not None:
            self._dx[d][mb] = x.grad if x.grad is not None else torch.zeros_like(x)
            x.grad = None


def _weight_grads(weights: list[nn.Parameter], groups: list[dict]) -> None:
    """The deferred half of a zero-bubble backward (torch's ``stage_backward_weight`` on the captured groups)."""
    stage_backward_weight(iter(weights), groups)


def _describe(y: object) -> str:
    return f"a tensor {tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__

"""DualPipe's schedule (dsk_parallel.dualpipe) against one process running the same model micro-batch by micro-batch.

One spawn of 4 gloo ranks runs every distributed case (the rank function returns the numbers, the tests assert):
PP 4 on the world group, and PP 2 at the same time on the subgroups {0, 2} and {1, 3} (so pipeline rank 1 is global
rank 2 or 3: the ``peers`` mapping). The model has PP stages, each ``h + Linear(16->32) GELU Linear(32->16)`` (odd
stages end in tanh, whose backward reads the stage output that the schedule frees after sending it); the first is
preceded by an embedding over token ids, the last followed by an MSE loss against the micro-batch's target, which
it looks up by counting its calls. Micro-batches are 2 x 5 tokens, float64, seeded.

* training, n_chunks = 2 PP and 2 PP + 4, zero bubble on and off: each direction's losses are ``torch.equal`` to the
  reference's (direction 0 = the first half of the micro-batches, direction 1 = the second), every parameter's
  gradient (the sum of its two copies: rank r's stage r in modules[0] and rank PP-1-r's in modules[1]) is within
  cal_diff 1e-13 of the reference, and the recorded trace's compute actions are :func:`dualpipe_actions`.
* forward only (under no_grad): the losses equal the reference's and no gradient appears.
* the action lists (pure Python): each F and B once per (direction, micro-batch), W exactly for the deferred Bs in
  FIFO order, F before B before W, the step counts of spec §3.3, and a simulation of all ranks with the stage
  dependencies (F after the previous stage's F, B after the next stage's B) that runs to the end (no deadlock).
* errors: odd PP, odd n_chunks and n_chunks < 2 PP raise ValueError.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dsk_parallel.dualpipe import DualPipeSchedule, dualpipe_actions
from torch import nn

from tests.distributed.harness import GROUP, run_ranks

pytestmark = pytest.mark.xdist_group(GROUP)

DIM, HIDDEN, VOCAB, B, T = 16, 32, 11, 2, 5
CASES = {4: (8, 12), 2: (4, 8)}  # PP -> the n_chunks tried


class Stage(nn.Module):
    """One pipeline stage: [embedding] -> residual MLP [-> tanh] [-> MSE loss against targets_MBTD[call count]]."""

    def __init__(self, index: int, n_stages: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM) if index == 0 else None
        self.lin1, self.lin2 = nn.Linear(DIM, HIDDEN), nn.Linear(HIDDEN, DIM)
        self.squash = index % 2 == 1
        self.targets_MBTD: torch.Tensor | None = None  # the last stage's, set per use
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_BTD = self.embed(x) if self.embed is not None else x
        h_BTD = h_BTD + self.lin2(F.gelu(self.lin1(h_BTD)))
        if self.squash:
            h_BTD = torch.tanh(h_BTD)
        if self.targets_MBTD is None:
            return h_BTD
        loss = F.mse_loss(h_BTD, self.targets_MBTD[self.calls])
        self.calls += 1
        return loss


def _model(n_stages: int, n_chunks: int) -> tuple[list[Stage], torch.Tensor, torch.Tensor]:
    """The stages (seeded, identical on every rank), the token ids [M, B, T] and the targets [M, B, T, D]."""
    torch.manual_seed(0)
    stages = [Stage(i, n_stages).double() for i in range(n_stages)]
    ids_MBT = torch.randint(0, VOCAB, (n_chunks, B, T))
    targets_MBTD = torch.randn(n_chunks, B, T, DIM, dtype=torch.float64)
    return stages, ids_MBT, targets_MBTD


def _reference(stages: list[Stage], ids_MBT: torch.Tensor, targets_MBTD: torch.Tensor):
    """Sequential micro-batches, loss.backward() on each: the losses [M] and each stage's summed grads."""
    stages = copy.deepcopy(stages)
    stages[-1].targets_MBTD = targets_MBTD
    losses = []
    for ids_BT in ids_MBT:
        h = ids_BT
        for stage in stages:
            h = stage(h)
        h.backward()
        losses.append(h.detach())
    grads = [{n: p.grad.clone() for n, p in s.named_parameters()} for s in stages]
    return torch.stack(losses), grads


def _dualpipe_case(pp_rank, pp, group, peers, n_chunks, zero_bubble, forward_only):
    stages, ids_MBT, targets_MBTD = _model(pp, n_chunks)
    ref_losses, ref_grads = _reference(stages, ids_MBT, targets_MBTD) if pp_rank in (0, pp - 1) else (None, None)
    half = n_chunks // 2
    mod0, mod1 = copy.deepcopy(stages[pp_rank]), copy.deepcopy(stages[pp - 1 - pp_rank])
    if pp_rank == pp - 1:
        mod0.targets_MBTD = targets_MBTD[:half]  # direction 0 carries the first half and ends on rank PP-1
    if pp_rank == 0:
        mod1.targets_MBTD = targets_MBTD[half:]
    schedule = DualPipeSchedule((mod0, mod1), pp_rank=pp_rank, pp_size=pp, group=group, peers=peers,
                                zero_bubble=zero_bubble)  # fmt: skip
    schedule.record = True
    inputs0 = list(ids_MBT[:half]) if pp_rank == 0 else None
    inputs1 = list(ids_MBT[half:]) if pp_rank == pp - 1 else None
    with torch.set_grad_enabled(not forward_only):
        losses = schedule.step(inputs0, inputs1, n_chunks=n_chunks, shape=(B, T, DIM), dtype=torch.float64,
                               forward_only=forward_only)  # fmt: skip
    grads = [{n: None if p.grad is None else p.grad.clone() for n, p in m.named_parameters()} for m in (mod0, mod1)]
    traced = [(k, d, mb) for k, d, mb, _, _ in schedule.trace if k != "comm"]
    comm_waits = sum(k == "comm" for k, *_ in schedule.trace)
    return {"losses": {d: torch.stack(v) for d, v in losses.items()}, "ref_losses": ref_losses,
            "ref_grads": ref_grads, "grads": grads, "traced": traced, "comm_waits": comm_waits}  # fmt: skip


def _rank_fn(rank: int, world: int) -> bytes:
    """Every case on this rank: PP 4 over the world, then PP 2 over {0, 2} / {1, 3} (``torch.save``d: tensors sent
    through the harness's queue would go by shared memory that dies with the rank)."""
    torch.set_default_dtype(torch.float64)
    sub = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    out = {}
    for pp in (4, 2):
        group, peers = (dist.group.WORLD, None) if pp == 4 else (sub[rank % 2], [rank % 2, rank % 2 + 2])
        pp_rank = rank if pp == 4 else rank // 2
        for n_chunks in CASES[pp]:
            for zb, fwd in ((True, False), (False, False), (True, True)):
                out[(pp, n_chunks, zb, fwd)] = _dualpipe_case(pp_rank, pp, group, peers, n_chunks, zb, fwd)
        dist.barrier()
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return [torch.load(io.BytesIO(b)) for b in run_ranks(_rank_fn, 4)]


def _cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return 1 - 2 * (x * y).sum().item() / (x * x + y * y).sum().item()


def _results(ranks: list[dict], pp: int, n_chunks: int, zb: bool, fwd: bool) -> list[dict]:
    """The case's results in pipeline-rank order (PP 2: the group {0, 2}; {1, 3} is checked as well)."""
    if pp == 4:
        return [r[(pp, n_chunks, zb, fwd)] for r in ranks]
    return [ranks[0][(pp, n_chunks, zb, fwd)], ranks[2][(pp, n_chunks, zb, fwd)]]


TRAIN = [(pp, c, zb) for pp in CASES for c in CASES[pp] for zb in (True, False)]


@pytest.mark.parametrize(("pp", "n_chunks", "zero_bubble"), TRAIN)
def test_training_step_matches_sequential_reference(ranks, pp, n_chunks, zero_bubble):
    groups = [_results(ranks, pp, n_chunks, zero_bubble, False)]
    if pp == 2:
        groups.append([ranks[1][(pp, n_chunks, zero_bubble, False)], ranks[3][(pp, n_chunks, zero_bubble, False)]])
    half = n_chunks // 2
    for res in groups:
        first, last = res[0], res[pp - 1]
        assert set(first["losses"]) == {1} and set(last["losses"]) == {0}
        assert all(r["losses"] == {} for r in res[1:-1])
        assert torch.equal(last["losses"][0], last["ref_losses"][:half])
        assert torch.equal(first["losses"][1], first["ref_losses"][half:])
        ref_grads = first["ref_grads"]
        for s in range(pp):
            copy0, copy1 = res[s]["grads"][0], res[pp - 1 - s]["grads"][1]  # stage s in both directions
            assert set(copy0) == set(ref_grads[s])
            for name, ref in ref_grads[s].items():
                diff = _cal_diff(copy0[name] + copy1[name], ref)
                assert diff < 1e-13, (s, name, diff)
        for r, result in enumerate(res):
            assert result["traced"] == dualpipe_actions(r, pp, n_chunks, zero_bubble=zero_bubble)
            assert result["comm_waits"] > 0


@pytest.mark.parametrize(("pp", "n_chunks"), [(pp, c) for pp in CASES for c in CASES[pp]])
def test_forward_only_losses_match_reference(ranks, pp, n_chunks):
    res = _results(ranks, pp, n_chunks, True, True)
    half = n_chunks // 2
    assert torch.equal(res[pp - 1]["losses"][0], res[pp - 1]["ref_losses"][:half])
    assert torch.equal(res[0]["losses"][1], res[0]["ref_losses"][half:])
    for r, result in enumerate(res):
        assert all(g is None for grads in result["grads"] for g in grads.values())
        assert result["traced"] == [a for a in dualpipe_actions(r, pp, n_chunks) if a[0] == "F"]


def _spec_pattern(pp_rank: int, pp: int, n_chunks: int) -> list[tuple[str, int]]:
    """(kind, phase) of each compute action from the 8 steps' counts in spec §3.3 (phase 1 = the far direction)."""
    n, h, c = pp // 2, min(pp_rank, pp - 1 - pp_rank), n_chunks // 2
    w = ("W", -1)
    steps = [
        (2 * (n - h - 1), [("F", 0)]),
        (h + 1, [("F", 0), ("F", 1)]),
        (n - h - 1, [("B", 1), w, ("F", 1)]),
        (c - pp + h + 1, [("F", 0), ("B", 1), ("F", 1), ("B", 0)]),
        (n - h - 1, [("B", 1), ("F", 1), ("B", 0)]),
        (h + 1, [("B", 1), ("B", 0)]),
        (n - h - 1, [w, ("B", 0)]),
        (h + 1, [w]),
    ]
    return [a for count, body in steps for _ in range(count) for a in body]


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("extra", [0, 6])
def test_action_lists_follow_the_spec(pp, extra):
    n_chunks = 2 * pp + extra
    half = n_chunks // 2
    every = {(d, mb) for d in (0, 1) for mb in range(half)}
    for r in range(pp):
        actions = dualpipe_actions(r, pp, n_chunks)
        second = int(r >= pp // 2)
        assert [(k, -1 if k == "W" else d ^ second) for k, d, _ in actions] == _spec_pattern(r, pp, n_chunks)
        for kind in ("F", "B"):
            mine = [(d, mb) for k, d, mb in actions if k == kind]
            assert sorted(mine) == sorted(every) and len(mine) == n_chunks
            for d in (0, 1):  # each module sees its micro-batches in increasing order
                assert [mb for dd, mb in mine if dd == d] == list(range(half))
        pos = {a: i for i, a in enumerate(actions)}
        assert all(pos[("F", d, mb)] < pos[("B", d, mb)] for d, mb in every)
        ws = [(d, mb) for k, d, mb in actions if k == "W"]
        h = min(r, pp - 1 - r)
        assert len(ws) == len(set(ws)) == 2 * (pp // 2) - h - 1  # steps 3 + 7 + 8 = deferred Bs of steps 3, 6, 7
        assert ws == sorted(ws, key=lambda a: pos[("B", *a)])  # FIFO
        assert all(pos[("B", *a)] < pos[("W", *a)] for a in ws)
        no_zb = dualpipe_actions(r, pp, n_chunks, zero_bubble=False)
        assert no_zb == [a for a in actions if a[0] != "W"]
        assert dualpipe_actions(r, pp, n_chunks, forward_only=True) == [a for a in actions if a[0] == "F"]


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_action_lists_run_together_without_deadlock(pp):
    """Each rank runs its list in order; F waits for the previous stage's F of that micro-batch, B for the next
    stage's B. Every rank must finish: the lists are consistent with each other."""
    n_chunks = 2 * pp + 4
    lists = [dualpipe_actions(r, pp, n_chunks) for r in range(pp)]
    done: set[tuple[str, int, int, int]] = set()
    at = [0] * pp
    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while at[r] < len(lists[r]):
                kind, d, mb = lists[r][at[r]]
                prev, nxt = (r - 1, r + 1) if d == 0 else (r + 1, r - 1)
                first, last = not 0 <= prev < pp, not 0 <= nxt < pp
                if kind == "F" and not first and ("F", d, mb, prev) not in done:
                    break
                if kind == "B" and not last and ("B", d, mb, nxt) not in done:
                    break
                done.add((kind, d, mb, r))
                at[r] += 1
                progress = True
    assert at == [len(a) for a in lists]


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="even pipeline size"):
        dualpipe_actions(0, 3, 6)
    with pytest.raises(ValueError, match="even pipeline size"):
        DualPipeSchedule((nn.Identity(), nn.Identity()), pp_rank=0, pp_size=3, group=None, peers=[0, 1, 2])
    with pytest.raises(ValueError, match="n_chunks"):
        dualpipe_actions(0, 4, 9)
    with pytest.raises(ValueError, match="n_chunks"):
        dualpipe_actions(1, 4, 6)
    schedule = DualPipeSchedule((nn.Identity(), nn.Identity()), pp_rank=0, pp_size=2, group=None, peers=[0, 1])
    ids = [torch.zeros(B, T, dtype=torch.long)] * 2
    for n_chunks in (5, 2):  # odd; fewer than 2 * PP
        with pytest.raises(ValueError, match="n_chunks"):
            schedule.step(ids, None, n_chunks=n_chunks, shape=(B, T, DIM), dtype=torch.float64)
    with pytest.raises(ValueError, match="inputs0 needs 2 micro-batches"):
        schedule.step(ids[:1], None, n_chunks=4, shape=(B, T, DIM), dtype=torch.float64)

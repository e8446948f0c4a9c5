"""offload: where each tensor lives, exactly one copy each way per step, the same losses as without it, the
learning rate reaching the inner optimizer, and exact resume."""

from __future__ import annotations

import pytest
import torch
from dsk_memory.adamw_bf16 import AdamWBF16
from dsk_memory.offload import CPUOffloadOptimizer
from torch.utils._python_dispatch import TorchDispatchMode

from tests.unit.train.helpers import make_run, tiny_table


def _table(offload: bool = True, optimizer: str = "adamw"):
    table = tiny_table()
    table["optimizer"]["type"] = optimizer
    if offload:
        table["features"] = {"offload": {"enabled": True}}
    return table


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _CountCopies(TorchDispatchMode):
    """Counts ``aten.copy_`` calls by (source storage, destination storage)."""

    def __init__(self):
        super().__init__()
        self.copies: list[tuple[int, int]] = []
        self.writes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.copies.append((_ptr(args[1]), _ptr(args[0])))
        elif func._schema.is_mutable and args and isinstance(args[0], torch.Tensor):
            self.writes.append(_ptr(args[0]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_bf16"])
def test_state_and_masters_live_on_the_cpu_apart_from_the_model_weights(tmp_path, dsk_registry, dsk_pm, optimizer):
    run = make_run(tmp_path, _table(optimizer=optimizer), dsk_registry, dsk_pm)
    opt = run.optimizer
    assert isinstance(opt, CPUOffloadOptimizer)
    assert isinstance(opt.inner, AdamWBF16 if optimizer == "adamw_bf16" else torch.optim.AdamW)
    plain = make_run(tmp_path / "plain", _table(offload=False, optimizer=optimizer), dsk_registry, dsk_pm)
    assert [g["names"] for g in opt.param_groups] == [g["names"] for g in plain.optimizer.param_groups]
    run.train_step()
    model_params = {id(p) for p in run.model.parameters()}
    for group, masters in zip(opt.param_groups, opt.masters, strict=True):
        for p, m in zip(group["params"], masters, strict=True):
            assert id(p) in model_params and id(m) not in model_params
            assert m.device.type == "cpu" and m.dtype == torch.float32 and _ptr(m) != _ptr(p)
            assert torch.equal(m, p.detach())  # the update came back to the model
            assert opt.state[p] is opt.inner.state[m]  # the checkpoint sees the inner state by device parameter
            for value in opt.inner.state[m].values():
                if isinstance(value, torch.Tensor):
                    assert value.device.type == "cpu"
    moments = [s["exp_avg"].dtype for s in opt.inner.state.values()]
    assert set(moments) == {torch.bfloat16 if optimizer == "adamw_bf16" else torch.float32}


def test_each_step_copies_each_gradient_to_the_host_and_each_weight_back_exactly_once(tmp_path, dsk_registry, dsk_pm):
    run = make_run(tmp_path, _table(), dsk_registry, dsk_pm)
    opt = run.optimizer
    step = opt.step
    counters = []

    def counted_step():
        mode = _CountCopies()
        grads = {id(p): _ptr(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None}
        with mode:
            step()
        counters.append((mode, grads))

    opt.step = counted_step  # the real step, observed from outside
    run.train_step()
    run.train_step()
    pairs = list(opt.master_of.items())
    assert len(counters) == 2 and len(pairs) > 10
    for mode, grads in counters:
        assert len(grads) == len(pairs)
        for p, m in pairs:
            to_host = [c for c in mode.copies if c[1] == _ptr(m.grad)]
            to_device = [c for c in mode.copies if c[1] == _ptr(p)]
            assert to_host == [(grads[id(p)], _ptr(m.grad))]  # from the parameter's gradient
            assert to_device == [(_ptr(m), _ptr(p))]  # from its master
            assert _ptr(p) not in mode.writes  # nothing else writes the model's weights
    # the staging buffers are allocated once and reused
    assert len({_ptr(m.grad) for _, m in pairs}) == len(pairs)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_bf16"])
def test_losses_and_weights_equal_the_run_without_offload(tmp_path, dsk_registry, dsk_pm, optimizer):
    a = make_run(tmp_path / "a", _table(optimizer=optimizer), dsk_registry, dsk_pm)
    b = make_run(tmp_path / "b", _table(offload=False, optimizer=optimizer), dsk_registry, dsk_pm)
    for _ in range(4):
        ra, rb = a.train_step(), b.train_step()
        assert (ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["lr"])
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_the_schedule_reaches_the_inner_optimizer(tmp_path, dsk_registry, dsk_pm):
    run = make_run(tmp_path, _table(), dsk_registry, dsk_pm)
    seen = []
    for step in (1, 2):
        run.train_step()
        seen.append([g["lr"] for g in run.optimizer.inner.param_groups])
        expected = run.built.lr_at(step, run.total_steps())
        assert seen[-1] == [expected] * len(run.optimizer.param_groups)
    assert seen[0] != seen[1]  # warm-up: the rate changed between the steps
    assert run.optimizer.state_dict()["param_groups"][0]["lr"] == seen[1][0]


def test_resume_from_a_checkpoint_continues_exactly(tmp_path, dsk_registry, dsk_pm):
    table = _table(optimizer="adamw_bf16")
    a = make_run(tmp_path / "a", table, dsk_registry, dsk_pm)
    for _ in range(2):
        a.train_step()
    path = a.save("interval")
    b = make_run(tmp_path / "a", table, dsk_registry, dsk_pm, resume_from=path)
    for ma, mb in zip(a.optimizer.masters, b.optimizer.masters, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(ma, mb, strict=True))
    for sa, sb in zip(a.optimizer.inner.state.values(), b.optimizer.inner.state.values(), strict=True):
        assert sb["exp_avg"].dtype == torch.bfloat16 and sb["exp_avg"].device.type == "cpu"
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    for _ in range(2):
        ra, rb = a.train_step(), b.train_step()
        assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]

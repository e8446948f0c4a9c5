"""ema: the average against a float64 hand computation, where it lives, the deferred (GPU-style) landing, its state,
and loading it from a checkpoint."""

from __future__ import annotations

import pytest
import torch
from dsk_memory.config import EMAConfig
from dsk_memory.ema import EMA
from torch import nn

from dsk.train.checkpoint import CheckpointLoadError, load_checkpoint, load_feature_weights
from dsk.train.context import RunSetupError
from tests.unit.train.helpers import make_run, tiny_table


def _table(**ema):
    table = tiny_table()
    table["features"] = {"ema": {"decay": 0.8, **ema}}
    return table


def _ema(run) -> EMA:
    (feature,) = [f for f in run.built.features if isinstance(f, EMA)]
    return feature


@pytest.mark.parametrize("every", [1, 2])
def test_the_average_equals_a_float64_hand_computation_and_lives_on_the_cpu(tmp_path, dsk_registry, dsk_pm, every):
    run = make_run(tmp_path, _table(update_every=every), dsk_registry, dsk_pm)
    ema = _ema(run)
    params = dict(run.built.base_model.named_parameters())
    expected = {n: params[n].detach().double().clone() for n in ema.names}  # starts at the initial weights
    assert set(ema.names) == {n for n, p in params.items() if p.requires_grad}
    for step in range(1, 5):
        run.train_step()
        if step % every == 0:
            for n in ema.names:
                expected[n] = 0.8 * expected[n] + 0.2 * params[n].detach().double()
    assert ema.updates == 4 // every
    for n, avg in ema.weights().items():
        assert avg.device.type == "cpu" and avg.dtype == torch.float32, n
        assert avg.untyped_storage().data_ptr() != params[n].untyped_storage().data_ptr(), n  # a copy
        torch.testing.assert_close(avg.double(), expected[n], rtol=0, atol=1e-6)
    moved = [n for n in ema.names if not torch.equal(ema.weights()[n], params[n].detach())]
    assert moved  # the average lags the trained weights


def test_deferred_landing_gives_the_same_average_one_update_later():
    """The GPU path (copies staged, applied when they land) on CPU: same numbers as updating at once."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    now, later = EMA(EMAConfig(decay=0.9)), EMA(EMAConfig(decay=0.9))
    now.after_weights(model, None)
    later.after_weights(model, None)
    later.asynchronous = True
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        before = [t.clone() for t in later.shadow]
        now.after_step(None, step)
        later.after_step(None, step)
        if step == 1:  # staged, not yet applied
            assert all(torch.equal(a, b) for a, b in zip(before, later.shadow, strict=True))
    # the staged copies hold the weights of the step they were taken at, even if the weights move on meanwhile
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(100)
    a, b = now.state_dict(), later.state_dict()  # reading lands the pending update
    assert a.keys() == b.keys() and a["updates"] == b["updates"] == 3
    for key in a:
        if key.startswith("weights/"):
            assert torch.equal(a[key], b[key]), key


def test_state_round_trips_and_a_foreign_average_is_an_error_naming_the_parameters():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = EMA(EMAConfig(decay=0.5))
    ema.after_weights(model, None)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.after_step(None, 1)
    state = ema.state_dict()
    assert state["model_weights"] == "ema" and set(state) >= {"weights/weight", "weights/bias", "updates"}
    other = EMA(EMAConfig(decay=0.5))
    other.after_weights(nn.Linear(4, 3), None)
    other.load_state_dict({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()})
    assert other.updates == 1 and torch.equal(other.weights()["weight"], ema.weights()["weight"])
    with pytest.raises(RunSetupError, match="missing \\['bias'\\]"):
        other.load_state_dict({"updates": 1, "weights/weight": state["weights/weight"]})


def test_load_feature_weights_puts_the_average_into_a_model_and_leaves_buffers_trained(tmp_path, dsk_registry, dsk_pm):
    from dsk.model import load_pretrained

    run = make_run(tmp_path, _table(), dsk_registry, dsk_pm)
    for _ in range(2):
        run.train_step()
    path = run.save("final")
    averages = _ema(run).weights()
    model = load_pretrained(path)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_feature_weights(model, path.parent.parent) == path  # a run directory: its latest checkpoint
    params = dict(model.named_parameters())
    for name, avg in averages.items():
        assert torch.equal(params[name].detach(), avg), name
    buffers = {n: b for n, b in model.named_buffers() if n in trained}  # persistent ones: router biases
    assert any("bias" in n for n in buffers)
    for name, buf in buffers.items():
        assert torch.equal(buf, trained[name]), name
    assert load_checkpoint(path).state["features"]["ema"]["updates"] == 2


def test_load_feature_weights_without_an_ema_is_a_clear_error(tmp_path, dsk_registry, dsk_pm):
    from dsk.model import load_pretrained

    run = make_run(tmp_path, tiny_table(), dsk_registry, dsk_pm)
    run.train_step()
    path = run.save("final")
    with pytest.raises(CheckpointLoadError, match="holds no ema weights"):
        load_feature_weights(load_pretrained(path), path)

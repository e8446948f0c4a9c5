"""Checkpoints: round trip, exact continuation in-process, atomic writes, retention, no pickle."""

import json

import pytest
import torch
from dsk_optim.adamw import build_adamw
from dsk_optim.config import AdamWConfig

from dsk.train.checkpoint import (
    CheckpointLoadError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from dsk.train.optim import load_optimizer_state, optimizer_state_to_tensors
from tests.unit.train.helpers import make_run, tiny_table


def test_round_trip_restores_weights_optimizer_data_position_and_continues_identically(tmp_path, dsk_registry, dsk_pm):
    table = tiny_table()
    a = make_run(tmp_path / "a", table, dsk_registry, dsk_pm)
    for _ in range(2):
        a.train_step()
    path = a.save("interval")
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json", "model.safetensors", "optimizer.json", "optimizer.safetensors", "state.json",
    ]  # fmt: skip

    b = make_run(tmp_path / "a", table, dsk_registry, dsk_pm, resume_from=path)
    assert b.step == 2
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    for i in sa["state"]:
        for key in sa["state"][i]:
            assert torch.equal(sa["state"][i][key], sb["state"][i][key])
    assert a.batches.state_dict() == b.batches.state_dict()
    ra, rb = a.train_step(), b.train_step()
    assert ra["loss"] == rb["loss"] and ra["grad_norm"] == rb["grad_norm"]


def test_checkpoint_state_names_step_rng_data_tokenizer_and_model(tmp_path, dsk_registry, dsk_pm):
    run = make_run(tmp_path, tiny_table(), dsk_registry, dsk_pm)
    run.train_step()
    state = json.loads((run.save("final") / "state.json").read_text())
    assert state["step"] == 1 and state["trainer"] == "pretrain"
    assert {"python", "torch"} <= set(state["rng"])
    assert state["data"]["stream"]["position"] == 8
    assert state["tokenizer"]["type"] == "char" and state["model"]["dim"] == 32
    assert state["task"]["type"] == "arithmetic"


def test_checkpoint_loads_as_a_pretrained_model(tmp_path, dsk_registry, dsk_pm):
    from dsk.model import load_pretrained

    run = make_run(tmp_path, tiny_table(), dsk_registry, dsk_pm)
    path = run.save("final")
    model = load_pretrained(path)
    for (name, p), q in zip(run.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_retention_keeps_the_newest_checkpoints(tmp_path):
    for step in (1, 2, 3):
        _save_weights_only(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert latest_checkpoint(tmp_path).name == "step-3"


def _save_weights_only(run_dir, step, keep):
    """A checkpoint written through the same code path, with a stand-in for the model's config.json."""
    from unittest import mock

    model = torch.nn.Linear(2, 2)
    with mock.patch("dsk.train.checkpoint.model_config_json", return_value={"format": "test"}):
        return save_checkpoint(run_dir, step, model=model, optimizer=None, state={}, keep=keep)


def test_a_failed_save_leaves_previous_checkpoints_and_no_partial_one(tmp_path):
    from unittest import mock

    _save_weights_only(tmp_path, 1, keep=3)
    with mock.patch("dsk.train.checkpoint._write_json", side_effect=OSError("disk full")):
        with pytest.raises(OSError):
            _save_weights_only(tmp_path, 2, keep=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-1"]


def test_stale_temporaries_are_ignored_and_removed(tmp_path):
    _save_weights_only(tmp_path, 1, keep=3)
    stale = tmp_path / "checkpoints" / ".tmp-step-2-abc"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists()


def test_loading_a_directory_without_checkpoint_names_it(tmp_path):
    with pytest.raises(CheckpointLoadError, match="no checkpoint here"):
        load_checkpoint(tmp_path)


def test_optimizer_state_round_trips_by_parameter_name_and_rejects_another_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    opt = build_adamw(AdamWConfig(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, vectors do not
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    tensors, meta = optimizer_state_to_tensors(opt)
    assert "0.weight/exp_avg" in tensors and json.dumps(meta)
    fresh = build_adamw(AdamWConfig(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), model)
    load_optimizer_state(fresh, tensors, meta)
    assert torch.equal(fresh.state[model[0].weight]["exp_avg_sq"], opt.state[model[0].weight]["exp_avg_sq"])
    other = build_adamw(AdamWConfig(lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1), torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="parameter groups differ"):
        load_optimizer_state(other, tensors, meta)

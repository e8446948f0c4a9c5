"""The parallel-strategy contract on one process: a strategy from a plugin is set up, wraps the model and the
optimizer, takes part in every update's reductions, and decides whether this rank writes anything."""

from __future__ import annotations

import json
import types

from dsk import hookimpl
from dsk.api import NoConfig, ParallelStrategy
from dsk.testing import isolated_plugin_manager, run_dsk
from tests.unit.train.helpers import write_recipe

CALLS: dict[str, list] = {}


class Recorder(ParallelStrategy):
    """One process that records every call the build path and the update make."""

    writer = True

    def __init__(self, config=None):
        super().__init__(config)
        CALLS.clear()
        CALLS.update(setup=[], wrap_model=[], wrap_optimizer=[], all_reduce=[], stats=[])

    def setup(self, run):
        CALLS["setup"].append(run.stage)

    @property
    def is_writer(self):
        return type(self).writer

    def wrap_model(self, model, run):
        CALLS["wrap_model"].append(type(model).__name__)
        return model

    def wrap_optimizer(self, optimizer, model, run):
        CALLS["wrap_optimizer"].append(type(optimizer).__name__)
        return optimizer

    def all_reduce(self, tensor, op="sum"):
        CALLS["all_reduce"].append(op)
        return tensor

    def reduce_step_statistics(self, tensors):
        CALLS["stats"].append(len(tensors))


class Silent(Recorder):
    """Not the writing rank."""

    writer = False


plugin = types.SimpleNamespace(__name__="parallel_probe")


@hookimpl
def register_parallel_strategies(register):
    register("parallel", "recorder", Recorder, config=NoConfig)
    register("parallel", "silent", Silent, config=NoConfig)


plugin.register_parallel_strategies = register_parallel_strategies


def _train(tmp_path, strategy):
    recipe = write_recipe(tmp_path)
    run_dir = tmp_path / "run"
    args = ["train", str(recipe), "--run-dir", str(run_dir), "--set", "trainer.steps=3", "--set",
            "trainer.eval_samples=0", "--set", f"parallel.{strategy}.enabled=true"]  # fmt: skip
    return run_dsk(args, pm=isolated_plugin_manager(plugin)), run_dir


def test_a_strategy_is_set_up_wraps_and_reduces_in_every_update(tmp_path):
    result, run_dir = _train(tmp_path, "recorder")
    assert result.exit_code == 0, result.output
    assert CALLS["setup"] == [None] and CALLS["wrap_model"] == ["DSKModel"] and CALLS["wrap_optimizer"] == ["AdamW"]
    assert CALLS["all_reduce"] == ["max"] * 3  # every step's finite check is agreed across ranks
    assert len(CALLS["stats"]) == 3 and CALLS["stats"][0] > 0  # the MoE loads are summed before they are applied
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "step-3" / "state.json").is_file()


def test_a_rank_that_is_not_the_writer_writes_no_metrics_and_no_checkpoint(tmp_path):
    result, run_dir = _train(tmp_path, "silent")
    assert result.exit_code == 0, result.output
    assert len(CALLS["all_reduce"]) == 3
    assert not (run_dir / "checkpoints").exists()
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == ""

"""The compile feature: every block compiled in place (names kept), the same losses as eager, and its compositions.

Compiling is slow on this CPU (tens of seconds for one block): the model here has one MoE block and no MTP head,
the data a fixed length (no recompiles for new shapes), and the backend is ``aot_eager``, which traces forward and
backward through dynamo and AOTAutograd as inductor does but generates no code.
"""

from __future__ import annotations

import pytest
import torch
from dsk_precision.compile import Compile, blocks_of

from tests.unit.train.helpers import make_run, tiny_table


def _table(features):
    table = tiny_table()
    table["model"].update(n_layers=1, first_k_dense=0)
    del table["model"]["mtp"]
    table["data"] = {"type": "markov", "vocab": 8, "order": 1, "length": 14, "test_size": 4}
    table["trainer"].update(seq_len=16, batch_size=4, eval_samples=0)
    table["features"] = features
    return table


def _run(tmp_path, features):
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager()
    return make_run(tmp_path, _table(features), build_registry(pm), pm)


def _losses(run, steps):
    out = []
    for _ in range(steps):
        out.append(run.train_step()["loss"])
        run.step += 1
    return out


def test_every_block_is_compiled_in_place_and_names_are_kept(tmp_path):
    table = tiny_table()  # two layers and an MTP head: three blocks
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager()
    reg = build_registry(pm)
    table["features"] = {"compile": {"backend": "eager"}}
    run = make_run(tmp_path / "c", table, reg, pm)
    plain = make_run(tmp_path / "p", tiny_table(), reg, pm)
    feature = run.built.features[0]
    assert isinstance(feature, Compile)
    assert feature.compiled == ["layers.0", "layers.1", "mtp.layers.0.block"]
    assert all(b._compiled_call_impl is not None for b in blocks_of(run.model))
    assert all(b._compiled_call_impl is None for b in blocks_of(plain.model))
    assert list(run.model.state_dict()) == list(plain.model.state_dict())
    assert [n for n, _ in run.model.named_parameters()] == [n for n, _ in plain.model.named_parameters()]


def test_options_reach_torch_compile():
    from dsk_precision.config import CompileConfig

    assert Compile(CompileConfig(mode="max-autotune", fullgraph=True, dynamic=False)).options() == {
        "backend": "inductor",
        "mode": "max-autotune",
        "fullgraph": True,
        "dynamic": False,
    }
    assert "mode" not in Compile(CompileConfig(backend="aot_eager")).options()


@pytest.mark.slow
def test_a_compiled_step_gives_the_eager_loss(tmp_path):
    torch._dynamo.reset()
    eager = _losses(_run(tmp_path / "e", {}), 2)
    compiled_run = _run(tmp_path / "c", {"compile": {"backend": "aot_eager"}})
    compiled = _losses(compiled_run, 2)
    # the same ops in the same order (the C++ kernels' PyTorch paths inside the block): FP32 rounding apart
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo really traced the block


@pytest.mark.slow
def test_compile_composes_with_bf16(tmp_path):
    torch._dynamo.reset()
    eager = _losses(_run(tmp_path / "e", {"bf16": {}}), 2)
    compiled = _losses(_run(tmp_path / "c", {"bf16": {}, "compile": {"backend": "aot_eager"}}), 2)
    assert compiled == pytest.approx(eager, rel=1e-3)  # BF16 rounding of differently ordered ops
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def _validate(dsk_cli, tmp_path, *sets):
    from tests.unit.train.helpers import write_recipe

    recipe = write_recipe(tmp_path, name="r.toml")
    args = ["recipe", "validate", str(recipe)]
    for s in sets:
        args += ["--set", s]
    return dsk_cli(args)


def test_compile_with_recompute_is_a_recipe_error_quoting_the_torch_reason(tmp_path, dsk_cli):
    result = _validate(dsk_cli, tmp_path, "features.compile.enabled=true", "features.recompute.mode=selective")
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "features.compile" in err and "features.recompute" in err
    assert "saved_tensors_hooks" in err and "Traceback" not in result.output


@pytest.mark.slow
def test_compile_composes_with_fp8(tmp_path):
    torch._dynamo.reset()
    fp8 = {"fp8": {"block_size": 8}}
    eager_run = _run(tmp_path / "e", fp8)
    compiled_run = _run(tmp_path / "c", {**fp8, "compile": {"backend": "aot_eager"}})
    want, got = [], []
    for rows, run in ((want, eager_run), (got, compiled_run)):
        for _ in range(2):
            rows.append(run.train_step())
            run.step += 1
    # the same quantised operands; FP32 sums reordered by the compiled graph
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert [r["fp8_gemms"] for r in got] == [r["fp8_gemms"] for r in want] and want[0]["fp8_gemms"] > 0


def test_compile_with_fp8_validates(tmp_path, dsk_cli):
    result = _validate(dsk_cli, tmp_path, "features.compile.enabled=true", "features.fp8.block_size=16")
    assert result.exit_code == 0, result.output + result.stderr


def test_compile_with_bf16_validates(tmp_path, dsk_cli):
    result = _validate(dsk_cli, tmp_path, "features.compile.enabled=true", "features.bf16.enabled=true")
    assert result.exit_code == 0, result.output + result.stderr

"""Expert parallelism inside ZeRO-1 data parallelism (DeepSeek-V3's layout) against one process on the global batch.

Each rank builds the tiny MLA + MoE + MTP model through the real build path with ``[parallel.expert] type =
"node_limited"`` and ``[parallel.data] type = "zero1"`` (the composite strategy), its router's 2 groups the EP
group's 2 nodes. It takes its rows of fixed global batches (rank 0's half padding: the loss weighting matters) and
runs the trainers' update: replicate's all-reduce of the dense gradients, the expert strategy's shard gradients and
global-norm clipping, ZeRO over the dense parameters and a local optimizer over the expert slices. The model runs in
float64 (Adam's m / sqrt(v) would blow float32 rounding up for gradients near zero), so losses and gradient norms
agree with one process to 1e-10 and weights and optimizer state to 1e-9. The checkpoint methods (ZeRO consolidated,
the expert slices gathered along dim 0) give the one-process state, names and JSON skeleton; loaded into a fresh
composed run, the next steps are the one process's. ``adamw_bf16`` keeps BF16 moments through the slices, ZeRO,
the gather and the load. The same with ``[parallel.data] type = "fsdp"``: FSDP reduce-scatters the dense
gradients, a plain AdamW steps its DTensor shards and another the slices, its checkpoint methods gather the dense
state on the writer and return the slices' on every rank. A data strategy whose state lives on the writer only
is refused naming the recipe keys (no spawn).

Spawns: 2 ranks (ep 2: one expert half per rank), and 4 ranks as DP 4 with ep = 2 (two replicas of each slice).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load, save

from tests.distributed.harness import GROUP, run_ranks
from tests.unit.plugins.dsk_parallel.test_data import (
    FIRST,
    MORE,
    _batches,
    _build,
    _close,
    _load,
    _rows_close,
    _states,
    _steps,
)
from tests.unit.train.helpers import tiny_table

pytestmark = pytest.mark.xdist_group(GROUP)


def _table(data: str | None, optimizer: str = "adamw", ep: int | None = None) -> dict:
    """The tiny model with a group-limited router (2 groups of 2 experts, one group per token: the node limit of
    2 nodes with max_nodes = 1); ``data`` None: one process."""
    table = tiny_table()
    table["model"]["tie_embeddings"] = True
    table["model"]["ffn"]["router"].update({"n_groups": 2, "topk_groups": 1})
    table["optimizer"].update({"type": optimizer, "grad_clip": 0.5})  # small enough to clip every step
    table["trainer"]["device"] = "cpu"
    if data is not None:
        expert = {"type": "node_limited", **({"ep": ep} if ep is not None else {})}
        table["parallel"] = {"expert": expert, "data": {"type": data}}
    return table


def _train_and_resume(rank: int, table: dict, tmp: str) -> dict:
    """FIRST steps, the checkpoint state, then a fresh composed run loading it (on every rank) for MORE steps."""
    from dsk.api import SHARDED_PARAM

    built = _build(table, f"{tmp}/a{rank}")
    opt = built.optimizer
    names = sorted(n for g in opt.param_groups for n in g["names"])
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    params = [p for g in opt.param_groups for p in g["params"]]
    # ZeRO (zero1) or a plain optimizer over FSDP's DTensor shards (fsdp) over the dense parameters, a local
    # optimizer over the slices
    dense = [p for g in opt.zero.param_groups for p in g["params"]]
    local = [p for g in opt.local.param_groups for p in g["params"]]
    fsdp = table["parallel"]["data"]["type"] == "fsdp"
    layout = {
        "names": names,
        "covers_all": n_params == len(names) == len({id(p) for p in params}),
        "dense_not_sliced": bool(dense)
        and not any(getattr(p, SHARDED_PARAM, False) for p in dense)
        and all(hasattr(p, "full_tensor") is fsdp for p in dense),
        "local_slices_only": bool(local) and all(getattr(p, SHARDED_PARAM, False) for p in local),
        "expert_rows": int(built.base_model.get_parameter("layers.1.mlp.experts.w_up").shape[0]),
    }
    batches = _batches(built.base_model.vocab_size, FIRST + MORE)
    first = _steps(built, batches[:FIRST], 1)
    model, tensors, meta = _states(built)
    inner = opt.state.values()  # by parameter: the dense optimizer's state, then the slices'
    local_dtypes = sorted({str(v.dtype) for s in inner for k, v in s.items() if k.startswith("exp")})
    saved = {"model": save(model), "tensors": save(tensors), "meta": meta}  # now: a load may take the tensors over
    shared = built.parallel.broadcast_object((model, tensors, meta))  # what every rank reads from the checkpoint
    fresh = _build(table, f"{tmp}/b{rank}")
    _load(fresh, *shared)
    more = _steps(fresh, batches[FIRST:], FIRST + 1)
    final = _states(fresh)[0]
    fresh.parallel.teardown()
    return {**saved, **layout, "first": first, "more": more, "final": save(final), "local_dtypes": local_dtypes}


def _cases(rank: int, world: int, cases: dict, tmp: str) -> dict:
    return {name: _train_and_resume(rank, table, f"{tmp}/{name}") for name, table in cases.items()}


def _one_process(table: dict, tmp) -> dict:
    from dsk.api.runtime import model_state_for_saving, optimizer_state_to_tensors

    built = _build(table, str(tmp))
    batches = _batches(built.base_model.vocab_size, FIRST + MORE)
    first = _steps(built, batches[:FIRST], 1)
    model = model_state_for_saving(built.base_model)
    tensors, meta = optimizer_state_to_tensors(built.optimizer)
    more = _steps(built, batches[FIRST:], FIRST + 1)
    names = sorted(n for g in built.optimizer.param_groups for n in g["names"])
    return {"first": first, "more": more, "model": model, "tensors": tensors, "meta": meta, "names": names,
            "final": model_state_for_saving(built.base_model)}  # fmt: skip


TWO = {"zero1": _table("zero1"), "zero1-adamw_bf16": _table("zero1", "adamw_bf16"), "fsdp": _table("fsdp")}
FOUR = {"zero1": _table("zero1", ep=2)}


def _spawn(world: int, cases: dict, tmp: str) -> dict:
    ranks = run_ranks(_cases, world, cases, tmp)
    out = {}
    for name in cases:
        out[name] = [r[name] for r in ranks]
        for r in out[name]:
            if isinstance(r, dict):
                r.update({k: load(r[k]) for k in ("model", "tensors", "final")})
    return out


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def two_ranks(tmp_path_factory) -> dict:
    return _spawn(2, TWO, str(tmp_path_factory.mktemp("compose2")))


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory) -> dict:
    return _spawn(4, FOUR, str(tmp_path_factory.mktemp("compose4")))


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> dict:
    """One process on the whole batch, adamw and adamw_bf16 (float64 model)."""
    torch.set_num_threads(1)
    tables = {"adamw": _table(None), "adamw_bf16": _table(None, "adamw_bf16")}
    return {k: _one_process(t, tmp_path_factory.mktemp(k)) for k, t in tables.items()}


def _check(ranks: list[dict], ref: dict, case: str, expert_rows: int) -> None:
    for r in ranks:  # every rank reports the losses and the gradient norm of all targets of the step
        _rows_close(r["first"], ref["first"], f"{case} first steps")
        _rows_close(r["more"], ref["more"], f"{case} steps after loading the checkpoint state")
        # the trainer's optimizer: one-process groups over every parameter; ZeRO / FSDP never holds an expert slice
        assert r["names"] == ref["names"] and r["covers_all"], case
        assert r["dense_not_sliced"] and r["local_slices_only"] and r["expert_rows"] == expert_rows, case
    writer = ranks[0]
    _close(writer["model"], ref["model"], f"{case} model state")
    _close(writer["tensors"], ref["tensors"], f"{case} optimizer state tensors")
    assert writer["meta"] == ref["meta"]  # class, groups with names and hyper-parameters, non-tensor state
    _close(writer["final"], ref["final"], f"{case} weights after the resumed steps")


@pytest.mark.parametrize("case", ["zero1", "zero1-adamw_bf16", "fsdp"])  # fsdp: a plain AdamW over its DTensors
def test_node_limited_inside_data_parallelism_trains_and_checkpoints_as_one_process(two_ranks, reference, case):
    optimizer = case.partition("-")[2] or "adamw"
    _check(two_ranks[case], reference[optimizer], case, expert_rows=2)  # 4 experts over ep = 2
    if optimizer == "adamw_bf16":  # the BF16 moments survive the slices, ZeRO's shards, the gather and the load
        assert {str(v.dtype) for k, v in two_ranks[case][0]["tensors"].items() if "/exp_avg" in k} == {"torch.bfloat16"}
        assert all(r["local_dtypes"] == ["torch.bfloat16"] for r in two_ranks[case])


def test_four_ranks_dp4_with_ep2_train_and_checkpoint_as_one_process(four_ranks, reference):
    _check(four_ranks["zero1"], reference["adamw"], "dp4-ep2", expert_rows=2)  # each slice on 2 ranks


def test_a_data_strategy_that_saves_on_the_writer_only_is_refused_naming_the_recipe_keys():
    """FSDP whose checkpoint methods returned nothing off the writer (no ``composes_checkpoints``): the expert
    strategy's gather, a collective, would find no slices on the other ranks; the composite refuses it."""
    from dsk_parallel.data import FSDP
    from dsk_parallel.expert import NodeLimitedExperts

    from dsk.api.runtime import RunSetupError
    from dsk.train.build import _Composite

    class WriterOnly(FSDP):
        composes_checkpoints = False

    expert, data = NodeLimitedExperts(), WriterOnly()
    expert.name, data.name = "expert", "data"
    with pytest.raises(RunSetupError) as exc:
        _Composite([data, expert])
    message = str(exc.value)
    assert "parallel.expert and parallel.data" in message and "composes_checkpoints" in message, message

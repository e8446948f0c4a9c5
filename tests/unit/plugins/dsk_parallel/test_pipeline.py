"""Pipeline parallelism (1f1b, dualpipev, dualpipe) on 1, 2 and 4 gloo ranks against one process on the same batch.

Each rank builds the tiny MLA + MoE (noaux_tc, sequence-wise balance loss) + MTP model of 8 layers through the real
build path with ``[parallel.pipeline]`` and runs the LM trainer's step (:mod:`pipeline_helpers`): the chunks go
through the schedule, the update syncs the shared parts' gradients, clips to the whole model's norm, steps the
optimizer and moves the router biases from the loads of every stage. One process on the whole global batch
(``parallel`` absent) is the reference. The model runs in float64, so that what is compared is the schedule and the
reductions, not float32 rounding:

- every schedule at every PP it runs (dualpipev also at PP 1), the fewest chunks and more: the step's float64 loss
  within 1e-12, the gradient norm within 1e-10, and the first step's gradients (after ``sync_gradients``) by
  DualPipe's criterion 1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-13 on every rank that holds the parameter (both copies
  under dualpipe, the shared embedding under 1f1b), with tied embeddings too;
- PP 2 x DP 2 with expert parallelism (ep 2) inside ZeRO-1, and with the expert table alone owning the dense data
  parallelism: the one process given the same global batch;
- the copies of a part several ranks hold stay bit-identical;
- the checkpoint state (model, optimizer tensors, skeleton) on the writer is the one process's, and it resumes on
  the same ranks and in one process as the one process continues;
- ``evaluation_model()`` is a whole model on the writer; the step metrics have every stage's MoE layers;
- the shapes a pipeline cannot run are refused when the run is built, naming the recipe key.

Spawns: one per world size (1, 2, 4), every case of that size in it; the reference runs first in the test process
(so the C++ kernels are built before ranks wait on each other in a schedule).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from tests.distributed.harness import GROUP, run_ranks
from tests.unit.plugins.dsk_parallel.pipeline_helpers import (
    FIRST,
    ROWS,
    STEPS,
    cal_diff,
    pipeline_table,
    rank_cases,
    resume_one_process,
    run_case,
)

pytestmark = pytest.mark.xdist_group(GROUP)

#: the pipelined cases: name -> (world, table, what else the case records); the name reads schedule-pp-chunks.
#: More chunks than the fewest at PP 1 and 2 (and DualPipe's at PP 4): four ranks share the 2 cores, a case costs more
EXACT = {
    "dualpipev-1-2": (1, pipeline_table("dualpipev"), {"resume": True, "eval": True}),
    "dualpipev-1-3": (1, pipeline_table("dualpipev", chunks=3), {}),
    "1f1b-2-2": (2, pipeline_table("1f1b"), {"resume": True, "eval": True, "copies": True}),
    "1f1b-2-3": (2, pipeline_table("1f1b", chunks=3), {}),
    "1f1b-2-2-tied": (2, pipeline_table("1f1b", tie=True), {"copies": True}),
    "dualpipev-2-4": (2, pipeline_table("dualpipev"), {"resume": True}),
    "dualpipev-2-6": (2, pipeline_table("dualpipev", chunks=6), {}),
    "dualpipe-2-4": (2, pipeline_table("dualpipe"), {"resume": True, "eval": True, "copies": True}),
    "dualpipe-2-6": (2, pipeline_table("dualpipe", chunks=6), {}),
    "dualpipe-2-4-tied": (2, pipeline_table("dualpipe", tie=True), {"copies": True}),
    "1f1b-4-4": (4, pipeline_table("1f1b"), {}),
    "dualpipev-4-8": (4, pipeline_table("dualpipev"), {"resume": True}),
    "dualpipe-4-8": (4, pipeline_table("dualpipe"), {}),
    "dualpipe-4-12": (4, pipeline_table("dualpipe", chunks=12), {}),  # our own schedule: more chunks at PP 4 too
}
#: PP 2 x DP 2 (each data rank takes half of the global batch's rows)
COMPOSED = {
    "dualpipe-pp2-dp2-ep2-zero1": (
        4, pipeline_table("dualpipe", pp=2, batch=ROWS // 2, data="zero1", expert=True), {"resume": True}
    ),
    "1f1b-pp2-dp2-ep2": (4, pipeline_table("1f1b", pp=2, batch=ROWS // 2, expert=True), {"resume": True}),
}  # fmt: skip
#: builds that must be refused: name -> (world, table, the recipe key the message names)
REFUSED = {
    "world-not-pp-x-dp": (4, pipeline_table("1f1b", pp=3), "parallel.pipeline.pp = 3"),
    "dp-without-data-table": (4, pipeline_table("1f1b", pp=2), "[parallel.data]"),
    "chunks-below-minimum": (4, pipeline_table("dualpipev", chunks=7), "parallel.pipeline.chunks = 7"),
    "batch-not-a-multiple-of-chunks": (4, pipeline_table("1f1b", batch=6), "trainer.batch_size = 6"),
    "dualpipe-odd-pp": (1, pipeline_table("dualpipe"), "parallel.pipeline.pp = 1"),
}
CASES = {**EXACT, **COMPOSED}


def _specs(world: int) -> dict:
    specs = {name: {"table": table, **extra} for name, (w, table, extra) in CASES.items() if w == world}
    specs.update({name: {"refused": table} for name, (w, table, _) in REFUSED.items() if w == world})
    return specs


def _loaded(result):
    if isinstance(result, dict):
        for key in ("grads", "model", "tensors", "local", "logits"):
            if result.get(key) is not None:
                result[key] = load(result[key])
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process on the whole global batch (tie_embeddings false and true): STEPS steps uninterrupted, the first
    step's gradients, the checkpoint state and the evaluation logits after FIRST steps."""
    torch.set_num_threads(1)
    out = {}
    for tie in (False, True):
        spec = {"table": pipeline_table(tie=tie), "eval": True, "then": STEPS - FIRST}
        out[tie] = _loaded(run_case(0, spec, str(tmp_path_factory.mktemp(f"one-{tie}"))))
    return out


@pytest.fixture(scope="module")
def ranks(reference, tmp_path_factory) -> dict:
    """Every case's results, ``[rank 0's, rank 1's, ...]``: one spawn per world size."""
    out = {}
    for world in (1, 2, 4):
        results = run_ranks(rank_cases, world, _specs(world), str(tmp_path_factory.mktemp(f"pp{world}")), timeout=600)
        for name in _specs(world):
            out[name] = [_loaded(r[name]) for r in results]
    return out


def _ref(case: str, reference: dict) -> dict:
    return reference[case.endswith("-tied")]


def _rows_match(rows: list[dict], ref_rows: list[dict], what: str, loss_rel: float = 1e-12) -> None:
    """Per step: the float64 loss, the gradient norm, the trainer's float32 report and its auxiliary part."""
    assert len(rows) == len(ref_rows), what
    for step, (r, e) in enumerate(zip(rows, ref_rows, strict=True), 1):
        assert r["loss64"] == pytest.approx(e["loss64"], rel=loss_rel, abs=0), (what, step)
        assert r["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-10, abs=0), (what, step)
        assert r["loss"] == pytest.approx(e["loss"], rel=1e-6), (what, step)
        assert r["aux_loss"] == pytest.approx(e["aux_loss"], rel=1e-6) and e["aux_loss"] > 0, (what, step)


@pytest.mark.parametrize("case", list(EXACT))
def test_losses_and_gradients_equal_one_process(ranks, reference, case):
    """Every rank reports the one process's losses and gradient norm at each step (an optimizer step, clipping and
    router bias updates between them); every parameter's first-step gradient, on every rank holding it, meets
    DualPipe's criterion against the one process's."""
    ref = _ref(case, reference)
    for r in ranks[case]:
        _rows_match(r["rows"], ref["rows"][: len(r["rows"])], case)
    held: dict[str, int] = {}
    for rank, r in enumerate(ranks[case]):
        for name, grad in r["grads"].items():
            assert name in ref["grads"], (case, rank, name)
            diff = cal_diff(grad, ref["grads"][name])
            assert diff < 1e-13, (case, rank, name, diff)
            held[name] = held.get(name, 0) + 1
    assert set(held) == set(ref["grads"]), case  # every parameter's gradient exists on some rank
    if case.startswith("dualpipe-"):  # every stage on two ranks: both copies hold the whole gradient
        assert all(n == 2 for n in held.values()), case
    elif case.startswith("1f1b-"):  # the embedding on the first and the last stage's rank (MTP, tied head)
        assert held["embed_tokens.weight"] == 2 and max(held.values()) == 2, case


@pytest.mark.parametrize("case", list(COMPOSED))
def test_pp2_dp2_with_expert_parallelism_equals_one_process(ranks, reference, case):
    """PP 2 x DP 2, the expert slices over ep 2 inside each stage's DP ranks (ZeRO-1 over the dense parameters, or
    the expert table's own dense all-reduce): the one process's losses and gradient norms."""
    for r in ranks[case]:
        _rows_match(r["rows"], reference[False]["rows"][: len(r["rows"])], case, loss_rel=1e-10)


@pytest.mark.parametrize("case", ["1f1b-2-2", "1f1b-2-2-tied"])
def test_1f1b_embedding_copies_stay_identical(ranks, case):
    """The embedding the MTP heads (and the tied head) read lives on the first and the last rank: after FIRST + 1
    steps both copies are the same tensor, bit for bit."""
    first, last = (r["local"] for r in ranks[case])
    assert torch.equal(first["embed_tokens.weight"], last["embed_tokens.weight"])
    assert not set(first) - {"embed_tokens.weight"} & set(last)  # nothing else is shared


@pytest.mark.parametrize("case", ["dualpipe-2-4", "dualpipe-2-4-tied"])
def test_dualpipe_copies_stay_identical(ranks, case):
    """Under DualPipe both ranks hold every stage: every parameter and buffer (router biases included) is the same
    on both after FIRST + 1 steps."""
    a, b = (r["local"] for r in ranks[case])
    assert sorted(a) == sorted(b)
    assert any("bias" in k and "gate" in k for k in a), sorted(a)[:20]
    for k in a:
        assert torch.equal(a[k], b[k]), (case, k)


def _close(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12, msg=lambda m, k=k: f"{what} {k}: {m}")


RESUMED = [name for name, (_, _, extra) in CASES.items() if extra.get("resume")]


@pytest.mark.parametrize("case", RESUMED)
def test_checkpoint_state_is_one_process_and_resumes(ranks, reference, case):
    """After FIRST steps the writer's model and optimizer state is the one process's (names, shapes, values, the
    optimizer skeleton), the other ranks return none; loaded on every rank of a fresh pipelined run, the next steps
    are the one process's."""
    ref = _ref(case, reference)
    writer, *others = ranks[case]
    _close(writer["model"], ref["model"], f"{case} model state")
    _close(writer["tensors"], ref["tensors"], f"{case} optimizer state")
    names = [g["names"] for g in writer["meta"]["param_groups"]]
    assert names == [g["names"] for g in ref["meta"]["param_groups"]], case
    assert writer["meta"] == ref["meta"], case
    for r in others:
        assert r["model"] == {} and r["tensors"] == {} and r["meta"] == {}, case
    for r in ranks[case]:
        _rows_match(r["more"], ref["rows"][FIRST:], f"{case} after loading the state")


@pytest.mark.parametrize("case", ["dualpipe-2-4", "dualpipe-pp2-dp2-ep2-zero1", "dualpipev-4-8"])
def test_a_pipelined_checkpoint_resumes_in_one_process(ranks, reference, case, tmp_path):
    """The writer's state loaded into a one-process run (any rank count resumes): the one process's next steps."""
    ref = _ref(case, reference)
    writer = ranks[case][0]
    more = resume_one_process(pipeline_table(), (writer["model"], writer["tensors"], writer["meta"]), str(tmp_path))
    _rows_match(more, ref["rows"][FIRST:], f"{case} resumed in one process")


@pytest.mark.parametrize("case", [n for n, (_, _, extra) in CASES.items() if extra.get("eval")])
def test_evaluation_model_is_the_whole_model_on_the_writer(ranks, reference, case):
    """``evaluation_model()`` after FIRST steps: on the writer a one-process model whose logits are the one process's
    model's (the copy is built from ``[model]`` in its float32 dtype, so to float32 rounding); None elsewhere."""
    ref = _ref(case, reference)["logits"]["logits"]
    writer, *others = ranks[case]
    logits = writer["logits"]["logits"]
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits.double(), ref.double(), rtol=1e-5, atol=1e-5)
    assert all(r["logits"] is None for r in others)


@pytest.mark.parametrize(
    "case", ["1f1b-2-2", "dualpipev-2-4", "dualpipe-2-4", "dualpipe-4-8", "dualpipe-pp2-dp2-ep2-zero1"]
)
def test_step_metrics_hold_every_stages_moe_layers(ranks, reference, case):
    """The writer's step metrics (``moe_metrics``) report the MaxVio of every MoE layer of every stage and of the MTP
    head, and the aggregates, as the one process does."""
    ref_rows = _ref(case, reference)["rows"]
    expected = {f"moe/layer{i}/maxvio" for i in range(1, 8)} | {"moe/mtp0/maxvio", "moe/maxvio", "moe/maxvio_max"}
    for step, (row, ref_row) in enumerate(zip(ranks[case][0]["rows"], ref_rows, strict=False), 1):
        metrics, ref_metrics = row["metrics"], ref_row["metrics"]
        assert expected <= set(ref_metrics), sorted(ref_metrics)
        assert set(metrics) == set(ref_metrics), (case, step)
        for key, value in ref_metrics.items():
            assert metrics[key] == pytest.approx(value, rel=1e-10, abs=1e-12), (case, step, key)


@pytest.mark.parametrize("case", list(REFUSED))
def test_impossible_shapes_are_refused_naming_the_key(ranks, case):
    """A world that is not pp x DP, data-parallel ranks with no data table, too few chunks, a batch that does not
    cut into the chunks, DualPipe at an odd pp: a RunSetupError on every rank, naming the recipe key."""
    key = REFUSED[case][2]
    for message in ranks[case]:
        assert message and key in message, (case, message)


def test_dualpipe_at_an_odd_pp_is_a_recipe_error_naming_the_key():
    """``pp = 3`` written in the recipe: the recipe check (no ranks needed) refuses it at ``parallel.pipeline.pp``;
    at a default pp the build refuses it (``dualpipe-odd-pp`` above)."""
    from dsk.recipe import Recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager()
    problems = validate_recipe(Recipe(data=pipeline_table("dualpipe", pp=3)), build_registry(pm), pm).problems
    assert [p.path for p in problems] == ["parallel.pipeline.pp"], problems
    assert "even number" in problems[0].message


class _Renamed:
    """A plugin that registers dsk's DualPipe again as ``bidir`` and a pipeline class of its own as ``mypipe``."""

    from dsk import hookimpl

    @staticmethod
    @hookimpl
    def register_parallel_strategies(register):
        from dsk_parallel.pipeline_config import PipelineConfig

        register("parallel", "bidir", "dsk_parallel.pipeline:DualPipe", config=PipelineConfig, summary="DualPipe")
        register("parallel", "mypipe", "elsewhere.pipe:MyPipe", config=PipelineConfig, summary="its own schedule")


def test_a_pipeline_under_another_name_is_checked_as_its_schedule():
    """Validation reads the schedule from the implementation, not the registered name: dsk's DualPipe registered
    as ``bidir`` is refused at an odd pp as DualPipe is; a pipeline class dsk does not know is left to check its
    own shapes when it is built (no KeyError in validation)."""
    from dsk.recipe import Recipe, validate_recipe
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager(_Renamed)
    registry = build_registry(pm)
    table = pipeline_table("dualpipe", pp=3)
    table["parallel"]["pipeline"]["type"] = "bidir"
    problems = validate_recipe(Recipe(data=table), registry, pm).problems
    assert [p.path for p in problems] == ["parallel.pipeline.pp"], problems
    assert "even number" in problems[0].message
    table["parallel"]["pipeline"]["type"] = "mypipe"
    assert validate_recipe(Recipe(data=table), registry, pm).problems == []

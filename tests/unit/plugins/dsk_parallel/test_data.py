"""Data parallelism (replicate, fsdp, zero1) on 2 gloo ranks against one process given the whole batch.

Each rank builds the tiny MLA + MoE + MTP model through the real build path with ``[parallel.data] type = ...``,
takes its half of a fixed global batch (its rows carry a different number of targets than the other rank's, so
the loss weighting by global target counts matters), and runs the trainers' update (clipping to the global norm
included). One process on the whole batch is the reference. The model runs in float64 there, so that what is
compared is the reduction and not float32 rounding (which Adam's m / sqrt(v) blows up to ~1e-6 within 3 steps for
gradients near zero): losses and gradient norms agree to 1e-10, weights and optimizer state to 1e-9; the checkpoint
methods give the one-process layout, names and JSON skeleton; loading them into a fresh 2-rank run continues as
the one process does. FSDP with the bf16 feature, and the real LM trainer through ``run_recipe``, run in float32.
One spawn of 2 ranks runs every case (starting ranks costs more than a case).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load, save

from tests.distributed.harness import GROUP, run_ranks
from tests.unit.train.helpers import tiny_table

pytestmark = pytest.mark.xdist_group(GROUP)

#: global batch rows (each of the 2 ranks takes 2), sequence length, steps before and after the checkpoint
ROWS, SEQ, FIRST, MORE = 4, 24, 3, 2


def _table(kind: str | None, optimizer: str = "adamw", bf16: bool = False) -> dict:
    table = tiny_table()
    table["model"]["tie_embeddings"] = True  # the tied head: one parameter under two names
    table["optimizer"].update({"type": optimizer, "grad_clip": 0.5})  # small enough to clip every step
    table["trainer"]["device"] = "cpu"
    if kind is not None:
        table["parallel"] = {"data": {"type": kind}}
    if bf16:
        table["features"] = {"bf16": {}}
    return table


def _batches(vocab: int, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed global batches; rank 0's rows are half padding, rank 1's full (different target counts)."""
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (ROWS, SEQ), generator=g)
        labels = ids.clone()
        labels[: ROWS // 2, SEQ // 2 :] = -100
        labels[:, 0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _mark_experts_sharded(model) -> None:
    """What an expert-parallel strategy does to its slices: the routed experts' parameters get SHARDED_PARAM."""
    from dsk.api import SHARDED_PARAM

    for name, p in model.named_parameters():
        if ".experts." in name:
            setattr(p, SHARDED_PARAM, True)


def _build(table: dict, tmp: str, bf16: bool = False, sharded: bool = False):
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager
    from dsk.train.build import build_run
    from tests.unit.train.helpers import make_context

    pm = isolated_plugin_manager()
    ctx = make_context(tmp, copy.deepcopy(table), build_registry(pm), pm)

    # float64: the comparison with one process is then about the reduction, not about float32 rounding that
    # Adam's m / sqrt(v) blows up for gradients near zero after the first step
    def prepare(model) -> None:
        if not bf16:
            model.double()
        if sharded:
            _mark_experts_sharded(model)

    return build_run(ctx, prepare=prepare)


def _steps(built, batches, first_step: int) -> list[tuple[float, float]]:
    """The LM trainer's step on each global batch: local rows, the token losses weighted by global target counts,
    the shared update (clipping included)."""
    from dsk.api.runtime import training_loss

    rows = []
    for i, batch in enumerate(batches):
        step = first_step + i
        built.set_lr(step, 10)
        local = built.local_rows(batch)
        (weight,) = built.loss_weights([int((local["labels"][:, 1:] != -100).sum())])
        built.model.train()
        built.optimizer.zero_grad(set_to_none=True)
        out = training_loss(built.model, local["input_ids"], local["labels"], side=built.side)
        # the token losses take this rank's share of the step's targets, the balance loss (a mean over the rank's
        # sequences) an equal share: every rank holds as many rows
        loss = (out.lm_loss + out.mtp_loss) * weight + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
        loss = built.mean_over_ranks({"loss": loss.detach().double()})["loss"]
        update = built.update(loss, step)
        assert update.finite
        rows.append((float(loss), float(update.grad_norm)))
    return rows


def _states(built) -> tuple[dict, dict, dict]:
    """The model and optimizer (tensors, meta) state a checkpoint saves: the strategy's where it gathers them
    (empty off the writer), else the one-process functions'."""
    from dsk.api.runtime import model_state_for_saving, optimizer_state_to_tensors

    model = built.parallel.model_state_dict(built.base_model)
    model = model if model is not None else model_state_for_saving(built.base_model)
    optimizer = built.parallel.optimizer_state_dict(built.optimizer, built.base_model)
    tensors, meta = optimizer if optimizer is not None else optimizer_state_to_tensors(built.optimizer)
    return model, tensors, meta


def _load(built, model: dict, tensors: dict, meta: dict) -> None:
    """What ``--resume`` does: the strategy's loaders, else the one-process ones."""
    from dsk.api.runtime import load_model_weights, load_optimizer_state

    if not built.parallel.load_model_state_dict(built.base_model, model, "test"):
        load_model_weights(built.base_model, model, "test")
    if not built.parallel.load_optimizer_state_dict(built.optimizer, built.base_model, tensors, meta, "test"):
        load_optimizer_state(built.optimizer, tensors, meta, "test")


def _train_and_resume(rank: int, table: dict, tmp: str) -> dict:
    """FIRST steps, the checkpoint state, then a fresh run loading it (on every rank) for MORE steps."""
    bf16 = "features" in table
    built = _build(table, f"{tmp}/a{rank}", bf16)
    batches = _batches(built.base_model.vocab_size, FIRST + MORE)
    first = _steps(built, batches[:FIRST], 1)
    model, tensors, meta = _states(built)
    inner = built.optimizer.optim if hasattr(built.optimizer, "optim") else built.optimizer
    local_dtypes = sorted({str(v.dtype) for s in inner.state.values() for k, v in s.items() if k.startswith("exp")})
    saved = {"model": save(model), "tensors": save(tensors), "meta": meta}  # now: a load may take the tensors over
    shared = built.parallel.broadcast_object((model, tensors, meta))  # what every rank reads from the checkpoint
    fresh = _build(table, f"{tmp}/b{rank}", bf16)
    _load(fresh, *shared)
    more = _steps(fresh, batches[FIRST:], FIRST + 1)
    final = _states(fresh)[0]
    for b in (built, fresh):
        b.parallel.teardown()
    # tensors go back as safetensors bytes: torch.multiprocessing would pass them as shared-memory handles that
    # vanish with the rank's process
    return {**saved, "first": first, "more": more, "final": save(final), "local_dtypes": local_dtypes}


def _sharded_grads(rank: int, table: dict, tmp: str) -> bytes:
    """One backward with the routed experts marked SHARDED_PARAM: the gradients of an expert and a dense weight."""
    from torch.distributed.tensor import DTensor

    from dsk.api.runtime import training_loss

    built = _build(table, f"{tmp}/s{rank}", sharded=True)
    local = built.local_rows(_batches(built.base_model.vocab_size, 1)[0])
    (weight,) = built.loss_weights([int((local["labels"][:, 1:] != -100).sum())])
    out = training_loss(built.model, local["input_ids"], local["labels"], side=built.side)
    (out.loss * weight).backward()
    built.parallel.sync_gradients(built.model)
    params = dict(built.base_model.named_parameters())
    expert, dense = params["layers.1.mlp.experts.w_up"], params["layers.1.mlp.shared_experts.up_proj.weight"]
    assert not isinstance(expert, DTensor)  # left out of the wrap: a plain tensor, whole on every rank
    dense_grad = dense.grad.full_tensor() if isinstance(dense.grad, DTensor) else dense.grad
    built.parallel.teardown()
    return save({"expert": expert.grad.contiguous(), "dense": dense_grad.contiguous()})


def _refused(rank: int, table: dict, tmp: str, sharded: bool = False) -> str:
    """The RunSetupError message of a build that must be refused ("" when it was built)."""
    from dsk.api.runtime import RunSetupError

    try:
        _build(table, f"{tmp}/x{rank}", sharded=sharded).parallel.teardown()
    except RunSetupError as exc:
        return str(exc)
    return ""


def _cases(rank: int, world: int, cases: dict, tmp: str) -> dict:
    """Every case of the module on the same 2 ranks (one spawn: starting ranks costs more than a case)."""
    run = {
        "train": _train_and_resume,
        "refused": _refused,
        "refused-sharded": lambda *a: _refused(*a, sharded=True),
        "sharded": _sharded_grads,
    }
    return {name: run[fn](rank, table, f"{tmp}/{name}") for name, (fn, table) in cases.items()}


def _one_process(table: dict, tmp, bf16: bool = False) -> dict:
    from dsk.api.runtime import model_state_for_saving, optimizer_state_to_tensors

    built = _build(table, str(tmp), bf16)
    batches = _batches(built.base_model.vocab_size, FIRST + MORE)
    first = _steps(built, batches[:FIRST], 1)
    model = model_state_for_saving(built.base_model)
    tensors, meta = optimizer_state_to_tensors(built.optimizer)
    more = _steps(built, batches[FIRST:], FIRST + 1)
    return {"first": first, "more": more, "model": model, "tensors": tensors, "meta": meta,
            "final": model_state_for_saving(built.base_model)}  # fmt: skip


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        torch.testing.assert_close(a[k], b[k], rtol=1e-9, atol=1e-12, msg=lambda m, k=k: f"{what} {k}: {m}")


def _rows_close(a: list, b: list, what: str) -> None:
    for (la, na), (lb, nb) in zip(a, b, strict=True):
        assert la == pytest.approx(lb, rel=1e-10, abs=0), what
        assert na == pytest.approx(nb, rel=1e-9, abs=0), what


CASES = {
    "replicate": ("train", _table("replicate")),
    "fsdp": ("train", _table("fsdp")),
    "zero1": ("train", _table("zero1")),
    "zero1-adamw_bf16": ("train", _table("zero1", "adamw_bf16")),
    "fsdp-adamw_bf16": ("train", _table("fsdp", "adamw_bf16")),
    "fsdp-bf16": ("train", _table("fsdp", bf16=True)),
    "zero1-offload": ("refused", {**_table("zero1"), "features": {"cpu": {"type": "offload"}}}),
    "fsdp-offload": ("refused", {**_table("fsdp"), "features": {"cpu": {"type": "offload"}}}),
    "replicate-sharded": ("sharded", _table("replicate")),
    "fsdp-sharded": ("sharded", _table("fsdp")),
    "zero1-sharded": ("refused-sharded", _table("zero1")),
}


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def two_ranks(tmp_path_factory) -> dict:
    """Each case's results on 2 gloo ranks: ``[rank 0's, rank 1's]``."""
    ranks = run_ranks(_cases, 2, CASES, str(tmp_path_factory.mktemp("ranks")))
    out = {}
    for name in CASES:
        out[name] = [r[name] for r in ranks]
        for r in out[name]:
            if isinstance(r, dict):
                r.update({k: load(r[k]) for k in ("model", "tensors", "final")})
        if isinstance(out[name][0], bytes):
            out[name] = [load(r) for r in out[name]]
    return out


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def reference(tmp_path_factory) -> dict:
    """One process on the whole batch: adamw and adamw_bf16 (float64 model), and adamw with bf16 autocast."""
    torch.set_num_threads(1)
    tables = {"adamw": _table(None), "adamw_bf16": _table(None, "adamw_bf16"), "bf16": _table(None, bf16=True)}
    return {k: _one_process(t, tmp_path_factory.mktemp(k), bf16=k == "bf16") for k, t in tables.items()}


@pytest.mark.parametrize("case", ["replicate", "fsdp", "zero1", "zero1-adamw_bf16", "fsdp-adamw_bf16"])
def test_two_ranks_train_and_checkpoint_as_one_process(two_ranks, reference, case):
    kind, _, optimizer = case.partition("-")
    ref, ranks = reference[optimizer or "adamw"], two_ranks[case]
    for r in ranks:  # every rank reports the losses and the gradient norm of all targets of the step
        _rows_close(r["first"], ref["first"], f"{case} first steps")
        _rows_close(r["more"], ref["more"], f"{case} steps after loading the checkpoint state")
    writer, other = ranks
    if kind != "replicate":  # a strategy that gathers the optimizer state returns it on the writer only
        assert other["tensors"] == {} and other["meta"] == {}
    if kind == "fsdp":
        assert other["model"] == {}
    _close(writer["model"], ref["model"], f"{case} model state")
    _close(writer["tensors"], ref["tensors"], f"{case} optimizer state tensors")
    assert writer["meta"] == ref["meta"]  # class, groups with names and hyper-parameters, non-tensor state
    _close(writer["final"], ref["final"], f"{case} weights after the resumed steps")
    if optimizer == "adamw_bf16":  # the BF16 moments survive the shards, the gather and the load
        assert {str(v.dtype) for k, v in writer["tensors"].items() if "/exp_avg" in k} == {"torch.bfloat16"}
        assert all(r["local_dtypes"] in (["torch.bfloat16"], []) for r in ranks)
        assert any(r["local_dtypes"] for r in ranks)


def test_fsdp_with_bf16_computes_as_one_process_bf16(two_ranks, reference):
    """FSDP gathers FP32 parameters and leaves the casts to the bf16 feature's autocast: the first forward is the
    one-process bf16 forward (a BF16 gather would also round the residual stream, norms and router to BF16, and
    moves this loss by ~1e-5); later steps differ by BF16 rounding of the half-batch weight gradients only."""
    ref = reference["bf16"]
    for r in two_ranks["fsdp-bf16"]:
        assert r["first"][0][0] == pytest.approx(ref["first"][0][0], rel=1e-6)
        for (loss, norm), (ref_loss, ref_norm) in zip(r["first"] + r["more"], ref["first"] + ref["more"], strict=True):
            assert loss == pytest.approx(ref_loss, rel=2e-4) and norm == pytest.approx(ref_norm, rel=1e-2)
    assert all(t.dtype == torch.float32 for t in two_ranks["fsdp-bf16"][0]["model"].values())


@pytest.mark.parametrize("kind", ["zero1", "fsdp"])
def test_an_optimizer_wrapping_feature_is_refused_with_the_recipe_keys(two_ranks, kind):
    """CPU offload would step host copies of the parameters that ZeRO-1 / FSDP do not own: a recipe error."""
    for message in two_ranks[f"{kind}-offload"]:
        assert f'parallel.data (type = "{kind}")' in message and 'features.cpu (type = "offload")' in message


# -- the real trainer: dsk.train.runner.run_recipe on 2 ranks against one process with the doubled batch -----------
TRAINER_STEPS, PER_RANK = 4, 4


def _trainer_table(kind: str | None, batch: int) -> dict:
    table = tiny_table()
    table["trainer"].update({"steps": TRAINER_STEPS, "batch_size": batch, "device": "cpu", "eval_samples": 2})
    table["checkpoint"] = {"every": TRAINER_STEPS, "keep": 1}  # the last step saves through the strategy
    if kind is not None:
        table["parallel"] = {"data": {"type": kind}}
    return table


def _run_recipe(table: dict, run_dir: str) -> list[float]:
    import json
    from pathlib import Path

    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager
    from dsk.train.progress import Reporter
    from dsk.train.runner import run_recipe
    from tests.unit.train.helpers import _NullConsole, validated

    pm = isolated_plugin_manager()
    registry = build_registry(pm)
    run_recipe(
        validated(table, registry), registry=registry, pm=pm, run_dir=Path(run_dir),
        reporter=Reporter(_NullConsole(), enabled=False),
    )  # fmt: skip
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


def _trainer_cases(rank: int, world: int, kinds: list[str], tmp: str) -> dict[str, list[float]]:
    return {kind: _run_recipe(_trainer_table(kind, PER_RANK), f"{tmp}/{kind}") for kind in kinds}


def test_the_lm_trainer_on_two_ranks_gives_the_losses_of_one_process_with_the_doubled_batch(tmp_path):
    """``run_recipe`` with ``[parallel.data]`` on 2 ranks: metrics.jsonl (rank 0's) has the one-process losses, and
    the checkpoint written through the strategy is the one-process file set (names, shapes, dtypes, optimizer
    skeleton), its values those of the one-process run to float32 training noise."""
    from dsk.api.runtime import latest_checkpoint, load_checkpoint

    torch.set_num_threads(1)
    ref = _run_recipe(_trainer_table(None, 2 * PER_RANK), str(tmp_path / "one"))
    kinds = ["replicate", "fsdp", "zero1"]
    writer, other = run_ranks(_trainer_cases, 2, kinds, str(tmp_path / "two"))
    assert len(ref) == TRAINER_STEPS
    one = load_checkpoint(latest_checkpoint(tmp_path / "one"))
    for kind in kinds:
        assert other[kind] == writer[kind]  # one metrics.jsonl, written by rank 0
        assert writer[kind] == pytest.approx(ref, rel=1e-5), kind
        two = load_checkpoint(latest_checkpoint(tmp_path / "two" / kind))
        assert two.step == one.step == TRAINER_STEPS
        assert two.optimizer_meta == one.optimizer_meta, kind
        for saved, expected in ((two.model_state, one.model_state), (two.optimizer_tensors, one.optimizer_tensors)):
            assert {k: (v.dtype, v.shape) for k, v in saved.items()} == {
                k: (v.dtype, v.shape) for k, v in expected.items()
            }, kind
        for k, v in two.model_state.items():
            torch.testing.assert_close(
                v, one.model_state[k], rtol=0, atol=1e-4, msg=lambda m, k=k, kind=kind: f"{kind} {k}: {m}"
            )


@pytest.mark.parametrize("kind", ["replicate", "fsdp"])
def test_parameters_another_strategy_sharded_are_neither_wrapped_nor_reduced(two_ranks, kind):
    """Expert slices (SHARDED_PARAM) keep each rank's own gradient; every other gradient is the ranks' mean."""
    rank0, rank1 = two_ranks[f"{kind}-sharded"]
    torch.testing.assert_close(rank0["dense"], rank1["dense"], rtol=1e-12, atol=0)
    assert not torch.allclose(rank0["expert"], rank1["expert"])


def test_zero1_refuses_parameters_another_strategy_sharded(two_ranks):
    for message in two_ranks["zero1-sharded"]:
        assert 'parallel.data (type = "zero1")' in message and "expert slices" in message


@pytest.mark.parametrize("kind", ["replicate", "fsdp", "zero1"])
def test_one_process_with_a_data_strategy_trains_as_without_one(tmp_path, kind):
    """A recipe with ``[parallel.data]`` runs unchanged without ``--nproc``: one rank is the one-process layout."""
    import json

    from dsk.testing import run_dsk
    from tests.unit.train.helpers import TINY_RECIPE

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE + "\n[logging]\nprogress = false\n", encoding="utf-8")
    losses = {}
    for name, extra in (("plain", []), (kind, ["--set", f'parallel.data.type="{kind}"'])):
        run = tmp_path / name
        result = run_dsk(["train", str(recipe), "--set", "trainer.steps=3", *extra, "--run-dir", str(run), "--json"])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if r.get("kind") == "train"]
    assert losses[kind] == losses["plain"] and len(losses["plain"]) == 3

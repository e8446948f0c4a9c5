"""What the pipeline tests run on every rank and in the one process: the recipe table, the global batches, the LM
trainer's step, and one case (train, checkpoint, evaluate, resume) whose results go back as plain data.

The step is :meth:`dsk_trainers.lm._Run.train_step`'s: the rank's rows of the global batch, the target counts summed
over the data ranks, the trainer's ``loss_fn`` (``loss_from_output`` on the last stage's output, weighted by the
chunk's share of all targets), ``built.forward_backward`` with ``aux_weight = 1 / micro-batches``,
``mean_over_ranks`` and ``built.update`` with the trainer's ``moe_metrics``. The loss the trainer reports is
float32 (its parts are, in one process too), so the step also records the loss in float64: the loss_fn's token
losses plus every MoE layer's balance loss of each chunk times its weight (a forward hook on each aux-loss source),
summed over the ranks. Tensors go back to the test process as safetensors bytes (a tensor through the spawn queue
is a shared-memory handle that dies with the rank).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save

from tests.unit.plugins.dsk_parallel.test_data import _build, _load, _states
from tests.unit.train.helpers import tiny_table

#: global batch rows (every chunk count of the tests divides the rows of a data rank), sequence length,
#: steps of a case before its checkpoint, steps of the whole reference
ROWS, SEQ, FIRST, STEPS = 24, 16, 2, 4
#: the schedule's total steps for the learning-rate schedule (warm-up 2 steps, then cosine)
TOTAL = 10


def pipeline_table(
    kind: str | None = None,
    *,
    pp: int | None = None,
    chunks: int | None = None,
    tie: bool = False,
    batch: int = ROWS,
    data: str | None = None,
    expert: bool = False,
) -> dict:
    """The tiny MLA + MoE (noaux_tc, 2 expert groups of 2, one group per token) + MTP model, 8 layers, the first
    dense, a sequence-wise balance loss that matters (alpha 0.05) and a router bias speed that moves the routing
    after one step; clipping at 0.5 (every step clips). ``kind`` None: one process (no ``[parallel]``).

    Args:
        kind: ``1f1b``, ``dualpipev``, ``dualpipe`` or None.
        pp: ``parallel.pipeline.pp`` (None: every rank).
        chunks: ``parallel.pipeline.chunks`` (None: the schedule's minimum).
        tie: ``model.tie_embeddings``.
        batch: ``trainer.batch_size`` (rows per data rank: what the pipeline checks against its chunks).
        data: a ``[parallel.data]`` type (``zero1``), or None.
        expert: a ``[parallel.expert] type = "node_limited"`` table with ep = 2.
    """
    table = tiny_table()
    model = table["model"]
    model.update({"n_layers": 8, "first_k_dense": 1, "tie_embeddings": tie})
    model["ffn"]["router"].update(
        {"n_groups": 2, "topk_groups": 1, "seq_aux_alpha": 0.05, "bias_update_speed": 0.01}
    )  # fmt: skip
    table["optimizer"].update({"grad_clip": 0.5, "warmup_steps": 2})
    table["trainer"].update({"device": "cpu", "batch_size": batch})
    if kind is not None:
        pipe: dict[str, Any] = {"type": kind}
        if pp is not None:
            pipe["pp"] = pp
        if chunks is not None:
            pipe["chunks"] = chunks
        table["parallel"] = {"pipeline": pipe}
        if expert:
            table["parallel"]["expert"] = {"type": "node_limited", "ep": 2}
        if data is not None:
            table["parallel"]["data"] = {"type": data}
    return table


def global_batches(vocab: int, n: int, rows: int = ROWS) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed global batches of ``rows`` rows; row i has ``SEQ // 2 + i % (SEQ // 2)`` targets at most (its
    tail is padding), so every chunk and every data rank holds its own number of targets."""
    g = torch.Generator().manual_seed(4321)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (rows, SEQ), generator=g)
        labels = ids.clone()
        for i in range(rows):
            labels[i, SEQ // 2 + i % (SEQ // 2) :] = -100
        labels[:, 0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


class _Float64Loss:
    """The step's loss in float64 on this rank: the token losses the loss_fn returns plus, per chunk, each local MoE
    layer's balance loss times the chunk's auxiliary weight (``aux_weight * chunk rows / micro-batch rows``)."""

    def __init__(self, built: Any):
        from dsk.api.runtime import collect_side_channels

        self.total = torch.zeros((), dtype=torch.float64)
        self.rows = 1
        self.aux_weight = 1.0
        self.hooks = [
            m.register_forward_hook(self._hook) for _, m in collect_side_channels(built.base_model).aux
        ]  # fmt: skip

    def _hook(self, module: Any, args: tuple, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        aux = module.aux_loss()
        if aux is not None:
            rows = args[0].shape[0]
            self.total += aux.detach().double() * self.aux_weight * rows / self.rows

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def pipeline_steps(built: Any, batches: list[dict], first_step: int, grads: dict | None = None) -> list[dict]:
    """The LM trainer's step (``dsk_trainers.lm._Run.train_step``, one micro-batch) on each global batch.

    Returns per step ``loss`` (the trainer's float32 report), ``loss64`` (float64, see :class:`_Float64Loss`),
    ``aux_loss``, ``grad_norm`` and ``metrics`` (``moe_metrics``). ``grads``, when given, receives the first
    step's gradients by parameter name right after the strategy's ``sync_gradients`` (before clipping).
    """
    from dsk_trainers.lm import moe_metrics

    from dsk.api.runtime import IGNORE_INDEX, SideChannels, loss_from_output

    out = []
    for i, batch in enumerate(batches):
        step = first_step + i
        built.set_lr(step, TOTAL)
        micro = [built.local_rows(batch)]
        n_targets = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
        total_targets = max(1.0, built.global_sum([sum(n_targets)])[0])
        world = built.parallel.data_world_size
        aux_weight = 1.0 / len(micro)
        built.model.train()
        built.optimizer.zero_grad(set_to_none=True)
        record = _Float64Loss(built)
        record.rows, record.aux_weight = micro[0]["input_ids"].shape[0], aux_weight

        def loss_fn(output: Any, b: dict, world=world, total_targets=total_targets, record=record) -> tuple:
            weight = int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) * world / total_targets
            lo = loss_from_output(built.base_model, output, b["labels"], side=SideChannels())
            tokens_loss = lo.lm_loss if lo.mtp_loss is None else lo.lm_loss + lo.mtp_loss
            shares = {k: v.detach().float() * weight for k, v in lo.parts().items() if k in ("lm_loss", "mtp_loss")}
            record.total += tokens_loss.detach().double() * weight
            return tokens_loss * weight, shares

        parts = built.forward_backward(
            [{"input_ids": b["input_ids"], "labels": b["labels"], "mask": None} for b in micro],
            loss_fn,
            aux_weight=aux_weight,
        )
        record.close()
        parts = built.mean_over_ranks(parts)
        loss64 = record.total
        if dist.is_initialized() and dist.get_world_size() > 1:  # every rank's share, averaged over the data ranks
            dist.all_reduce(loss64)
            loss64 = loss64 / world
        if grads is not None and i == 0:
            _capture_after_sync(built, grads)
        update = built.update(parts["loss"], step, read_metrics=moe_metrics)
        if grads is not None and i == 0:
            built.parallel.__dict__.pop("sync_gradients", None)
        assert update.finite
        out.append(
            {"loss": float(parts["loss"]), "loss64": float(loss64), "aux_loss": float(parts.get("aux_loss", 0.0)),
             "grad_norm": float(update.grad_norm), "metrics": dict(update.metrics)}
        )  # fmt: skip
    return out


def _capture_after_sync(built: Any, grads: dict) -> None:
    """Make the strategy's next ``sync_gradients`` (the one :meth:`BuiltRun.update` calls before clipping) copy
    every local gradient into ``grads`` by parameter name once it has synced them."""
    parallel = built.parallel
    sync = parallel.sync_gradients

    def sync_and_copy(model: Any) -> None:
        sync(model)
        for name, p in built.base_model.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone().contiguous()

    parallel.sync_gradients = sync_and_copy


def local_state(built: Any) -> dict[str, torch.Tensor]:
    """This rank's parameters and buffers (router biases included) by name, as independent contiguous copies."""
    state = {}
    seen: set[int] = set()
    for name, t in list(built.base_model.named_parameters()) + list(built.base_model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        state[name] = t.detach().clone().contiguous()
    return state


def eval_logits(built: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """The logits of ``built.evaluation_model()`` on ``ids`` (eval mode, no grad); None where it yields no model."""
    with built.evaluation_model() as (model, _):
        if model is None:
            return None
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits.detach().clone()
        model.train(was)
        return logits


def run_case(rank: int, spec: dict, tmp: str) -> dict:
    """One pipelined (or one-process) case: FIRST steps (the first step's synced gradients kept), the checkpoint
    state and the evaluation logits (``eval``), ``then`` more steps on the same run (default: one with ``copies``,
    else none) and, with ``copies``, this rank's parameters and buffers after them; with ``resume`` a fresh run
    loading the checkpoint state (every rank gets the writer's) for the steps after FIRST."""
    built = _build(spec["table"], f"{tmp}/a{rank}")
    batches = global_batches(built.base_model.vocab_size, STEPS)
    grads: dict[str, torch.Tensor] = {}
    rows = pipeline_steps(built, batches[:FIRST], 1, grads)
    model, tensors, meta = _states(built)
    logits = eval_logits(built, batches[0]["input_ids"]) if spec.get("eval") else None
    then = spec.get("then", 1 if spec.get("copies") else 0)
    rows += pipeline_steps(built, batches[FIRST : FIRST + then], FIRST + 1)
    result: dict[str, Any] = {
        "rows": rows, "grads": save(grads), "model": save(model), "tensors": save(tensors), "meta": meta,
        "local": save(local_state(built)) if spec.get("copies") else None,
        "logits": save({"logits": logits}) if logits is not None else None,
    }  # fmt: skip
    if spec.get("resume"):
        shared = built.parallel.broadcast_object((model, tensors, meta))  # what every rank reads from the checkpoint
        fresh = _build(spec["table"], f"{tmp}/b{rank}")
        _load(fresh, *shared)
        result["more"] = pipeline_steps(fresh, batches[FIRST:], FIRST + 1)
        fresh.parallel.teardown()
    built.parallel.teardown()
    return result


def resume_one_process(table: dict, state: tuple, tmp: str) -> list[dict]:
    """A one-process run loading a checkpoint state (model, optimizer tensors, meta) for the steps after FIRST."""
    built = _build(table, tmp)
    _load(built, *state)
    return pipeline_steps(built, global_batches(built.base_model.vocab_size, STEPS)[FIRST:], FIRST + 1)


def refused(rank: int, table: dict, tmp: str) -> str:
    """The RunSetupError message of a build that must be refused ("" when it was built)."""
    from dsk.api.runtime import RunSetupError

    try:
        _build(table, f"{tmp}/x{rank}").parallel.teardown()
    except RunSetupError as exc:
        return str(exc)
    return ""


def rank_cases(rank: int, world: int, cases: dict, tmp: str) -> dict:
    """Every case of one world size on its ranks (one spawn: starting ranks costs more than a case)."""
    out = {}
    for name, spec in cases.items():
        if "refused" in spec:
            out[name] = refused(rank, spec["refused"], f"{tmp}/{name}")
        else:
            out[name] = run_case(rank, spec, f"{tmp}/{name}")
    return out


def cal_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DualPipe's gradient check: ``1 - 2 sum(xy) / sum(x^2 + y^2)`` (0 when equal), in float64."""
    x, y = x.double().flatten(), y.double().flatten()
    denom = (x * x + y * y).sum()
    if float(denom) == 0.0:
        return 0.0
    return float(1 - 2 * (x * y).sum() / denom)

"""GRPO and rejection sampling on 2 gloo ranks equal one process given the same prompts.

Each rank holds half of every step's groups, samples them from the groups' own generators, gathers the reward
table and trains with gradients averaged over the ranks. Compared per step with one process: losses, rewards,
metrics and the completions themselves. Layouts: a transparent strategy written here (gradients all-reduced in
``sync_gradients``), driving the trainer directly with the per-micro-batch ``grpo`` loss, batch-scaled rewards and
a KL reference refreshed during the run; and the built-in ``replicate`` (DDP's reducer in every backward),
``fsdp`` (FSDP2: every forward all-gathers) and ``node_limited`` expert parallelism (every forward and backward an
all-to-all) through ``dsk.train.runner.run_recipe`` with ``dapo``'s all-reduced token count. All 2-rank runs share
one set of ranks (module fixtures), so the processes start once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dsk import hookimpl
from dsk.api import BaseConfig, ParallelStrategy
from dsk.api.runtime import RunSetupError
from tests.distributed.harness import GROUP, run_ranks

from .helpers import grpo_table, make_grpo_run

pytestmark = pytest.mark.xdist_group(GROUP)

STEPS = 3


class MeanGradsConfig(BaseConfig):
    """``[parallel.<key>] type = "test_mean_grads"`` (no options)."""


class MeanGrads(ParallelStrategy):
    """Data parallelism at its plainest: every rank holds the whole model; ``sync_gradients`` all-reduces each
    gradient to its mean over the ranks (a gradient missing on a rank counts as zero there)."""

    def setup(self, run: Any) -> None:
        import torch.distributed as dist

        self._rank, self._world = dist.get_rank(), dist.get_world_size()

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world

    @property
    def is_writer(self) -> bool:
        return self._rank == 0

    @property
    def data_rank(self) -> int:
        return self._rank

    @property
    def data_world_size(self) -> int:
        return self._world

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor.div_(self._world)
        return tensor

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.all_reduce(t, "sum")

    def sync_gradients(self, model: torch.nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        has = self.all_reduce(torch.tensor([float(p.grad is not None) for p in params]), "max")
        for p, flag in zip(params, has.tolist(), strict=True):
            if flag:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self.all_reduce(p.grad, "mean")

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class DigitsConfig(BaseConfig):
    """``[trainer.rewards.<name>] type = "test_digits"``."""

    weight: float = 1.0


def digits(config, prompts, completions, **columns):
    """The share of digits in a completion: a reward with a spread even for a random tiny policy, so that every
    step has a learning signal (the task's accuracy and format rewards are all 0 for it)."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


class _TestPlugin:
    @hookimpl
    def register_parallel_strategies(self, register):
        register(
            "parallel", "test_mean_grads", f"{__name__}:MeanGrads", config=MeanGradsConfig,
            summary="test: gradients all-reduced to their mean in sync_gradients",
        )  # fmt: skip

        register(
            "parallel", "test_two_ranks", f"{__name__}:SeesTwoRanks", config=MeanGradsConfig,
            summary="test: two data ranks seen from rank 0, no process group",
        )  # fmt: skip

    @hookimpl
    def register_rewards(self, register):
        register("reward", "test_digits", f"{__name__}:digits", config=DigitsConfig, summary="test: digit share")


def _registry():
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager(_TestPlugin())
    return build_registry(pm), pm


def _train(run_dir: Path, table: dict[str, Any]) -> tuple[list[dict[str, Any]], list[list[str]], dict[str, Any]]:
    """STEPS GRPO steps on ``table``: the metrics rows, each step's completions (this rank's), then an evaluation."""
    registry, pm = _registry()
    run = make_grpo_run(run_dir, table, registry, pm)
    rows, texts = [], []
    for _ in range(STEPS):
        rows.append(run.train_step())
        texts.append(list(run._last_batch[1].texts))
    return rows, texts, run.evaluate()


# with the strategy above: the per-micro-batch loss (P/W * G = 8 rows = one micro-batch per rank), batch-scaled
# rewards, a KL reference refreshed at step 2, one group per generation call, an evaluation of 5 records
SETTINGS = {"loss_type": "grpo", "scale_rewards": "batch", "beta": 0.05, "ref_update_every": 2,
            "generation_batch_size": 4, "eval_samples": 5}  # fmt: skip
# the built-in strategies, through the runner (evaluations before and after, a checkpoint): dapo's all-reduced token
# count, micro-batches of 4 (2 per rank, some of them idle on one rank), all groups in one generation call
RECIPE_SETTINGS = {"loss_type": "dapo", "micro_batch_size": 4, "eval_samples": 5}
RECIPE_LAYOUTS = {
    "replicate": {"data": {"type": "replicate"}},
    "fsdp": {"data": {"type": "fsdp"}},
    # the routed experts sharded over the 2 ranks: every forward and backward is an all-to-all
    "node_limited": {"expert": {"type": "node_limited", "max_nodes": 2}},
}


def _table(settings: dict[str, Any], parallel: dict[str, Any] | None = None) -> dict[str, Any]:
    table = grpo_table(steps=STEPS, lr=5e-2, **settings)
    table["trainer"]["rewards"]["digits"] = {"type": "test_digits"}
    if parallel is not None:
        table["parallel"] = parallel
    return table


def _run_recipe(table: dict[str, Any], run_dir: Path) -> list[dict[str, Any]]:
    """``table`` through ``dsk.train.runner.run_recipe`` (on a harness rank: in its process group); the rows of
    ``metrics.jsonl`` (written by the writing rank)."""
    from dsk.train.progress import Reporter
    from dsk.train.runner import run_recipe
    from tests.unit.train.helpers import _NullConsole, validated

    registry, pm = _registry()
    run_recipe(validated(table, registry), registry=registry, pm=pm, run_dir=run_dir,
               reporter=Reporter(_NullConsole(), enabled=False))  # fmt: skip
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _on_rank(rank: int, world_size: int, tmp: str) -> dict[str, Any]:
    """Everything the 2-rank tests below compare, in one set of ranks (one start-up for all of them)."""
    out: dict[str, Any] = {}
    out["direct"] = _train(Path(tmp) / "direct", _table(SETTINGS, {"data": {"type": "test_mean_grads"}}))
    for name, layout in RECIPE_LAYOUTS.items():
        _run_recipe(_table(RECIPE_SETTINGS, layout), Path(tmp) / name)
    out["traces"] = _traces()
    return out


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def two_ranks(tmp_path_factory) -> tuple[Path, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("two_ranks")
    return tmp, run_ranks(_on_rank, 2, str(tmp))


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def one_process(tmp_path_factory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("one_process")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run
    try:
        return {
            "direct": _train(tmp / "direct", _table(SETTINGS)),
            "recipe": _run_recipe(_table(RECIPE_SETTINGS), tmp / "recipe"),
        }
    finally:
        torch.set_num_threads(threads)


def test_grpo_on_two_ranks_equals_one_process_given_the_same_prompts(two_ranks, one_process):
    one_rows, one_texts, one_eval = one_process["direct"]
    (r0_rows, r0_texts, r0_eval), (r1_rows, r1_texts, r1_eval) = (r["direct"] for r in two_ranks[1])
    for a, b in zip(r0_rows, r1_rows, strict=True):  # every rank reports the global row
        assert all(a.get(k) == b.get(k) for k in ("loss", "reward", "entropy", "grad_norm", "tokens_total")), (a, b)
    for step in range(STEPS):
        one, two = one_rows[step], r0_rows[step]
        # the completions do not depend on the rank count: rank 0 holds the first half of the groups
        assert r0_texts[step] + r1_texts[step] == one_texts[step], step
        for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy/mean", "rewards/digits/std",
                    "completions/mean_length", "completions/clipped_ratio", "tokens"):  # fmt: skip
            assert two[key] == pytest.approx(one[key], rel=1e-12, abs=1e-12), (step, key)
        for key in ("loss", "entropy", "clip_ratio/region_mean", "grad_norm"):
            assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (step, key)
        assert two["kl"] == pytest.approx(one["kl"], rel=1e-4, abs=1e-7), step
    assert all(r["frac_reward_zero_std"] < 1 and r["loss"] != 0 for r in one_rows)  # every step has a signal
    # the evaluation (5 test records: shares of 3 and 2), greedy and sampled (eval_sampled_k = 4: 20 samples of
    # per-record generators), reports one process's numbers on every rank
    assert {"eval/sampled_accuracy", "eval/sampled_digits", "eval/pass@4"} <= set(one_eval)
    for key, value in one_eval.items():
        if key.startswith("eval/") and key != "eval/seconds":
            assert r0_eval[key] == r1_eval[key] == pytest.approx(value, rel=1e-12), key
    assert one_texts[0] != one_texts[1]  # and the steps sample different completions


@pytest.mark.parametrize("layout", list(RECIPE_LAYOUTS))
def test_grpo_recipe_on_two_ranks_writes_the_rows_of_one_process(two_ranks, one_process, layout):
    one = one_process["recipe"]
    run_dir = two_ranks[0] / layout
    two = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in two] == [(r["kind"], r["step"]) for r in one]
    assert [r["kind"] for r in one].count("train") == STEPS and [r["kind"] for r in one].count("eval") == 2
    for a, b in zip(one, two, strict=True):
        exact = ("reward", "rewards/digits/mean", "completions/mean_length", "eval/accuracy", "eval/digits",
                 "eval/sampled_accuracy", "eval/sampled_digits")  # fmt: skip
        close = ("loss", "grad_norm", "entropy")
        assert {k for k in exact + close if k in a} == {k for k in exact + close if k in b}
        for key in (k for k in exact if a.get(k) is not None):
            assert b[key] == pytest.approx(a[key], rel=1e-12), (a["step"], key)
        for key in (k for k in close if a.get(k) is not None):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "summary.json").is_file()


class SeesTwoRanks(MeanGrads):
    """A layout of two data ranks seen from rank 0, without a process group: enough for a check made when the run
    is built, before any collective (the trainer must refuse the recipe there)."""

    def setup(self, run: Any) -> None:
        self._rank, self._world = 0, 2


def test_prompts_per_step_must_split_over_the_data_ranks(tmp_path):
    table = grpo_table(prompts_per_step=3)
    table["parallel"] = {"data": {"type": "test_two_ranks"}}
    registry, pm = _registry()
    with pytest.raises(RunSetupError, match=r"trainer.prompts_per_step = 3 does not split over the 2 data-parallel"):
        make_grpo_run(tmp_path, table, registry, pm)


def _traces() -> dict[str, Any]:
    """Traces of 5 prompts (2 per generation batch) written by this rank alone and shared out over the ranks."""
    from dsk_rl.common import group_generator
    from dsk_rl.config import RejectionSamplingConfig
    from dsk_rl.traces import generate_traces

    from dsk.data.tokenizers import CharTokenizer
    from tests.unit.model.tiny import tiny_model

    registry, _ = _registry()
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789+-=?")  # the tiny model's 48 ids
    model = tiny_model(mtp=None)
    with torch.no_grad():  # make EOS likely: only EOS-terminated completions are accepted
        hidden = model(torch.tensor([list(range(9, 16))])).hidden[0].mean(0)
        model.lm_head.weight[tokenizer.eos_id] = hidden / hidden.norm()
    cfg = registry.validate(
        RejectionSamplingConfig,
        {"samples_per_prompt": 3, "max_completion_length": 6, "threshold": 0.0, "dedupe": True,
         "rewards": {"digits": {"type": "test_digits"}}},
    )  # fmt: skip
    records = [{"prompt": p, "split": "train", "index": i} for i, p in enumerate(("ab", "c+d=", "7", "xyz?", "q-1"))]
    strategy = MeanGrads()
    strategy.setup(None)
    kwargs = {"checker": None, "source": "ckpt", "origin": "test", "chunk_prompts": 2, "registry": registry}
    gens = lambda i: group_generator(torch.device("cpu"), 0, -17, i)  # noqa: E731
    one = generate_traces(model, tokenizer, records, cfg, generator=gens, **kwargs)
    shared = generate_traces(model, tokenizer, records, cfg, generator=gens, parallel=strategy, **kwargs)
    return {"one": one, "shared": shared}


def test_rejection_sampling_traces_are_shared_out_and_gathered_as_one_process_writes_them(two_ranks):
    """5 prompts over 2 ranks (shares of 3 and 2, 2 prompts per generation batch): every rank gets the rows and
    counts one process writes, in the same order."""
    r0, r1 = (r["traces"] for r in two_ranks[1])
    rows, stats = r0["one"]
    assert 0 < stats.kept < stats.sampled == 15 and stats.truncated > 0  # some kept, some rejected
    for r in (r0, r1):
        shared_rows, shared_stats = r["shared"]
        assert shared_rows == rows
        assert shared_stats.row() == pytest.approx(stats.row(), rel=1e-12)
    assert {row["prompt_id"] for row in rows} <= {f"train/{i}" for i in range(5)}

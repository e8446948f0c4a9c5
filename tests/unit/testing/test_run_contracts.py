"""The run-level contract suites of dsk.testing (feature, parallel, trainer): every built-in passes; broken ones fail
with a message that says what to fix.

The built-ins are read from the registry, so a new built-in is covered as soon as it is registered; where one needs
particular options (or more than one process) its parametrize id says why. Each fast case trains the tiny recipe
of :func:`dsk.testing.contracts.run.tiny_recipe` 3 or 4 times for 3-4 steps (a few seconds); the cases marked slow
launch ``dsk train --nproc 2`` or compile the model.
"""

from __future__ import annotations

import random

import pytest
import torch
from dsk_trainers.lm import PretrainTrainer

from dsk.api import Feature, ParallelStrategy
from dsk.testing import builtin_registry, run_dsk
from dsk.testing.contracts.run import check_feature, check_parallel, check_trainer, tiny_recipe
from tests.distributed.harness import GROUP

REGISTRY = builtin_registry()

# -- what a built-in needs beyond its defaults (value: (table, why)) ----------------------------------------------

FEATURE_TABLES = {
    "fp8": ({"block_size": 8}, "block_size-8-divides-every-K-of-the-tiny-model"),
    "compile": ({"backend": "aot_eager"}, "aot_eager-backend-no-C++-build"),
}
#: features whose check is slow (torch.compile traces every block of every run: ~20 s)
SLOW_FEATURES = {"compile"}
#: strategies that cut the model over ranks: a pipeline needs pp >= 2, so only the nproc=2 path covers it
NEEDS_RANKS = {"1f1b", "dualpipe", "dualpipev"}
#: strategies also launched through dsk train --nproc 2 (slow): the pipelines and one data-parallel strategy
TWO_RANKS = sorted(NEEDS_RANKS | {"replicate"})
#: recipe sections a strategy needs on two ranks (value: (sections, why))
TWO_RANK_RECIPES = {"dualpipev": ({"model": {"n_layers": 4}}, "4-stages-in-a-V-need-4-layers")}

_LM = {"batch_size": 4, "seq_len": 16, "eval_samples": 0}
_TRACES = {"num_prompts": 4, "samples_per_prompt": 4, "max_completion_length": 16, "threshold": 0.0,
           "eval_samples": 0, "rewards": {"accuracy": {}}, **_LM}  # fmt: skip
TRAINER_TABLES = {
    "pretrain": (_LM, "tiny-rows"),
    "sft": (_LM, "tiny-rows"),
    "grpo": (
        {
            "prompts_per_step": 2,
            "num_generations": 2,
            "micro_batch_size": 4,
            "max_completion_length": 4,
            "generation_batch_size": 8,
            "eval_samples": 0,
            "log_completions": 0,
            "rewards": {"accuracy": {}},
        },
        "needs-a-reward",
    ),  # fmt: skip
    # an untrained policy reaches EOS only by chance: 16 samples of up to 16 tokens give it room
    "rejection_sampling": (_TRACES, "needs-a-reward-and-EOS-terminated-samples"),
    "distill": ({**_TRACES, "teacher_eval": False}, "needs-a-teacher-checkpoint-from-a-3-step-pretrain"),
}


def _names(kind: str) -> list[str]:
    return sorted({s.name for s in REGISTRY.all(kind)})


def _id(name: str, tables: dict) -> str:
    return f"{name}-{tables[name][1]}" if name in tables else name


def _spec(kind: str, name: str):
    return REGISTRY.get(kind, name)


# -- every built-in passes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, id=_id(n, FEATURE_TABLES), marks=[pytest.mark.slow] if n in SLOW_FEATURES else [])
        for n in _names("feature")
    ],
)
def test_builtin_features_meet_the_feature_contract(name):
    spec = _spec("feature", name)
    table = FEATURE_TABLES.get(name, ({}, ""))[0]
    check_feature(
        spec.impl, spec.config, name=name, table=table, after=spec.after, before=spec.before, conflicts=spec.conflicts
    )


@pytest.mark.parametrize("name", [n for n in _names("parallel") if n not in NEEDS_RANKS])
def test_builtin_strategies_on_one_process_give_the_one_process_losses(name):
    spec = _spec("parallel", name)
    check_parallel(spec.impl, spec.config, name=name)


@pytest.mark.slow
@pytest.mark.xdist_group(GROUP)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            n,
            id="-".join(
                [
                    n,
                    *(["pipeline-needs-2-ranks"] if n in NEEDS_RANKS else []),
                    *([TWO_RANK_RECIPES[n][1]] if n in TWO_RANK_RECIPES else []),
                ]
            ),
        )
        for n in TWO_RANKS
    ],  # fmt: skip
)
def test_builtin_strategies_on_two_ranks_give_the_one_process_losses(name):
    assert name in _names("parallel")
    spec = _spec("parallel", name)
    # rtol 1e-4: two ranks sum a step's gradients in another order than one process (MoE routing amplifies 1e-7)
    recipe = TWO_RANK_RECIPES.get(name, (None, ""))[0]
    check_parallel(spec.impl, spec.config, name=name, nproc=2, rtol=1e-4, recipe=recipe)


def test_every_builtin_strategy_is_covered_on_one_process_or_two_ranks():
    for name in _names("parallel"):
        assert name not in NEEDS_RANKS or name in TWO_RANKS, name


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 3-step pretrain checkpoint of the tiny model (distill's teacher)."""
    import tomli_w

    root = tmp_path_factory.mktemp("teacher")
    recipe = tiny_recipe()
    recipe["trainer"]["steps"] = 3
    path = root / "teacher.toml"
    path.write_text(tomli_w.dumps(recipe), encoding="utf-8")
    result = run_dsk(["train", str(path), "--run-dir", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root / "run"


@pytest.mark.parametrize("name", [pytest.param(n, id=_id(n, TRAINER_TABLES)) for n in _names("trainer")])
def test_builtin_trainers_meet_the_trainer_contract(name, request):
    spec = _spec("trainer", name)
    table = dict(TRAINER_TABLES.get(name, ({}, ""))[0])
    if name == "distill":
        table["teacher"] = str(request.getfixturevalue("teacher"))
    check_trainer(spec.impl, spec.config, name=name, table=table)


# -- broken features -------------------------------------------------------------------------------------------


class Unlisted(Feature):
    """Overrides before_step without listing it: the build path would never call it."""

    stages = ("after_step",)

    def before_step(self, run, step):
        pass

    def after_step(self, run, step):
        return None


class ListedNotOverridden(Feature):
    stages = ("transform_model", "after_step")

    def after_step(self, run, step):
        return None


class Forgetful(Feature):
    """Damps each step's gradients by the number of steps seen, a count its load_state_dict forgets."""

    stages = ("before_step", "after_step", "state")

    def __init__(self, config=None):
        super().__init__(config)
        self.count = 0

    def before_step(self, run, step):
        for p in run.params:
            if p.grad is not None:
                p.grad.mul_(1.0 / (1 + self.count))

    def after_step(self, run, step):
        self.count += 1
        return {"forgetful/count": float(self.count)}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        pass  # the bug: the count restarts at 0 on --resume


class Noisy(Feature):
    """Jitters the weights after each step with unseeded randomness."""

    stages = ("after_step",)

    def after_step(self, run, step):
        with torch.no_grad():
            for p in run.params:
                p.mul_(1 + 1e-3 * random.SystemRandom().random())
        return None


class SetState(Feature):
    """Keeps a Python set in its state, which neither safetensors nor JSON holds."""

    stages = ("after_step", "state")

    def after_step(self, run, step):
        self.seen = {step}

    def state_dict(self):
        return {"seen": getattr(self, "seen", set())}

    def load_state_dict(self, state):
        self.seen = set(state["seen"])


class StringMetrics(Feature):
    stages = ("after_step",)

    def after_step(self, run, step):
        return {"broken/step": str(step)}


def test_a_feature_overriding_a_stage_it_does_not_list_fails():
    with pytest.raises(AssertionError, match="overrides before_step but does not list it in stages.*add 'before_step'"):
        check_feature(Unlisted)


def test_a_feature_listing_a_stage_it_does_not_implement_fails():
    with pytest.raises(AssertionError, match="lists 'transform_model' in stages but does not override transform_model"):
        check_feature(ListedNotOverridden)


def test_a_feature_with_no_stages_fails():
    class Idle(Feature):
        stages = ()

    with pytest.raises(AssertionError, match="lists no stages"):
        check_feature(Idle)


def test_a_feature_whose_state_does_not_round_trip_fails_the_resume():
    with pytest.raises(AssertionError, match="stopped after step 2 and resumed from its checkpoint differs"):
        check_feature(Forgetful)


def test_a_non_deterministic_feature_fails():
    with pytest.raises(AssertionError, match="is not deterministic: two runs with the same seed differ"):
        check_feature(Noisy)


def test_a_feature_state_a_checkpoint_cannot_hold_fails():
    with pytest.raises(AssertionError, match="'seen' = set is neither a tensor nor a JSON value"):
        check_feature(SetState)


def test_after_step_metrics_that_are_not_numbers_fail():
    with pytest.raises(AssertionError, match=r"after_step returned 'broken/step': '1' at step 1"):
        check_feature(StringMetrics, steps=2)


# -- a broken strategy, a broken trainer -------------------------------------------------------------------------


class DropsExpertGradients(ParallelStrategy):
    """Reduces attention, embedding and head only: the FFN layers' gradients are zeroed instead of averaged."""

    def sync_gradients(self, model):
        for name, p in model.named_parameters():
            if ".mlp." in name and p.grad is not None:
                p.grad.zero_()


def test_a_strategy_whose_reduction_changes_the_losses_fails():
    with pytest.raises(AssertionError, match=r"step 2 has loss .*, one process without it .*its reductions must"):
        check_parallel(DropsExpertGradients)


class WrongWorld(ParallelStrategy):
    @property
    def data_world_size(self):
        return 3


def test_a_strategy_whose_layout_is_inconsistent_fails():
    with pytest.raises(AssertionError, match="data_world_size, which divides world_size"):
        check_parallel(WrongWorld)


class NaNMetrics(PretrainTrainer):
    """Logs a NaN in every row."""

    def run(self, ctx):
        write = ctx.metrics.write
        ctx.metrics.write = lambda row: write({**row, "broken/ratio": float("nan")})
        return super().run(ctx)


def test_a_trainer_writing_non_finite_metrics_fails():
    with pytest.raises(AssertionError, match="wrote broken/ratio = null .*every metric must be a finite number"):
        check_trainer(NaNMetrics, _spec("trainer", "pretrain").config, table=_LM)


class OneRankOnly(ParallelStrategy):
    """Ignores torch.distributed: every rank says it is rank 0 of 1 and writes the run directory."""


@pytest.mark.slow
@pytest.mark.xdist_group(GROUP)
def test_a_strategy_that_ignores_the_ranks_fails_on_two_ranks():
    with pytest.raises(AssertionError, match="rank 0 of world_size 1 on process 0 of 2; take them from torch"):
        check_parallel(OneRankOnly, nproc=2)

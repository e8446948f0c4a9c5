"""Generation whose stop decision agrees across ranks (``sync_done``), and per-block sampling generators.

With a sharded model every forward is a collective, so the ranks must run the same number of forwards even when
their rows finish at different steps. The multi-rank tests stand the sharded model in with a forward hook that
all-reduces (a rank that stopped early would leave its peer waiting in it) and count the forwards of each rank,
and one test runs a real sharded model (node-limited expert parallelism, an all-to-all in every MoE forward).
"""

from __future__ import annotations

import pytest
import torch

from dsk.model.generate import done_across_ranks, generate, sample_next, speculative_generate
from tests.distributed.harness import GROUP, run_ranks
from tests.unit.model.tiny import VOCAB, tiny_model

pytestmark = pytest.mark.xdist_group(GROUP)

# rank r's prompts (ragged on rank 0) and budget; mode "budget": rank 0 runs out after 3 tokens, rank 1 after 9;
# mode "eos": the same budget, token 36 is EOS, which rank 0's rows sample 2nd and 1st, rank 1's row 6th
RANK_PROMPTS = {0: ([[3, 7, 1, 9, 4], [5, 2]], 3), 1: ([[8, 8, 6, 1]], 9)}
EOS = 36
EXPECTED_ALONE_FORWARDS = {"budget": (3, 9), "eos": (2, 6)}


class _Strategy:
    """What :func:`done_across_ranks` reads of a parallel strategy: the world size and a data-rank all-reduce."""

    def __init__(self, world_size: int, rank: int = 0):
        self.world_size = self.data_world_size = world_size
        self.data_rank = rank

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor


def _collective_counter(model):
    """A forward pre-hook that all-reduces once per forward (a sharded model's collective) and counts them."""
    import torch.distributed as dist

    count = [0]

    def hook(module, args, kwargs):
        count[0] += 1
        dist.all_reduce(torch.ones(1))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return count, handle


def _plain_counter(model):
    count = [0]
    handle = model.register_forward_pre_hook(lambda module, args: count.__setitem__(0, count[0] + 1))
    return count, handle


def _generate_on_rank(rank: int, world_size: int, mode: str) -> dict:
    """Rank ``rank``'s prompts generated alone (forwards counted) and synchronised (forwards all-reduced)."""
    model = tiny_model(mtp=None)  # the same weights on every rank
    prompts, budget = RANK_PROMPTS[rank]
    eos = {"budget": None, "eos": EOS}[mode]
    budget = budget if mode == "budget" else 9
    gens = lambda: [torch.Generator().manual_seed(100 * rank + i) for i in range(len(prompts))]  # noqa: E731
    kwargs = {"temperature": 0.9, "eos_id": eos, "return_logprobs": True}
    count, handle = _plain_counter(model)
    alone = generate(model, prompts, budget, generator=gens(), **kwargs)
    handle.remove()
    alone_forwards = count[0]
    count, handle = _collective_counter(model)
    synced = generate(model, prompts, budget, generator=gens(), sync_done=done_across_ranks(_Strategy(world_size)),
                      **kwargs)  # fmt: skip
    handle.remove()
    return {"alone": alone, "alone_forwards": alone_forwards, "synced": synced, "forwards": count[0]}


def _on_rank(rank: int, world_size: int) -> dict:
    """Everything the 2-rank tests of this module compare, in one set of ranks (the processes start once)."""
    return {
        "budget": _generate_on_rank(rank, world_size, "budget"),
        "eos": _generate_on_rank(rank, world_size, "eos"),
        "expert_parallel": _expert_parallel_on_rank(rank, world_size),
        "speculative": _speculate_on_rank(rank, world_size),
        "evaluate": _evaluate_on_rank(rank, world_size),
    }


@pytest.fixture(scope="session")  # once per test process: xdist may interleave other modules
def ranks() -> list[dict]:
    return run_ranks(_on_rank, 2)


@pytest.mark.parametrize("mode", ["budget", "eos"])
def test_synced_generation_runs_the_same_forwards_on_every_rank_and_the_same_tokens(ranks, mode):
    r0, r1 = (r[mode] for r in ranks)
    # unsynced, rank 0 would stop 6 or 4 forwards before rank 1 (a hang with a sharded model)
    assert (r0["alone_forwards"], r1["alone_forwards"]) == EXPECTED_ALONE_FORWARDS[mode]
    if mode == "eos":
        assert r0["synced"].finished == [True, True] and r1["synced"].finished == [True]
    assert r0["forwards"] == r1["forwards"] == max(r0["alone_forwards"], r1["alone_forwards"])
    for r in (r0, r1):
        assert r["synced"].tokens == r["alone"].tokens
        assert r["synced"].finished == r["alone"].finished
        synced, alone = (torch.tensor(sum(r[k].logprobs, [])) for k in ("synced", "alone"))
        torch.testing.assert_close(synced, alone, rtol=1e-12, atol=1e-12)


def _expert_parallel_on_rank(rank: int, world_size: int) -> dict:
    """The tiny MoE with its routed experts sharded over the 2 ranks (node-limited expert parallelism: every forward
    dispatches through all_to_all), generating each rank's prompts with its own budget."""
    import copy

    from dsk_parallel.expert import NodeLimitedExperts
    from dsk_parallel.expert_config import NodeLimitedConfig

    full = tiny_model(mtp=None)  # router: 2 groups, top-1 group = 2 nodes of 1 rank, max_nodes 1
    strategy = NodeLimitedExperts(NodeLimitedConfig())
    strategy.name = "expert"
    strategy.setup(None)
    sharded = strategy.wrap_model(copy.deepcopy(full), None)
    prompts, budget = RANK_PROMPTS[rank]
    gens = lambda: [torch.Generator().manual_seed(100 * rank + i) for i in range(len(prompts))]  # noqa: E731
    alone = generate(full, prompts, budget, temperature=0.9, generator=gens())
    synced = generate(sharded, prompts, budget, temperature=0.9, generator=gens(),
                      sync_done=done_across_ranks(strategy))  # fmt: skip
    return {"alone": alone.tokens, "synced": synced.tokens}


def test_an_expert_parallel_model_generates_what_the_whole_model_does_when_the_ranks_stop_at_different_steps(ranks):
    r0, r1 = (r["expert_parallel"] for r in ranks)
    assert [len(t) for t in r0["alone"]] == [3, 3] and [len(t) for t in r1["alone"]] == [9]  # rank 0 is done first
    for r in (r0, r1):
        assert r["synced"] == r["alone"]


def _speculate_on_rank(rank: int, world_size: int) -> dict:
    model = tiny_model()  # with MTP heads: the "mtp" drafter
    prompt, budget = [[3, 7, 1, 9, 4], [8, 8, 6, 1]][rank], [4, 11][rank]
    count, handle = _plain_counter(model)
    alone = speculative_generate(model, prompt, budget, drafter="mtp")
    handle.remove()
    alone_forwards = count[0]
    count, handle = _collective_counter(model)
    synced = speculative_generate(model, prompt, budget, drafter="mtp", sync_done=done_across_ranks(_Strategy(2)))
    handle.remove()
    return {"alone": alone, "alone_forwards": alone_forwards, "synced": synced, "forwards": count[0]}


def test_synced_speculative_generation_keeps_the_verifying_forwards_in_step(ranks):
    r0, r1 = (r["speculative"] for r in ranks)
    assert r0["alone_forwards"] != r1["alone_forwards"]
    assert r0["forwards"] == r1["forwards"] == max(r0["alone_forwards"], r1["alone_forwards"])
    for r in (r0, r1):
        assert r["synced"].tokens == r["alone"].tokens and r["synced"].verify_steps == r["alone"].verify_steps


class _OddLength:
    """A task whose checker passes completions of odd length (any rule will do: the counts are compared)."""

    @staticmethod
    def check(record, text):
        return len(text) % 2 == 1


def _evaluate_on_rank(rank: int, world_size: int) -> dict:
    from dsk.data.tokenizers import CharTokenizer
    from dsk.train.evaluate import evaluate_task

    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789+-=?")  # 48 ids: the tiny model's vocabulary
    assert tokenizer.vocab_size == VOCAB
    model = tiny_model(mtp=None)
    with torch.no_grad():  # make EOS likely, so that the completions (and the ranks) finish at different steps
        hidden = model(torch.tensor([list(range(9, 16))])).hidden[0].mean(0)
        model.lm_head.weight[tokenizer.eos_id] = hidden / hidden.norm()
    records = [{"prompt": p} for p in ("ab", "c+d=", "7", "xyz?", "q-1")]  # 5 records: shares of 3 and 2
    kwargs = {"max_new_tokens": 8, "batch_size": 2, "pass_k": 2, "temperature": 1.0, "seed": 3}
    one = evaluate_task(model, tokenizer, _OddLength(), records, **kwargs)
    count, handle = _collective_counter(model)
    shared = evaluate_task(model, tokenizer, _OddLength(), records, parallel=_Strategy(world_size, rank), **kwargs)
    handle.remove()
    return {"one": one, "shared": shared, "forwards": count[0]}


def test_evaluation_shares_the_records_out_and_reports_what_one_process_does(ranks):
    r0, r1 = (r["evaluate"] for r in ranks)
    assert r0["forwards"] == r1["forwards"]
    for r in (r0, r1):
        for key in ("eval/accuracy", "eval/samples", "eval/new_tokens_mean", "eval/pass@2"):
            assert r["shared"][key] == pytest.approx(r["one"][key], rel=1e-12), key
    assert 0 < r0["one"]["eval/pass@2"]  # the sampled completions are checked, not only the greedy ones
    assert r0["one"]["eval/new_tokens_mean"] < 8  # some rows stopped at EOS


def test_done_across_ranks_is_free_in_one_process():
    assert done_across_ranks(None) is None and done_across_ranks(_Strategy(1)) is None


# -- per-block generators (one process) ----------------------------------------------------------------------
def test_a_block_samples_the_same_tokens_alone_and_batched_with_other_blocks():
    """Rows draw from their own block's generator, so a GRPO group's completions do not depend on its batch."""
    model = tiny_model(mtp=None)
    prompts = [[3, 7, 1], [5, 2, 9, 9], [8, 8]]
    g = 2  # completions per prompt
    rows = [p for p in prompts for _ in range(g)]

    def gens(blocks):
        return [torch.Generator().manual_seed(1000 + b) for b in blocks]

    batched = generate(model, rows, 8, temperature=1.0, top_p=0.9, generator=gens(range(3)), eos_id=5)
    for b in range(3):
        alone = generate(model, rows[b * g : (b + 1) * g], 8, temperature=1.0, top_p=0.9, generator=gens([b]),
                         eos_id=5)  # fmt: skip
        assert alone.tokens == batched.tokens[b * g : (b + 1) * g]
    # the rows of a block differ from one another (each draws its own uniform)
    assert len({tuple(t) for t in batched.tokens}) > 3


def test_generators_must_split_the_rows_into_equal_blocks():
    model = tiny_model(mtp=None)
    with pytest.raises(ValueError, match="equal blocks"):
        generate(model, [[1], [2], [3]], 2, generator=[torch.Generator(), torch.Generator()])


def test_inverse_cdf_draw_picks_the_first_token_whose_cumulative_mass_passes_u():
    logits = torch.log(torch.tensor([[0.5, 0.0, 0.3, 0.2]], dtype=torch.float64)).expand(5, 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.999999])
    assert sample_next(logits, 1.0, uniform=u).tolist() == [0, 0, 2, 2, 3]  # a zero-probability token is never drawn
    # top-p 0.7 keeps tokens 0 and 2 (mass above 2 is 0.5 < 0.7), renormalised to 5/8, 3/8
    assert sample_next(logits[:3], 1.0, 0.7, uniform=torch.tensor([0.6, 0.7, 0.9999])).tolist() == [0, 2, 2]


def test_inverse_cdf_draws_follow_the_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB, dtype=torch.float64)
    n = 40_000
    u = torch.rand(n, dtype=torch.float64)
    draws = sample_next(logits.expand(n, VOCAB), 0.7, uniform=u)
    freq = torch.bincount(draws, minlength=VOCAB).double() / n
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.7, -1), rtol=0, atol=0.01)

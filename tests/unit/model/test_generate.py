"""Batched KV-cached generation: cache == recompute, prompts of different lengths, EOS, sampling, top-p, log-probs."""

import pytest
import torch

from dsk.model.generate import generate, sample_next, top_p_filter
from tests.unit.model.tiny import VOCAB, tiny_model

PROMPTS = [[3, 7, 1, 9, 4], [5, 2], [8, 8, 6, 1]]


def _greedy_by_recompute(model, prompt, n):
    """Reference: no cache, the whole sequence re-run for every new token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_kv_cached_greedy_generation_equals_recomputing_the_full_forward():
    model = tiny_model(mtp=None)
    res = generate(model, [PROMPTS[0]], 12, temperature=0)
    assert res.tokens[0] == _greedy_by_recompute(model, PROMPTS[0], 12)


def test_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_model(mtp=None)
    batch = generate(model, PROMPTS, 10, temperature=0)
    alone = [generate(model, [p], 10, temperature=0).tokens[0] for p in PROMPTS]
    assert batch.tokens == alone


def test_padded_batch_logprobs_match_per_prompt_logprobs():
    # each row sits at its own positions 0 .. len-1 in the batch, as alone: float64 agrees to rounding
    model = tiny_model(mtp=None)
    batch = generate(model, PROMPTS, 6, temperature=0, return_logprobs=True)
    for i, p in enumerate(PROMPTS):
        alone = generate(model, [p], 6, temperature=0, return_logprobs=True)
        torch.testing.assert_close(
            torch.tensor(batch.logprobs[i]), torch.tensor(alone.logprobs[0]), rtol=1e-12, atol=1e-13
        )


def test_cache_rows_of_different_lengths_decode_each_prompt_as_alone():
    # the attention-cache contract at the model level: a right-padded prefill cut back row by row, then decode
    # steps with the caches' per-row positions and no mask (each row's causal window comes from its own length)
    model = tiny_model(mtp=None)
    lens = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros(3, int(lens.max()), dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)] = torch.tensor(p)
    nxt = torch.tensor([[11, 12], [13, 14], [15, 16]])
    with torch.no_grad():
        caches = model.make_caches(3, 16)
        model(ids, pos=torch.arange(ids.shape[1]), caches=caches)
        for c in caches:
            c.truncate(lens)
        steps = []
        for j in range(2):
            pos = caches[0].positions(1)
            assert torch.equal(pos, (lens + j)[:, None])
            steps.append(model(nxt[:, j : j + 1], pos=pos, caches=caches).logits)
        got = torch.cat(steps, 1)
        for b, p in enumerate(PROMPTS):
            alone = model(torch.tensor([p + nxt[b].tolist()])).logits[0, len(p) :]
            torch.testing.assert_close(got[b], alone, rtol=1e-10, atol=1e-12)
    assert caches[0].lengths.tolist() == (lens + 2).tolist()


def test_logprobs_are_the_model_log_softmax_of_the_sampled_tokens():
    model = tiny_model(mtp=None)
    prompt = PROMPTS[0]
    g = torch.Generator().manual_seed(3)
    res = generate(model, [prompt], 5, temperature=0.7, generator=g, return_logprobs=True)
    seq = torch.tensor([prompt + res.tokens[0]])
    logp = torch.log_softmax(model(seq).logits[0], dim=-1)
    want = [logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(res.tokens[0])]
    torch.testing.assert_close(torch.tensor(res.logprobs[0]), torch.tensor(want))


def test_eos_stops_its_row_while_other_rows_continue():
    model = tiny_model(mtp=None)
    free = generate(model, PROMPTS, 8, temperature=0)
    eos = free.tokens[0][2]  # row 0 produces it at step 3
    first_hit = [row.index(eos) + 1 if eos in row else None for row in free.tokens]
    res = generate(model, PROMPTS, 8, temperature=0, eos_id=eos)
    for i, row in enumerate(free.tokens):
        n = first_hit[i] or 8
        assert res.tokens[i] == row[:n]
        assert res.lengths[i] == n
        assert res.finished[i] == (first_hit[i] is not None)
        assert res.truncated[i] == (first_hit[i] is None)
    assert res.finished[0] and res.lengths[0] == free.tokens[0].index(eos) + 1


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny_model(mtp=None)

    def run(seed):
        return generate(model, PROMPTS, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed)).tokens

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_generation_stops_at_max_seq_len_and_marks_rows_truncated():
    model = tiny_model(mtp=None)  # max_seq_len 64
    res = generate(model, [[1] * 60], 10, temperature=0)
    assert res.lengths == [4] and res.truncated == [True] and res.finished == [False]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompts": [[]]}, "at least one token"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"prompts": [[1] * 64]}, "max_seq_len"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_the_argument(kwargs, match):
    args = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate(tiny_model(mtp=None), **args)


def _top_p_reference(probs, p):
    """Straightforward nucleus: walk tokens by decreasing probability until the mass reaches p."""
    out = torch.zeros_like(probs)
    for b in range(probs.shape[0]):
        mass = 0.0
        for i in sorted(range(probs.shape[1]), key=lambda j: -probs[b, j].item()):
            if mass >= p:
                break
            out[b, i] = probs[b, i]
            mass += probs[b, i].item()
    return out / out.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_a_reference_loop(p):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 11, generator=g, dtype=torch.float64) * 2, dim=-1)
    torch.testing.assert_close(top_p_filter(probs, p), _top_p_reference(probs, p))


def test_top_p_sampling_only_draws_from_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    nucleus = top_p_filter(torch.softmax(logits, -1), 0.8)[0] > 0
    draws = sample_next(logits, temperature=1.0, top_p=0.8, generator=torch.Generator().manual_seed(0))
    assert nucleus.tolist() == [True, True, False, False, False]
    assert set(draws.tolist()) == {0, 1}


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


@pytest.mark.parametrize("sampling", ["greedy", "block_generators"])
def test_dropping_finished_rows_from_the_forwards_keeps_every_token(sampling, monkeypatch):
    """Rows that stopped at EOS leave the decode forwards (the caches keep_rows the rest) once they are half of the
    batch; the tokens, lengths, flags and log-probs are those of the full-batch loop."""
    model = tiny_model(mtp=None)
    prompts = [[3 + i % 5, 7, 1 + i % 3][: 1 + i % 3] for i in range(12)]
    kwargs = {"return_logprobs": True}
    if sampling == "greedy":
        kwargs["temperature"] = 0
    else:
        kwargs["generator"] = [torch.Generator().manual_seed(g) for g in range(4)]  # one per block of 3 rows
        kwargs["temperature"] = 0.5
    # EOS = the token found in the most rows of the free run's first 12, so that rows finish at different steps
    free = generate(model, prompts, 16, **dict(kwargs, generator=_fresh(kwargs))).tokens
    eos = max(range(VOCAB), key=lambda t: sum(t in row[:12] for row in free))
    kwargs["eos_id"] = eos
    full = generate(model, prompts, 16, compact_finished=False, **dict(kwargs, generator=_fresh(kwargs)))
    cache_type = type(model.make_caches(1, 4, "cpu", torch.float64)[0])
    real_keep, seen = cache_type.keep_rows, []

    def spy(self, rows):
        seen.append(rows.numel())
        return real_keep(self, rows)

    monkeypatch.setattr(cache_type, "keep_rows", spy)
    compacted = generate(model, prompts, 16, **dict(kwargs, generator=_fresh(kwargs)))
    assert seen, "no row finished early enough: the test must exercise the compaction"
    assert compacted.tokens == full.tokens
    assert compacted.lengths == full.lengths and compacted.finished == full.finished
    assert any(compacted.finished) and not all(compacted.finished)
    for a, b in zip(compacted.logprobs, full.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-12, atol=1e-12)


def _fresh(kwargs):
    gens = kwargs.get("generator")
    return None if gens is None else [torch.Generator().manual_seed(g) for g in range(len(gens))]


@pytest.mark.parametrize("sampling", ["greedy", "per_row_generators"])
def test_repeated_prompts_are_prefilled_once_and_generate_as_alone(sampling, monkeypatch):
    # GRPO's groups: every prompt G times. The prefill runs the distinct prompts only, the caches repeat their rows,
    # and every row generates what it generates alone.
    model = tiny_model(seed=3)
    distinct = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    prompts = [p for p in distinct for _ in range(3)]
    if sampling == "greedy":
        kwargs = lambda rows: {"temperature": 0}  # noqa: E731
    else:
        kwargs = lambda rows: {"temperature": 1.0, "generator": [torch.Generator().manual_seed(r) for r in rows]}  # noqa: E731
    alone = [generate(model, [p], 10, **kwargs([r]), return_logprobs=True) for r, p in enumerate(prompts)]
    prefill_rows = []
    real_forward = type(model).forward

    def spy(self, ids, *args, **kw):
        if not prefill_rows:
            prefill_rows.append(ids.shape[0])
        return real_forward(self, ids, *args, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    together = generate(model, prompts, 10, **kwargs(range(len(prompts))), return_logprobs=True)
    assert prefill_rows == [len(distinct)]
    assert together.tokens == [a.tokens[0] for a in alone]
    for got, want in zip(together.logprobs, alone, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want.logprobs[0]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("speculative", [False, True])
def test_small_decode_steps_run_on_one_thread_with_the_same_output(speculative, monkeypatch):
    """A tiny model's decode steps have GEMMs too small to split over threads: the loop runs them on one thread
    (the prefill keeps the setting), restores the thread count, and produces what it produces on two."""
    import dsk.model.generate as gen
    from dsk.model.generate import speculative_generate

    model = tiny_model()

    def run():
        g = torch.Generator().manual_seed(3)
        if speculative:
            return speculative_generate(
                model, PROMPTS, 6, drafter="mtp", temperature=0.9, generator=g, return_logprobs=True
            )
        return generate(model, PROMPTS, 6, temperature=0.9, generator=g, return_logprobs=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(gen, "SINGLE_THREAD_DECODE_MACS", 0)  # the policy off: every step on two threads
        two = run()
        monkeypatch.undo()
        seen = []
        original = torch.get_num_threads
        forward = type(model).forward

        def counting(self, *args, **kwargs):
            seen.append(original())
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(type(model), "forward", counting)
        one = run()
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    assert seen[0] == 2 and set(seen[1:]) == {1}  # the prefill on two threads, every decode forward on one
    assert one.tokens == two.tokens
    for a, b in zip(one.logprobs, two.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_decode_steps_with_large_gemms_keep_the_thread_count(monkeypatch):
    import dsk.model.generate as gen

    model = tiny_model(mtp=None)
    monkeypatch.setattr(gen, "SINGLE_THREAD_DECODE_MACS", 1)  # every GEMM counts as large
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    generate(model, PROMPTS, 3, temperature=0)
    assert calls == []

"""KV-cached batched sampling, and greedy speculative decoding driven by a drafter protocol.

Batching and positions: prompts of different lengths are right-padded to the longest one P for the prefill, so
row b's real tokens sit at slots and positions ``0 .. len_b-1``, exactly where they sit when the prompt runs
alone. Causal attention keeps every real token blind to the padding after it, so the prefill needs no mask; the
caches are then cut back row by row to each prompt (the attention-cache contract keeps a length per row, see
``dsk.api.AttentionCache``), and row b's next token goes to slot and position ``len_b``. A decode step attends
through a mask [B, 1, S] (True = may attend) that shows each row only its own slots. Nothing in a row's
computation depends on the other rows, so a batch generates what each prompt generates alone.

Speculative decoding (:func:`speculative_generate`) asks a component of the model for a drafter
(``dsk.api.DrafterProvider`` / ``dsk.api.Drafter``) by name; the loop here verifies its proposals with the main
model and knows nothing of how they were made.

Many ranks: with a sharded model every forward is a collective (an expert-parallel all-to-all, an FSDP all-gather),
so a rank that stops early would leave the others waiting forever. ``sync_done`` (:func:`done_across_ranks` builds
it from a parallel strategy) makes the stop decision one for all ranks: each decode step every rank says whether
its own rows are finished and all go on while any is not; a rank with nothing left runs one-token idle forwards,
so every rank runs the same number of forwards. Without it (the default) generation stops as soon as its own rows
have, at no cost.

Sampling: ``generator`` is one torch generator for the whole batch, or one per block of consecutive rows (a GRPO
group): then a row's draws come from its block's generator only (one uniform per row and step, inverse-CDF), so
what a block samples does not depend on the other rows of the call, nor on how a step's prompts were spread
over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsk.api import DrafterProvider

if TYPE_CHECKING:  # pragma: no cover
    from dsk.model.transformer import DSKModel


@dataclass
class GenerationResult:
    """Output of :func:`generate`, one entry per prompt.

    Attributes:
        tokens: generated token ids (the EOS token included when one was produced).
        lengths: ``len(tokens[i])``.
        finished: the row stopped at ``eos_id``.
        truncated: the row stopped because it ran out of tokens (max_new_tokens or the model's max_seq_len).
        logprobs: per generated token, its log-probability under the model's own distribution
            (``log_softmax(logits)``, before temperature and top-p), which is what a trainer recomputes with a
            forward pass; None unless ``return_logprobs``.
    """

    tokens: list[list[int]]
    lengths: list[int]
    finished: list[bool]
    truncated: list[bool]
    logprobs: list[list[float]] | None = None


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose mass reaches ``top_p``; renormalise.

    probs [B, V] -> [B, V]. A token is kept when the mass of the tokens ranked above it is below ``top_p``, so
    the most likely token always survives.
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    mass_above = sorted_p.cumsum(dim=-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_above >= top_p, 0.0)
    filtered = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return filtered / filtered.sum(dim=-1, keepdim=True)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    *,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V] -> [B]; temperature 0 is greedy (argmax).

    ``uniform`` [B] in [0, 1): draw row b by inverse CDF at ``uniform[b]`` (the token whose cumulative probability
    first exceeds it) instead of ``torch.multinomial`` with ``generator``; the caller then controls where each
    row's randomness comes from.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    cdf_BV = probs.cumsum(dim=-1)
    # right=True: the first token whose cumulative mass is above u*total, so a zero-probability token is never drawn
    at_B1 = (uniform.to(cdf_BV.dtype)[:, None] * cdf_BV[:, -1:]).contiguous()
    return torch.searchsorted(cdf_BV, at_B1, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def done_across_ranks(parallel: Any) -> Callable[[bool], bool] | None:
    """The ``sync_done`` of :func:`generate` for a run's parallel strategy: True when every rank is done.

    One all-reduce (max of "not done") over the strategy's data-parallel ranks per decode step, the ranks between
    which a sharded model's collectives run. None in one process (no cost).
    """
    if parallel is None or int(getattr(parallel, "world_size", 1)) <= 1:
        return None

    def sync_done(done: bool) -> bool:
        busy = torch.tensor(0.0 if done else 1.0, dtype=torch.float32)
        return float(parallel.all_reduce(busy, "max")) == 0.0

    return sync_done


def _row_uniforms(generators: Sequence[torch.Generator], rows: int, device: torch.device) -> torch.Tensor:
    """One uniform [rows] for this decode step: ``rows / len(generators)`` from each block's own generator."""
    per = rows // len(generators)
    return torch.cat([torch.rand(per, generator=g, device=g.device) for g in generators]).to(device)


def _idle_forward(model: Any, device: torch.device, pad_id: int) -> None:
    """A one-token forward without caches: a finished rank's part of its peers' collectives (its output unused)."""
    model(torch.full((1, 1), pad_id, dtype=torch.long, device=device), keep_logits=1)


def _check_args(model: DSKModel, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float):
    if not prompts:
        raise ValueError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature = {temperature}: must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p = {top_p}: must be in (0, 1]")
    longest = max(len(p) for p in prompts)
    if longest >= model.config.max_seq_len:
        raise ValueError(
            f"a prompt of {longest} tokens leaves no room under model.max_seq_len = {model.config.max_seq_len}"
        )
    return longest


@torch.no_grad()
def generate(
    model: DSKModel,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    *,
    return_logprobs: bool = False,
    pad_id: int = 0,
    sync_done: Callable[[bool], bool] | None = None,
) -> GenerationResult:
    """Sample continuations of a batch of prompts with a KV cache (one forward per decode step).

    Args:
        model: a :class:`DSKModel` (put in eval mode for the call).
        prompts: token ids per row; rows may differ in length (padded with ``pad_id`` for the prefill).
        max_new_tokens: most tokens generated per row (fewer when max_seq_len is reached: ``truncated``).
        temperature: softmax temperature; 0 = greedy.
        top_p: nucleus sampling mass (1 = off).
        eos_id: a row stops after producing it; other rows go on.
        generator: torch generator for reproducible sampling, or a sequence of them, one per block of
            ``len(prompts) / len(generator)`` consecutive rows, each block drawing from its own (module docstring).
        return_logprobs: also return each sampled token's log-probability (see :class:`GenerationResult`).
        pad_id: id written into padding and into the slots after a row's EOS (never attended to by real tokens).
        sync_done: ``sync_done(this_rank_done) -> every_rank_done``, called once per decode step; given, the loop
            runs until every rank is done and this rank idles (one-token forwards) after its own rows have
            finished, so all ranks run the same number of forwards (:func:`done_across_ranks`). The tokens are
            those of the unsynchronised call.
    """
    P = _check_args(model, prompts, max_new_tokens, temperature, top_p)
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if not generator or len(prompts) % len(generator):
            raise ValueError(f"{len(generator)} generators do not split {len(prompts)} prompts into equal blocks")
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id,
            sync_done,
        )  # fmt: skip
    finally:
        model.train(was_training)


def _generate(
    model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id, sync_done
):
    device = model.embed_tokens.weight.device
    B = len(prompts)
    budget = min(max_new_tokens, model.config.max_seq_len - P)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # building the batch, not a per-token loop
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)

    tokens = torch.full((B, budget), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(
        (B, budget), device=device, dtype=torch.promote_types(model.lm_head.weight.dtype, torch.float32)
    )
    length = torch.full((B,), budget, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if budget == 0:
        return _result(tokens, length, done, logps if return_logprobs else None)

    ragged = bool((lens != P).any())
    caches = model.make_caches(B, P + budget, device, model.embed_tokens.weight.dtype)
    # Causal attention keeps every real token blind to the padding after it, so the prefill needs no mask.
    out = model(ids, pos=torch.arange(P, device=device), caches=caches, keep_logits=1)
    if ragged:
        lens_host = lens.cpu()  # cache lengths are host bookkeeping: one copy, not one per layer
        for c in caches:
            c.truncate(lens_host)  # each row keeps its prompt; its padding slots are overwritten by what it generates
    if ragged or sync_done is not None:
        # each row's last prompt token, where the padded prefill put it (synchronised: every rank calls the head
        # the same way, whether its own batch is ragged or not)
        logits = model.lm_head(out.hidden[torch.arange(B, device=device), lens - 1])  # (B, V)
    else:
        logits = out.logits[:, -1]  # (B, V)
    blocks = generator if isinstance(generator, list) else None
    step = 0
    finished = False  # this rank's rows are all done (EOS or budget)
    while True:
        if not finished:
            if blocks is not None and temperature != 0:
                nxt = sample_next(logits, temperature, top_p, uniform=_row_uniforms(blocks, B, device))
            else:
                nxt = sample_next(logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            tokens[:, step] = nxt
            if return_logprobs:
                lp = torch.log_softmax(logits.to(logps.dtype), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
                logps[:, step] = torch.where(done, torch.zeros_like(lp), lp)
            if eos_id is not None:
                hit = ~done & (nxt == eos_id)
                length = torch.where(hit, torch.full_like(length, step + 1), length)
                done = done | hit
            finished = step == budget - 1 or bool(done.all())
        if finished if sync_done is None else sync_done(finished):
            break
        if finished:
            _idle_forward(model, device, pad_id)  # keep pace with the ranks still generating
            continue
        step_mask = None
        if ragged:
            # row b's new token sits at slot lens[b] + step and sees the slots up to it; built once for all layers
            step_mask = torch.arange(P + step + 1, device=device)[None, None, :] <= (lens + step)[:, None, None]
        logits = model(nxt[:, None], pos=caches[0].positions(1), mask=step_mask, caches=caches).logits[:, -1]
        step += 1
    return _result(tokens, length, done, logps if return_logprobs else None)


def _result(tokens, length, done, logps) -> GenerationResult:
    lengths = length.tolist()
    rows = tokens.tolist()
    finished = done.tolist()
    out_tokens = [r[:n] for r, n in zip(rows, lengths, strict=True)]
    lp = [r[:n] for r, n in zip(logps.tolist(), lengths, strict=True)] if logps is not None else None
    return GenerationResult(
        tokens=out_tokens, lengths=lengths, finished=finished, truncated=[not f for f in finished], logprobs=lp
    )


# -- speculative decoding: a drafter proposes, the model verifies ---------------------------------------
@dataclass
class SpeculativeResult:
    """Output of :func:`speculative_generate` (one prompt).

    Attributes:
        tokens: generated ids (EOS included when produced); equal to greedy :func:`generate`'s.
        finished: stopped at ``eos_id``.
        drafted: draft tokens proposed in total.
        accepted: drafts the main model confirmed.
        verify_steps: main-model forwards after the prefill (each yields 1 + accepted tokens).
    """

    tokens: list[int]
    finished: bool
    drafted: int
    accepted: int
    verify_steps: int

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per main-model forward, the prefill included."""
        return len(self.tokens) / (self.verify_steps + 1)


def drafter_names(model: nn.Module) -> list[str]:
    """The names of the drafters the model's components offer (:class:`dsk.api.DrafterProvider`), sorted."""
    return sorted({m.drafter_name for m in model.modules() if isinstance(m, DrafterProvider)})


def find_drafter(model: nn.Module, name: str) -> DrafterProvider:
    """The component of ``model`` that offers the drafter called ``name``; ValueError naming those offered."""
    for m in model.modules():
        if isinstance(m, DrafterProvider) and m.drafter_name == name:
            return m
    offered = ", ".join(drafter_names(model)) or "none"
    raise ValueError(f"the model has no component offering a drafter named {name!r} (offered: {offered})")


@torch.no_grad()
def speculative_generate(
    model: DSKModel,
    prompt: list[int],
    max_new_tokens: int,
    eos_id: int | None = None,
    *,
    drafter: str | DrafterProvider,
    max_drafts: int | None = None,
    sync_done: Callable[[bool], bool] | None = None,
) -> SpeculativeResult:
    """Greedy decoding where a drafter proposes tokens and the main model verifies them in one cached forward.

    Each round the drafter proposes up to ``max_drafts`` tokens ``d_1 .. d_d`` after the committed ``t_0 .. t_n``;
    the main model runs once on ``[t_n, d_1 .. d_d]``; the longest prefix of drafts equal to the main model's
    argmax is accepted, plus the main model's own next token; the caches are rolled back (``truncate``) past it.
    The main model picks every token, so the output equals greedy :func:`generate`'s whatever the drafter does;
    a good drafter only makes it faster (1 + accepted tokens per forward).

    Args:
        model: a :class:`DSKModel`.
        prompt: token ids (one sequence: batched rows would accept different numbers of drafts).
        max_new_tokens: most tokens to generate.
        eos_id: stop after producing it.
        drafter: the name of a drafter one of the model's components offers (:func:`find_drafter`), or a
            :class:`dsk.api.DrafterProvider`.
        max_drafts: most drafts per round (default: as many as the drafter proposes).
        sync_done: as in :func:`generate`: the rounds go on until every rank is done, a finished rank running one
            idle forward of the main model per round. Only the main model's forwards are kept in step: a drafter
            whose own forwards are collectives (MTP heads with sharded experts) is not made safe by it.
    """
    provider = find_drafter(model, drafter) if isinstance(drafter, str) else drafter
    P = _check_args(model, [prompt], max_new_tokens, 0.0, 1.0)
    if max_drafts is not None and max_drafts < 0:
        raise ValueError(f"max_drafts = {max_drafts}: must be >= 0")
    was_training = model.training
    model.eval()
    try:
        return _speculative(model, provider, prompt, P, max_new_tokens, eos_id, max_drafts, sync_done)
    finally:
        model.train(was_training)


def _speculative(model, provider, prompt, P, max_new_tokens, eos_id, max_drafts, sync_done) -> SpeculativeResult:
    device = model.embed_tokens.weight.device
    budget = min(max_new_tokens, model.config.max_seq_len - P)
    if budget == 0:
        return SpeculativeResult([], False, 0, 0, 0)
    # A round drafts at most budget - len(generated) - 1 tokens, so its block never passes slot P + budget - 1.
    max_len = P + budget
    caches = model.make_caches(1, max_len, device, model.embed_tokens.weight.dtype)
    draft = provider.make_drafter(model, max_len)

    out = model(torch.tensor([prompt], device=device), caches=caches, keep_logits=1)
    seq = [*prompt, int(out.logits[0, -1].argmax())]  # committed tokens t_0 .. t_n
    generated = [seq[-1]]
    draft.observe(seq, out.hidden[0])
    drafted = accepted = steps = 0
    stop = eos_id is not None and generated[-1] == eos_id
    while True:
        finished = len(generated) >= budget or stop
        if finished if sync_done is None else sync_done(finished):
            break
        if finished:
            _idle_forward(model, device, 0)  # keep pace with the ranks still generating
            continue
        n = len(seq) - 1  # t_n is committed but not yet fed to the main model
        limit = budget - len(generated) - 1
        if max_drafts is not None:
            limit = min(limit, max_drafts)
        drafts = [int(t) for t in draft.propose(limit)][:limit] if limit > 0 else []
        d = len(drafts)
        block = torch.tensor([[seq[n], *drafts]], device=device)  # (1, d+1) at positions n..n+d
        out = model(block, caches=caches)
        steps += 1
        greedy = out.logits[0].argmax(dim=-1).tolist()  # greedy[j]: the main model's t_{n+j+1}
        a = 0
        while a < d and drafts[a] == greedy[a]:
            a += 1
        drafted += d
        accepted += a
        for c in caches:
            c.truncate(n + a + 1)
        new = drafts[:a] + [greedy[a]]
        draft.observe(new, out.hidden[0, : a + 1])
        seq += new
        generated += new
        stop = eos_id is not None and eos_id in new
    tokens = generated[:budget]
    finished = False
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
        finished = True
    return SpeculativeResult(tokens, finished, drafted, accepted, steps)

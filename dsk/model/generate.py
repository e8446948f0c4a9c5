"""KV-cached batched sampling, and batched speculative decoding (greedy and sampled) driven by a drafter protocol.

Batching and positions: prompts of different lengths are right-padded to the longest one P for the prefill, so
row b's real tokens sit at slots and positions ``0 .. len_b-1``, exactly where they sit when the prompt runs
alone. Causal attention keeps every real token blind to the padding after it, so the prefill needs no mask; the
caches are then cut back row by row to each prompt (the attention-cache contract keeps a length per row, see
``dsk.api.AttentionCache``), and row b's next token goes to slot and position ``len_b``. A decode step attends
through a mask [B, 1, S] (True = may attend) that shows each row only its own slots. Nothing in a row's
computation depends on the other rows, so a batch generates what each prompt generates alone.

Speculative decoding (:func:`speculative_generate`) asks a component of the model for a drafter by name
(``dsk.api.generation.BatchDrafterProvider`` / ``BatchDrafter``, or the one-sequence ``dsk.api.DrafterProvider`` /
``Drafter``, run once per row); the loop here verifies its proposals with the main model and knows nothing of how
they were made. It batches as :func:`generate` does, each row accepting its own number of drafts: its caches are cut
back row by row (``truncate`` with a length tensor). Greedy, it returns what :func:`generate` does; sampling, it
accepts or rejects each draft by :func:`speculative_accept`, which keeps plain sampling's distribution exactly.

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

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsk.api import DrafterProvider
from dsk.api.generation import BatchDrafterProvider

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


#: A decode step whose widest GEMM has fewer multiply-adds than this runs on one thread. Measured on 2 cores: a
#: [2, 64] x [64, 384] product (a 2-token verify of the quickstart model) takes 4.3 us on one thread and 6.3 us on
#: two, a [16, 64] x [64, 384] one 7.4 us against 11.2 (the pool's wake-up costs more than the work it splits); at
#: [32, 64] x [64, 384] two threads win (23 against 26 us).
SINGLE_THREAD_DECODE_MACS = 300_000


@contextmanager
def _decode_threads(model: nn.Module, rows: int) -> Iterator[None]:
    """Decode steps of ``rows`` token rows on one thread when the model's widest GEMM (its largest 2-D weight, or
    slice of a stacked one) makes them that small (:data:`SINGLE_THREAD_DECODE_MACS`); the previous thread count
    after. CPU only, and a no-op where one thread is already the setting. The results do not depend on it (each
    row's products are the same)."""
    threads = torch.get_num_threads()
    small = False
    if threads > 1 and model.embed_tokens.weight.device.type == "cpu":
        widest = max((p.shape[-1] * p.shape[-2] for p in model.parameters() if p.dim() >= 2), default=0)
        small = rows * widest < SINGLE_THREAD_DECODE_MACS
    if not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    probs = _sampling_probs(logits, temperature, top_p)
    if uniform is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return _draw(probs, uniform)


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
    compact_finished: bool = True,
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
        compact_finished: drop finished rows from the forwards once they are half of the batch (greedy, or one
            generator per block of rows; caches with ``keep_rows``); the tokens are the same either way.
    """
    P = _check_args(model, prompts, max_new_tokens, temperature, top_p)
    generator = _check_generator(generator, len(prompts))
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id,
            sync_done, compact_finished,
        )  # fmt: skip
    finally:
        model.train(was_training)


def _generate(
    model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id, sync_done,
    compact_finished=True,
):  # fmt: skip
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
    # Rows with the same prompt (a GRPO group's completions) are prefilled once: the distinct prompts run, then
    # every cache repeats their rows (keep_rows) and the first logits are repeated alike. A row's computation never
    # depends on the others, so the tokens are those of the full prefill.
    row_of: dict[tuple[int, ...], int] = {}
    expand = [row_of.setdefault(tuple(p), len(row_of)) for p in prompts]  # row b's index among the distinct prompts
    first = [0] * len(row_of)
    for b in reversed(range(B)):
        first[expand[b]] = b  # each distinct prompt's first row
    dtype = model.embed_tokens.weight.dtype
    repeat = len(first) < B
    caches = model.make_caches(len(first) if repeat else B, P + budget, device, dtype)
    if repeat and not all(hasattr(c, "keep_rows") for c in caches):
        repeat, caches = False, model.make_caches(B, P + budget, device, dtype)
    rows_in = len(first) if repeat else B
    pre_ids, pre_lens = (ids[first], lens[first]) if repeat else (ids, lens)
    # Causal attention keeps every real token blind to the padding after it, so the prefill needs no mask.
    out = model(pre_ids, pos=torch.arange(P, device=device), caches=caches, keep_logits=1)
    if ragged:
        lens_host = pre_lens.cpu()  # cache lengths are host bookkeeping: one copy, not one per layer
        for c in caches:
            c.truncate(lens_host)  # each row keeps its prompt; its padding slots are overwritten by what it generates
    if ragged or sync_done is not None:
        # each row's last prompt token, where the padded prefill put it (synchronised: every rank calls the head
        # the same way, whether its own batch is ragged or not)
        logits = model.lm_head(out.hidden[torch.arange(rows_in, device=device), pre_lens - 1])  # (rows_in, V)
    else:
        logits = out.logits[:, -1]  # (rows_in, V)
    if repeat:
        rows = torch.tensor(expand, dtype=torch.long)
        for c in caches:
            c.keep_rows(rows)
        logits = logits[rows.to(device)]  # (B, V)
    blocks = generator if isinstance(generator, list) else None
    # Rows that have finished leave the forwards once they are at least half of the batch (the caches keep the rest,
    # keep_rows): a row's computation never depends on the others, and each step draws every row's uniform (or
    # none: greedy), so the tokens are those of the full batch. Not with torch.multinomial, whose draws depend on the
    # batch, nor with sync_done (every rank keeps its shapes), nor for caches without keep_rows.
    compact = (
        compact_finished
        and sync_done is None
        and (temperature == 0 or blocks is not None)
        and all(hasattr(c, "keep_rows") for c in caches)
    )
    live: torch.Tensor | None = None  # the full batch's rows that the caches and logits hold, once compacted
    lens_now, P_now = lens, P
    step = 0
    finished = False  # this rank's rows are all done (EOS or budget)
    with _decode_threads(model, B):
        while True:
            if not finished:
                if blocks is not None and temperature != 0:
                    u = _row_uniforms(blocks, B, device)
                    nxt = sample_next(logits, temperature, top_p, uniform=u if live is None else u[live])
                else:
                    nxt = sample_next(logits, temperature, top_p, generator)
                done_now = done if live is None else done[live]
                nxt = torch.where(done_now, torch.full_like(nxt, pad_id), nxt)
                rows = slice(None) if live is None else live
                tokens[rows, step] = nxt
                if return_logprobs:
                    lp = torch.log_softmax(logits.to(logps.dtype), dim=-1).gather(-1, nxt[:, None]).squeeze(-1)
                    logps[rows, step] = torch.where(done_now, torch.zeros_like(lp), lp)
                if eos_id is not None:
                    hit = ~done_now & (nxt == eos_id)
                    length[rows] = torch.where(hit, torch.full_like(hit, step + 1, dtype=length.dtype), length[rows])
                    done[rows] = done_now | hit
                finished = step == budget - 1 or bool(done.all())
            if finished if sync_done is None else sync_done(finished):
                break
            if finished:
                _idle_forward(model, device, pad_id)  # keep pace with the ranks still generating
                continue
            if compact:
                going = (~(done if live is None else done[live])).nonzero().squeeze(1)  # positions in the current batch
                if going.numel() * 2 <= nxt.shape[0]:
                    for c in caches:
                        c.keep_rows(going)
                    nxt, lens_now = nxt[going], lens_now[going]
                    live = going if live is None else live[going]
                    P_now = int(lens_now.max())
                    ragged = bool((lens_now != P_now).any())
            step_mask = None
            if ragged:
                # row b's new token sits at slot lens[b] + step and sees the slots up to it; built once for all layers
                step_mask = (
                    torch.arange(P_now + step + 1, device=device)[None, None, :] <= (lens_now + step)[:, None, None]
                )
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
    """Output of :func:`speculative_generate` for one prompt (a flat list of token ids).

    Attributes:
        tokens: generated ids (EOS included when produced); greedy: equal to :func:`generate`'s.
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


@dataclass
class SpeculativeBatchResult(GenerationResult):
    """Output of :func:`speculative_generate` for a batch of prompts: :class:`GenerationResult` plus per-row counts.

    Attributes:
        drafted: per row, draft tokens proposed while the row was unfinished.
        accepted: per row, drafts the main model confirmed (and the row kept: not past its EOS or budget).
        verify_steps: main-model forwards after the prefill (the batch's, shared by all rows).
    """

    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        """All rows' accepted / drafted (0 when nothing was drafted)."""
        total = sum(self.drafted)
        return sum(self.accepted) / total if total else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens per row and main-model forward, the prefill included."""
        return sum(self.lengths) / (len(self.lengths) * (self.verify_steps + 1))


def _offers_drafter(m: nn.Module) -> bool:
    # the attribute first: a runtime-checkable protocol's isinstance costs ~30 us, times every module of the model
    return hasattr(m, "drafter_name") and isinstance(m, (BatchDrafterProvider, DrafterProvider))


def drafter_names(model: nn.Module) -> list[str]:
    """The names of the drafters the model's components offer (:class:`dsk.api.generation.BatchDrafterProvider`
    or :class:`dsk.api.DrafterProvider`), sorted."""
    return sorted({m.drafter_name for m in model.modules() if _offers_drafter(m)})


def find_drafter(model: nn.Module, name: str) -> BatchDrafterProvider | DrafterProvider:
    """The component of ``model`` that offers the drafter called ``name``; ValueError naming those offered."""
    for m in model.modules():
        if _offers_drafter(m) and m.drafter_name == name:
            return m
    offered = ", ".join(drafter_names(model)) or "none"
    raise ValueError(f"the model has no component offering a drafter named {name!r} (offered: {offered})")


def _draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw, probs [N, V] (unnormalised allowed) and u [N] in [0, 1) -> tokens [N].

    The first token whose cumulative mass exceeds ``u * total`` (right=True: a zero-probability token is never
    drawn)."""
    cdf = probs.cumsum(dim=-1)  # (N, V)
    at = (u.to(cdf.dtype)[:, None] * cdf[:, -1:]).contiguous()
    return torch.searchsorted(cdf, at, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def _sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution plain sampling draws from: logits [..., V] -> top-p filtered softmax(logits / T) [..., V]."""
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    return top_p_filter(probs.reshape(-1, probs.shape[-1]), top_p).view(probs.shape)


def speculative_accept(
    p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of speculative sampling's accept/reject (Leviathan et al. 2023, Chen et al. 2023), row by row.

    Draft ``x_j`` (j = 1..d) is accepted while ``u_j < min(1, p_{j-1}(x_j) / q_j(x_j))``; at the first rejection
    (a drafts accepted) the next token is drawn from ``norm(max(0, p_a - q_{a+1}))``, and after d acceptances from
    ``p_d`` (the bonus token). Every committed token then has exactly the distribution ``p`` gives it.

    Args:
        p: [B, d+1, V] the main model's sampling distributions at the block's positions (``p[:, j]`` follows the
            committed tokens and drafts ``x_1 .. x_j``).
        q: [B, d, V] the distributions the drafts were drawn from, or None: certain drafts (a point mass each).
        drafts: [B, d] the draft tokens.
        u: [B, d+1] uniforms in [0, 1): ``u[:, :d]`` for the tests, ``u[:, d]`` for the final draw.

    Returns:
        (accepted [B] in 0..d, next token [B]).
    """
    B, T, V = p.shape
    d = T - 1
    if d == 0:
        return torch.zeros(B, dtype=torch.long, device=p.device), _draw(p[:, 0], u[:, 0])
    p_x = p[:, :d].gather(-1, drafts[..., None]).squeeze(-1)  # (B, d): p_{j-1}(x_j)
    q_x = torch.ones_like(p_x) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1).to(p_x.dtype)
    ok = u[:, :d].to(p_x.dtype) * q_x < p_x  # u < p/q without dividing (u < 1 makes the min(1, .) implicit)
    a = ok.long().cumprod(dim=1).sum(dim=1)  # (B,) leading acceptances
    p_a = p.gather(1, a[:, None, None].expand(B, 1, V)).squeeze(1)  # (B, V)
    j = a.clamp(max=d - 1)  # the rejected draft's index (unused where a == d)
    if q is None:
        q_a = torch.nn.functional.one_hot(drafts.gather(1, j[:, None]).squeeze(1), V).to(p_a.dtype)
    else:
        q_a = q.gather(1, j[:, None, None].expand(B, 1, V)).squeeze(1).to(p_a.dtype)
    residual = torch.where((a == d)[:, None], p_a, (p_a - q_a).clamp(min=0))
    # p == q on a row leaves no residual mass, and then the rejection had probability 0: draw from p
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_a)
    return a, _draw(residual, u[:, d])


def _uniform_source(generator, B: int, device: torch.device) -> Callable[[int], torch.Tensor]:
    """``uniforms(k) -> [B, k]`` from one generator (or the default one), or per block of rows from its own."""
    if isinstance(generator, list):
        per = B // len(generator)
        return lambda k: torch.cat([torch.rand((per, k), generator=g, device=g.device) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return lambda k: torch.rand((B, k), generator=generator, device=gen_device).to(device)


class _PerRowDrafters:
    """A batch drafter made of one one-sequence :class:`dsk.api.Drafter` per row (an older provider's form).

    Its drafts are certain (no distribution), and rows that propose fewer than the widest row are padded with
    their last draft, which the verifier judges like any other.
    """

    def __init__(self, provider: DrafterProvider, model: nn.Module, batch: int, max_len: int, max_drafts: int | None):
        self.rows = [provider.make_drafter(model, max_len) for _ in range(batch)]
        self.max_drafts = max_drafts
        self.device = model.embed_tokens.weight.device
        self.live = [True] * batch

    def begin(self, prompts, lengths, hidden, first) -> None:
        for b, row in enumerate(self.rows):
            n = int(lengths[b])
            row.observe([*prompts[b, :n].tolist(), int(first[b])], hidden[b, :n])

    def observe(self, tokens, counts, hidden) -> None:
        for b, row in enumerate(self.rows):
            c = int(counts[b])
            if c:
                row.observe(tokens[b, :c].tolist(), hidden[b, :c])
            else:
                self.live[b] = False  # finished: proposing for it again would only cost

    def propose(self, limit, sample):
        rows = [
            [int(t) for t in row.propose(limit)][:limit] if live else []
            for row, live in zip(self.rows, self.live, strict=True)
        ]
        width = max(len(r) for r in rows)
        padded = [r + [r[-1] if r else 0] * (width - len(r)) for r in rows]
        return torch.tensor(padded, dtype=torch.long, device=self.device).view(len(rows), width), None


@torch.no_grad()
def speculative_generate(
    model: DSKModel,
    prompt: list[int] | list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    *,
    drafter: str | BatchDrafterProvider | DrafterProvider,
    max_drafts: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    return_logprobs: bool = False,
    pad_id: int = 0,
    sync_done: Callable[[bool], bool] | None = None,
) -> SpeculativeResult | SpeculativeBatchResult:
    """Decoding where a drafter proposes tokens and the main model verifies them in one cached forward per round.

    Each round the drafter proposes up to ``max_drafts`` tokens ``x_1 .. x_d`` per row after its committed
    ``t_0 .. t_n``; the main model runs once on ``[t_n, x_1 .. x_d]`` for every row; greedy (temperature 0)
    accepts the longest prefix of drafts equal to the main model's argmax, sampling accepts by
    :func:`speculative_accept`; then the main model's own next token follows, and the caches are rolled back
    (``truncate``, row by row) past it. Greedy output equals :func:`generate`'s token for token, sampled output has
    exactly its distribution, whatever the drafter does; a good drafter only makes it faster (1 + accepted tokens
    per forward).

    Batching is :func:`generate`'s (right-padded prefill, a length per cache row, rows independent): rows accept
    different numbers of drafts and stop at their own EOS; a round drafts as many tokens for every row, and a
    finished row's cache rows follow the running rows' (or are emptied) so that it costs no room.

    Args:
        model: a :class:`DSKModel`.
        prompt: token ids of one sequence (returns a :class:`SpeculativeResult`), or a list of them (a batch:
            returns a :class:`SpeculativeBatchResult`).
        max_new_tokens: most tokens to generate per row (fewer where max_seq_len is reached).
        eos_id: a row stops after producing it.
        drafter: the name of a drafter one of the model's components offers (:func:`find_drafter`), or the
            provider itself (a :class:`dsk.api.generation.BatchDrafterProvider`, or a one-sequence
            :class:`dsk.api.DrafterProvider`, run once per row).
        max_drafts: most drafts per round (default: the drafter's ``max_drafts``; a one-sequence drafter is only
            limited by the budget).
        temperature: 0 = greedy; above, speculative sampling at this temperature (the drafter draws at it too).
        top_p: nucleus mass, applied to the main model's and the drafter's distributions alike (1 = off).
        generator: as in :func:`generate`: one generator, or one per block of consecutive rows.
        return_logprobs: also return each generated token's log-probability under the main model (batch only;
            see :class:`GenerationResult`).
        pad_id: id of the padding after shorter prompts and after a row's end.
        sync_done: as in :func:`generate`: the rounds go on until every rank is done, a finished rank running one
            idle forward of the main model per round. Only the main model's forwards are kept in step: a drafter
            whose own forwards are collectives (MTP heads with sharded experts) is not made safe by it.
    """
    one = bool(prompt) and not isinstance(prompt[0], (list, tuple))
    prompts = [list(prompt)] if one else [list(p) for p in prompt]
    provider = find_drafter(model, drafter) if isinstance(drafter, str) else drafter
    P = _check_args(model, prompts, max_new_tokens, temperature, top_p)
    if max_drafts is not None and max_drafts < 0:
        raise ValueError(f"max_drafts = {max_drafts}: must be >= 0")
    generator = _check_generator(generator, len(prompts))
    was_training = model.training
    model.eval()
    try:
        res = _speculative(
            model, provider, prompts, P, max_new_tokens, eos_id, max_drafts, temperature, top_p, generator,
            return_logprobs, pad_id, sync_done,
        )  # fmt: skip
    finally:
        model.train(was_training)
    if one:
        return SpeculativeResult(res.tokens[0], res.finished[0], res.drafted[0], res.accepted[0], res.verify_steps)
    return res


def _check_generator(generator, rows: int):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    generator = list(generator)
    if not generator or rows % len(generator):
        raise ValueError(f"{len(generator)} generators do not split {rows} prompts into equal blocks")
    return generator


def _round_geometry(lengths: list[int], T: int, device: torch.device):
    """Positions and mask of T new tokens per row after caches of ``lengths`` (one per row): ([T], None) when the
    rows agree, else ([B, T], mask [B, T, S]) with S = max(lengths) + T; built once for all layers."""
    steps = torch.arange(T, device=device)
    first = lengths[0]
    if all(x == first for x in lengths):
        return steps + first, None
    pos = torch.tensor(lengths, device=device)[:, None] + steps  # (B, T): row b's slots are its positions
    keys = torch.arange(max(lengths) + T, device=device)
    return pos, keys[None, None, :] <= pos[:, :, None]  # (B, T, S)


def _finished_rows_follow(held: list[int], done: list[bool], n: list[int]) -> list[int]:
    """The main caches' lengths for the next round, one per row: row b's ``n_b`` while it runs; a finished row,
    whose cache nobody reads again, follows the running rows' common length where they have one and its cache
    (``held``, the lengths after the last forward) allows, so that the batch keeps the caches' equal-length path;
    else 0."""
    running = [x for x, d in zip(n, done, strict=True) if not d]
    if running and all(x == running[0] for x in running):
        r = running[0]
        if all(h >= r for h, d in zip(held, done, strict=True) if d):
            return [r if d else x for d, x in zip(done, n, strict=True)]
    return [0 if d else x for d, x in zip(done, n, strict=True)]


def _truncate(caches: Sequence[Any], lengths: list[int]) -> None:
    """Cut every cache back to ``lengths`` (one per row); an int when the rows agree (the caches' cheap path)."""
    first = lengths[0]
    length: int | torch.Tensor = first if all(x == first for x in lengths) else torch.tensor(lengths)
    for c in caches:
        c.truncate(length)


def _speculative(
    model, provider, prompts, P, max_new_tokens, eos_id, max_drafts, temperature, top_p, generator, return_logprobs,
    pad_id, sync_done,
) -> SpeculativeBatchResult:  # fmt: skip
    device = model.embed_tokens.weight.device
    B = len(prompts)
    budget = min(max_new_tokens, model.config.max_seq_len - P)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)  # CPU bookkeeping
    if budget == 0:
        empty = [[] for _ in prompts]
        return SpeculativeBatchResult(
            empty, [0] * B, [False] * B, [True] * B, [[] for _ in prompts] if return_logprobs else None,
            drafted=[0] * B, accepted=[0] * B,
        )  # fmt: skip
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # building the batch, not a per-token loop
        ids[b, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)

    # Row b commits at most P_b + budget tokens (the drafter's max_len). Its cache also holds the drafts of the
    # round that verifies its last tokens: at most D - 1 slots past that, capped by max_seq_len (then the rounds
    # draft fewer).
    if isinstance(provider, BatchDrafterProvider):
        draft = provider.make_batch_drafter(model, B, P + budget)
        D = int(draft.max_drafts) if max_drafts is None else min(max_drafts, int(draft.max_drafts))
    else:
        draft = _PerRowDrafters(provider, model, B, P + budget, max_drafts)
        D = budget if max_drafts is None else max_drafts
    D = min(D, budget)
    cache_len = min(model.config.max_seq_len, P + budget + max(D - 1, 0))
    caches = model.make_caches(B, cache_len, device, model.embed_tokens.weight.dtype)
    greedy = temperature == 0
    uniforms = _uniform_source(generator, B, device)

    def sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The drafter's sampler (dsk.api.generation.DraftSampler): logits [B, V] -> (tokens [B], probs [B, V])."""
        if greedy:
            return logits.argmax(dim=-1), None
        probs = _sampling_probs(logits, temperature, top_p)
        return _draw(probs, uniforms(1)[:, 0]), probs

    out = model(ids, pos=torch.arange(P, device=device), caches=caches, keep_logits=1)
    ragged = bool((lens != P).any())
    if ragged:
        _truncate(caches, lens.tolist())  # each row keeps its prompt
        logits = model.lm_head(out.hidden[torch.arange(B, device=device), lens.to(device) - 1])  # (B, V)
    else:
        logits = out.logits[:, -1]  # (B, V)
    last = sample(logits)[0]  # (B,) the first generated token, t_{n_b}
    draft.begin(ids, lens, out.hidden, last)

    # The rows' bookkeeping is host lists: per round it costs a few list operations and two small device-to-host
    # copies, where tensor ops took ~70 dispatches, each dearer than its arithmetic at these sizes (about as much
    # as a decode layer of the quickstart model per round, which speculation pays on top of its forwards).
    last_l = last.tolist()
    out_tokens = [[t] for t in last_l]
    lp_dtype = torch.promote_types(model.lm_head.weight.dtype, torch.float32)
    out_lps = None
    if return_logprobs:
        first_lp = torch.log_softmax(logits.to(lp_dtype), dim=-1).gather(-1, last[:, None]).squeeze(-1)
        out_lps = [[x] for x in first_lp.tolist()]
    n = lens.tolist()  # row b's t_{n_b} is committed, not yet fed (the main caches hold n_b tokens of a running row)
    g = [1] * B  # tokens generated
    ended = [eos_id is not None and t == eos_id for t in last_l]  # stopped at EOS
    done = [e or 1 >= budget for e in ended]
    drafted, accepted = [0] * B, [0] * B
    steps = 0
    held = list(n)  # what the main caches hold per row
    if any(done):
        held = _finished_rows_follow(held, done, n)
        _truncate(caches, held)
    with _decode_threads(model, B * (D + 1)):
        while True:
            finished = all(done)
            if finished if sync_done is None else sync_done(finished):
                break
            if finished:
                _idle_forward(model, device, pad_id)  # keep pace with the ranks still generating
                continue
            running = [b for b in range(B) if not done[b]]
            # drafts this round: what the drafter may give, what the neediest row can still use, what the caches hold
            d = min(D, max(budget - g[b] for b in running) - 1, cache_len - 1 - max(n[b] for b in running))
            if d > 0:
                xs, q = draft.propose(d, sample)
                xs, d = xs[:, :d].to(device=device, dtype=torch.long), min(d, xs.shape[1])
                q = q[:, :d] if q is not None else None
            else:
                xs, q, d = torch.empty((B, 0), dtype=torch.long, device=device), None, 0
            T = d + 1
            block = torch.cat([last[:, None], xs], dim=1)  # (B, T) at positions n_b .. n_b + d
            pos, mask = _round_geometry(held, T, device)
            out = model(block, pos=pos, mask=mask, caches=caches)
            steps += 1
            if greedy:
                new = out.logits.argmax(dim=-1)  # (B, T): the main model's own token after each block position
                new_l, xs_l = new.tolist(), xs.tolist()
                # row b commits new[b, :a_b + 1]: its accepted drafts equal the targets
                a_l = [next((j for j in range(d) if x[j] != t[j]), d) for x, t in zip(xs_l, new_l, strict=True)]
            else:
                p = _sampling_probs(out.logits, temperature, top_p)  # (B, T, V)
                a, nxt = speculative_accept(p, q, xs, uniforms(T))
                new = torch.cat([xs, nxt[:, None]], dim=1).scatter_(1, a[:, None], nxt[:, None])
                new_l, a_l = new.tolist(), a.tolist()
            lp_l = None
            if return_logprobs:
                lp_l = (
                    torch.log_softmax(out.logits.to(lp_dtype), dim=-1).gather(-1, new[..., None]).squeeze(-1).tolist()
                )
            # each row's count: its accepted drafts and the next token, cut at its budget and after its first EOS
            counts = [0] * B
            for b in running:
                row = new_l[b]
                c = min(a_l[b] + 1, budget - g[b])
                if eos_id is not None and eos_id in row[:c]:
                    c = row.index(eos_id) + 1
                    ended[b] = True
                counts[b] = c
                out_tokens[b] += row[:c]
                if lp_l is not None:
                    out_lps[b] += lp_l[b][:c]
                last_l[b] = row[c - 1]
                drafted[b] += d
                accepted[b] += min(a_l[b], c)
                g[b] += c
                n[b] += c
                done[b] = ended[b] or g[b] >= budget
            last = torch.tensor(last_l, dtype=torch.long, device=device)
            held = _finished_rows_follow([h + T for h in held], done, n)
            _truncate(caches, held)
            draft.observe(new, torch.tensor(counts, dtype=torch.long), out.hidden)
    return SpeculativeBatchResult(
        out_tokens, g, ended, [not e for e in ended], out_lps, drafted=drafted, accepted=accepted, verify_steps=steps,
    )  # fmt: skip

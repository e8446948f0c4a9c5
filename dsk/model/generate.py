"""KV-cached batched sampling and MTP speculative decoding.

Batching and positions: prompts of different lengths are left-padded to the longest one P. The attention
contract shares one ``pos`` [T] across the batch, so row b's real tokens sit at positions ``pad_b .. P-1``
instead of ``0 .. len_b-1``. That is harmless: RoPE makes ``q_i . k_j`` depend only on ``i - j``, so shifting
all of a row's positions by the constant ``pad_b`` leaves every attention score unchanged (YaRN rescales
frequencies, not positions, so it stays relative). The padded keys are masked out (mask [B,T,S], True = may
attend); a padding query may attend to itself only, so its softmax row is never empty (no NaN), and its
output is never read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

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
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick one token per row from logits [B, V] -> [B]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    probs = top_p_filter(probs, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
    generator: torch.Generator | None = None,
    *,
    return_logprobs: bool = False,
    pad_id: int = 0,
) -> GenerationResult:
    """Sample continuations of a batch of prompts with a KV cache (one forward per decode step).

    Args:
        model: a :class:`DSKModel` (put in eval mode for the call).
        prompts: token ids per row; rows may differ in length (left-padded with ``pad_id``).
        max_new_tokens: most tokens generated per row (fewer when max_seq_len is reached: ``truncated``).
        temperature: softmax temperature; 0 = greedy.
        top_p: nucleus sampling mass (1 = off).
        eos_id: a row stops after producing it; other rows go on.
        generator: torch generator for reproducible sampling.
        return_logprobs: also return each sampled token's log-probability (see :class:`GenerationResult`).
        pad_id: id written into padding and into the slots after a row's EOS (never attended to by real tokens).
    """
    P = _check_args(model, prompts, max_new_tokens, temperature, top_p)
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id
        )
    finally:
        model.train(was_training)


def _generate(model, prompts, P, max_new_tokens, temperature, top_p, eos_id, generator, return_logprobs, pad_id):
    device = model.embed_tokens.weight.device
    B = len(prompts)
    budget = min(max_new_tokens, model.config.max_seq_len - P)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):  # building the batch, not a per-token loop
        ids[b, P - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)

    tokens = torch.full((B, budget), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros(
        (B, budget), device=device, dtype=torch.promote_types(model.lm_head.weight.dtype, torch.float32)
    )
    length = torch.full((B,), budget, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if budget == 0:
        return _result(tokens, length, done, logps if return_logprobs else None)

    padded = bool((lens != P).any())
    # key_ok[b, s]: key position s holds a real token of row b (prompt or generated).
    key_ok = torch.ones((B, P + budget), dtype=torch.bool, device=device)
    key_ok[:, :P] = torch.arange(P, device=device)[None, :] >= (P - lens)[:, None]
    mask = None
    if padded:
        causal = torch.ones((P, P), dtype=torch.bool, device=device).tril()
        mask = (causal[None] & key_ok[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]  # (B,P,P)

    caches = model.make_caches(B, P + budget, device, model.embed_tokens.weight.dtype)
    out = model(ids, pos=torch.arange(P, device=device), mask=mask, caches=caches, keep_logits=1)
    logits = out.logits[:, -1]  # (B, V)
    for step in range(budget):
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
        if step == budget - 1 or bool(done.all()):
            break
        S = P + step + 1
        step_mask = key_ok[:, None, :S] if padded else None  # (B, 1, S)
        pos = torch.tensor([P + step], device=device)
        logits = model(nxt[:, None], pos=pos, mask=step_mask, caches=caches).logits[:, -1]
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


# -- speculative decoding with the MTP heads -----------------------------------------------------------
@dataclass
class SpeculativeResult:
    """Output of :func:`speculative_generate` (one prompt).

    Attributes:
        tokens: generated ids (EOS included when produced); equal to greedy :func:`generate`'s.
        finished: stopped at ``eos_id``.
        drafted: MTP draft tokens proposed in total.
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


@torch.no_grad()
def speculative_generate(
    model: DSKModel, prompt: list[int], max_new_tokens: int, eos_id: int | None = None, *, depth: int | None = None
) -> SpeculativeResult:
    """Greedy decoding where the MTP heads draft tokens and the main model verifies them in one cached forward.

    Each round: depth k drafts ``t_{n+k}`` (chained: depth k reads depth k-1's hidden state at the last position
    and the previous draft's embedding); the main model runs on ``[t_n, d_1 .. d_d]``; the longest prefix of
    drafts equal to the main model's argmax is accepted, plus the main model's next token; caches are rolled back
    with ``truncate``. The main model picks every token, so the output equals greedy :func:`generate`'s.

    Args:
        model: a :class:`DSKModel` with MTP heads (``model.mtp``).
        prompt: token ids (batch of one: rows would accept different numbers of drafts, and the attention contract
            keeps one cache length for all rows).
        max_new_tokens: most tokens to generate.
        eos_id: stop after producing it.
        depth: number of drafts per round (default: all of ``model.mtp.depth``).
    """
    mtp = model.mtp
    if mtp is None:
        raise ValueError("the model has no MTP heads (model.mtp); speculative decoding needs them")
    P = _check_args(model, [prompt], max_new_tokens, 0.0, 1.0)
    D = mtp.depth if depth is None else min(depth, mtp.depth)
    was_training = model.training
    model.eval()
    try:
        return _speculative(model, mtp, prompt, P, max_new_tokens, eos_id, D)
    finally:
        model.train(was_training)


def _speculative(model, mtp, prompt, P, max_new_tokens, eos_id, D) -> SpeculativeResult:
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    cap = model.config.max_seq_len
    budget = min(max_new_tokens, cap - P)
    if budget == 0:
        return SpeculativeResult([], False, 0, 0, 0)
    cache_len = min(P + budget + D, cap)
    caches = model.make_caches(1, cache_len, device, dtype)
    mtp_caches = mtp.make_caches(1, cache_len, device, dtype)

    out = model(torch.tensor([prompt], device=device), caches=caches, keep_logits=1)
    # hid[k, i] = h^k_i (k = 0: the main model's final-norm output), preallocated so a round writes O(D) rows.
    # valid[k]: depth k's cache holds positions 0..valid[k]-1 computed from committed tokens only, to be kept.
    hid = out.hidden.new_empty((D + 1, cache_len, out.hidden.shape[-1]))
    hid[0, :P] = out.hidden[0]
    valid = [0] * (D + 1)
    seq = [*prompt, int(out.logits[0, -1].argmax())]  # committed tokens t_0 .. t_n
    generated = [seq[-1]]
    drafted = accepted = steps = 0
    stop = eos_id is not None and generated[-1] == eos_id
    while len(generated) < budget and not stop:
        n = len(seq) - 1  # t_n is committed but not yet fed to the main model
        d = min(D, budget - len(generated) - 1, cache_len - n - 1)
        drafts: list[int] = []
        for k in range(1, d + 1):
            L = valid[k]
            mtp_caches[k - 1].truncate(L)
            # depth k at positions L..n-1 reads h^{k-1} there and t_{i+k}, which runs past t_n into the drafts
            toks = torch.tensor([(seq[L + k :] + drafts)[: n - L]], device=device)
            h_k, logits = mtp.step(
                k,
                hid[k - 1, L:n][None],
                toks,
                model.embed_tokens,
                model.lm_head,
                pos=torch.arange(L, n, device=device),
                cache=mtp_caches[k - 1],
            )
            hid[k, L:n] = h_k[0]
            drafts.append(int(logits[0, -1].argmax()))
        block = torch.tensor([[seq[n], *drafts]], device=device)  # (1, d+1) at positions n..n+d
        out = model(block, caches=caches)
        steps += 1
        greedy = out.logits[0].argmax(dim=-1).tolist()  # greedy[j]: the main model's t_{n+j+1}
        a = 0
        while a < d and drafts[a] == greedy[a]:
            a += 1
        drafted += d
        accepted += a
        for k in range(1, d + 1):
            # position i of depth k read tokens up to t_{i+k}; those up to t_{n+a} are now committed
            valid[k] = max(0, min(n, n + a - k + 1))
        for c in caches:
            c.truncate(n + a + 1)
        hid[0, n : n + a + 1] = out.hidden[0, : a + 1]
        new = drafts[:a] + [greedy[a]]
        seq += new
        generated += new
        stop = eos_id is not None and eos_id in new
    tokens = generated[:budget]
    finished = False
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id) + 1]
        finished = True
    return SpeculativeResult(tokens, finished, drafted, accepted, steps)

"""Contracts of KV-cached generation: the attention cache, and the drafters of speculative decoding.

Torch-free (torch types are named under ``TYPE_CHECKING`` only); :mod:`dsk.api` re-exports the attention cache and
the one-sequence drafter protocols. The callers are the core's generation loops (:func:`dsk.api.runtime.generate`,
:func:`dsk.api.runtime.speculative_generate`); a plugin implements these.

Two drafter forms: :class:`BatchDrafter` (offered by a :class:`BatchDrafterProvider`) drafts for every row of a
batch at once, with the draft distributions speculative *sampling* needs; :class:`Drafter` (offered by a
:class:`DrafterProvider`) is the older one-sequence, greedy form. The loop runs a one-sequence drafter per row and
treats its proposals as certain (a point-mass draft distribution), which keeps sampling exact, only accepting less.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["AttentionCache", "BatchDrafter", "BatchDrafterProvider", "DraftSampler", "Drafter", "DrafterProvider"]


@runtime_checkable
class AttentionCache(Protocol):
    """One layer's KV cache, as an attention component's ``make_cache(batch, max_len, device, dtype)`` returns it.

    Each batch row has its own length: row b holds its first ``lengths[b]`` tokens. A forward ``attention(x, pos,
    mask, cache)`` with T new tokens writes row b's at slots ``lengths[b] .. lengths[b] + T - 1`` and lets them
    attend over that row's own tokens only (causally, when ``mask`` is None); an explicit mask is
    ``[B, T, max(lengths) + T]``. Rows may differ (prompts of different lengths, speculative rows that accepted
    different numbers of drafts) with no change to this contract. What the buffers hold is the attention's own
    layout.

    Attributes:
        lengths: LongTensor [B] on the CPU, tokens cached per row (bookkeeping: reading it never waits for the
            device).
        max_len: token slots per row.
    """

    @property
    def lengths(self) -> torch.Tensor: ...

    @property
    def max_len(self) -> int: ...

    def positions(self, n: int) -> torch.Tensor:
        """Positions of the next ``n`` tokens on the cache's device: LongTensor ``[n]`` (``length + arange(n)``)
        when all rows hold the same length, else ``[B, n]`` (``lengths[:, None] + arange(n)``); attention
        components take either as ``pos``."""
        ...

    def truncate(self, length: int | torch.Tensor) -> None:
        """Roll back to ``length`` tokens per row: an int for every row, or a LongTensor [B] row by row.

        A row only shrinks (``0 <= length[b] <= lengths[b]``, else ValueError); the other rows are left as they are.
        """
        ...

    # Optional: ``keep_rows(rows: LongTensor) -> None`` keeps only batch rows ``rows`` (row i becomes old row
    # ``rows[i]``, its tokens and length unchanged). Where every cache of a model has it, generation drops the rows
    # that have finished from its forwards; without it every row runs to the end (the tokens are the same).


@runtime_checkable
class Drafter(Protocol):
    """Proposes tokens for one sequence in greedy speculative decoding; the core's loop verifies them.

    The loop holds committed tokens ``t_0 .. t_m``, all but the last already fed through the main model. It calls
    :meth:`observe` after the prefill and after every verifying forward, and :meth:`propose` before every
    verifying forward. Proposals never change the output (the main model picks every token); they only save
    forwards when they are right.
    """

    def observe(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """Take what was committed since the last call.

        Args:
            tokens: new committed tokens, extending ``t_0 .. t_m`` (the prefill: the prompt and the model's first
                token; a round: the accepted drafts, then the main model's own next token).
            hidden: [N, D] the main model's final-norm hidden states at the newly fed committed positions, in
                order (the prefill: one per prompt token; a round: one per accepted draft plus one). After every
                call there is one hidden row per committed token except the last.
        """
        ...

    def propose(self, limit: int) -> list[int]:
        """At most ``limit`` (>= 1) tokens guessed to follow ``t_m``.

        The loop accepts the longest prefix that equals the main model's greedy tokens; the next :meth:`observe`
        starts with exactly those, so the drafter rolls its own state (caches) back from it.
        """
        ...


@runtime_checkable
class DrafterProvider(Protocol):
    """A model component that offers a :class:`Drafter` by name (``dsk generate --speculative NAME``).

    The core finds it by walking the model's modules for a provider whose ``drafter_name`` matches, so it never
    names a technique.

    Attributes:
        drafter_name: the name users select it by; by convention the name its component is registered under.
    """

    drafter_name: str

    def make_drafter(self, model: Any, max_len: int) -> Drafter:
        """A fresh drafter for one sequence of at most ``max_len`` tokens (prompt included) generated by ``model``
        (the whole model, whose embedding and output head a drafter may share)."""
        ...


#: The loop's sampler that a :class:`BatchDrafter` draws its drafts with: ``sample(logits [B, V]) -> (tokens [B],
#: probs [B, V] | None)``. It applies the loop's temperature and top-p and draws from the loop's random source;
#: ``probs`` is the distribution the tokens were drawn from (None when decoding greedily: then the tokens are the
#: argmax).
DraftSampler = Callable[["torch.Tensor"], "tuple[torch.Tensor, torch.Tensor | None]"]


@runtime_checkable
class BatchDrafter(Protocol):
    """Proposes tokens for every row of a batch in speculative decoding; the core's loop verifies them.

    Row b holds committed tokens ``t_0 .. t_{n_b}``, all but the last already fed through the main model (so the
    main model's final-norm hidden state ``h_i`` is known for ``i < n_b``). The loop calls :meth:`begin` after the
    prefill, then each round :meth:`propose` and, after the verifying forward, :meth:`observe`. Rows differ in
    ``n_b`` and in how many drafts they accept. A finished row still takes part (its proposals are ignored, and
    :meth:`observe` commits nothing to it).

    Greedy decoding accepts the longest prefix of drafts equal to the main model's argmax; sampling accepts draft
    ``x`` with probability ``min(1, p(x) / q(x))`` and on rejection draws from ``norm(max(0, p - q))`` (Leviathan
    et al., Chen et al. 2023), so the output has exactly the main model's distribution whatever the drafts are;
    good drafts only save forwards.

    Attributes:
        max_drafts: most tokens one :meth:`propose` returns (the loop sizes its caches for it).
    """

    max_drafts: int

    def begin(self, prompts: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor, first: torch.Tensor) -> None:
        """Take the prefill.

        Args:
            prompts: [B, P] the prompts, right-padded (row b's are ``prompts[b, :lengths[b]]``).
            lengths: LongTensor [B] on the CPU, prompt lengths.
            hidden: [B, P, D] the main model's final-norm hidden states at the prompt positions.
            first: [B] the first generated token of each row (``t_{n_b}``, ``n_b = lengths[b]``).
        """
        ...

    def observe(self, tokens: torch.Tensor, counts: torch.Tensor, hidden: torch.Tensor) -> None:
        """Take a round's verdict: row b fed ``t_{n_b}`` and its drafts at positions ``n_b ..`` and committed
        ``counts[b]`` new tokens.

        Args:
            tokens: [B, T] row b's newly committed tokens are ``tokens[b, :counts[b]]`` (the accepted drafts, then
                the main model's own token), ``t_{n_b+1} ..``.
            counts: LongTensor [B] on the CPU; 0 for a finished row.
            hidden: [B, T, D] the main model's final-norm hidden states of the verifying forward; those at the
                newly fed committed positions ``n_b .. n_b + counts[b] - 1`` are ``hidden[b, :counts[b]]``.
        """
        ...

    def propose(self, limit: int, sample: DraftSampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Up to ``limit`` (>= 1) drafts per row, ``t_{n_b+1} ..``: (tokens [B, d], probs [B, d, V] | None), d <= limit.

        Each draft is drawn with ``sample`` from the drafter's own logits (:data:`DraftSampler`), and ``probs[b, j]``
        is the distribution ``tokens[b, j]`` was drawn from, ``q`` in the acceptance rule; None means the drafts are
        certain (a point mass at each token: exact, but accepted with ``p(x)`` only).
        """
        ...


@runtime_checkable
class BatchDrafterProvider(Protocol):
    """A model component that offers a :class:`BatchDrafter` by name (``dsk generate --speculative NAME``).

    The core prefers it to a :class:`DrafterProvider`'s one-sequence drafter when a component offers both.

    Attributes:
        drafter_name: the name users select it by; by convention the name its component is registered under.
    """

    drafter_name: str

    def make_batch_drafter(self, model: Any, batch: int, max_len: int) -> BatchDrafter:
        """A fresh drafter for ``batch`` rows of at most ``max_len`` tokens each (prompt included) generated by
        ``model`` (the whole model, whose embedding and output head a drafter may share)."""
        ...

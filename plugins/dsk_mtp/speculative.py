"""Speculative decoding with the MTP heads: the drafter the core's speculative loop asks for (spec §4.6).

Depth k drafts ``t_{n+k}`` from the committed ``t_0 .. t_n``, chained as in training: depth k at position i reads
depth k-1's hidden state ``h^{k-1}_i`` and the embedding of ``t_{i+k}``, which for the last positions runs past
``t_n`` into the drafts of the shallower depths. Each depth keeps its own KV cache, and of it only the positions
computed from committed tokens survive a round; the rest are recomputed in the next one. Every row of a batch
does this at its own length, in one chunk per depth for the whole batch. The core loop
(:func:`dsk.api.runtime.speculative_generate`) verifies the drafts with one forward of the main model, so greedy
output equals greedy decoding's and sampled output has plain sampling's distribution (the drafts are drawn with
the loop's sampler, and their distribution is the ``q`` of the acceptance rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsk.api.generation import DraftSampler
from dsk.api.runtime import SpeculativeBatchResult, SpeculativeResult
from dsk.api.runtime import speculative_generate as _speculative_generate

if TYPE_CHECKING:  # pragma: no cover
    from dsk_mtp.mtp import MTP

__all__ = ["MTPDrafter", "speculative_generate"]


class MTPDrafter:
    """Drafts up to ``mtp.depth`` tokens per round for every row of a batch (a ``dsk.api.generation.BatchDrafter``).

    State, row b: ``n[b]``, the index of its last committed token ``t_{n_b}``; ``seq[b]``, its committed tokens
    followed by this round's drafts at ``n_b + 1 ..``; ``hid[k, b, i] = h^k_i`` (k = 0: the main model's final-norm
    output), preallocated so a round writes O(depth) rows; ``valid[k][b]``: depth k's cache holds positions
    ``0 .. valid[k][b] - 1`` computed from committed tokens only, to be kept. The buffers start at zero so that
    padding positions hold finite values (a NaN key would poison the scores of its whole row). The row counts are
    host lists, and where every row is at the same position (one prompt, or rows in step) the reads and writes are
    slices: a round's bookkeeping is then a few dispatches besides the MTP blocks' forwards.
    """

    def __init__(self, mtp: MTP, model: nn.Module, batch: int, max_len: int):
        self.mtp = mtp
        self.max_drafts = mtp.depth
        self.embed, self.head = model.embed_tokens, model.lm_head
        weight = self.embed.weight
        self.device = weight.device
        width = max_len + mtp.depth + 1  # committed tokens, then a round's drafts or the verifier's block
        self.caches = mtp.make_caches(batch, max_len, weight.device, weight.dtype)
        self.seq = torch.zeros((batch, width), dtype=torch.long, device=weight.device)
        self.hid = weight.new_zeros((mtp.depth + 1, batch, width, weight.shape[1]))
        self.valid = [[0] * batch for _ in range(mtp.depth + 1)]
        self.n = [0] * batch
        self.proposed: torch.Tensor | None = None  # [B, d] the last round's drafts

    def begin(self, prompts: torch.Tensor, lengths: torch.Tensor, hidden: torch.Tensor, first: torch.Tensor) -> None:
        """The prefill: prompts [B, P] (right-padded to ``lengths``), hidden [B, P, D], first tokens [B]."""
        P = prompts.shape[1]
        self.seq[:, :P] = prompts
        self.seq.scatter_(1, lengths.to(self.device)[:, None], first[:, None])
        self.hid[0, :, :P] = hidden
        self.n = [int(x) for x in lengths.tolist()]

    def _slots(self, starts: list[int], length: int) -> torch.Tensor:
        """Slots ``starts[b] .. starts[b] + length - 1`` of every row b, [B, length] (rows at different positions)."""
        return torch.tensor(starts, device=self.device)[:, None] + torch.arange(length, device=self.device)

    def observe(self, tokens: torch.Tensor, counts: torch.Tensor, hidden: torch.Tensor) -> None:
        """Commit row b's ``tokens[b, :counts[b]]`` (tokens [B, T]) and the hidden states [B, T, D] at its newly fed
        positions."""
        B, T = tokens.shape
        counts_l = counts.tolist()
        n = self.n
        if self.proposed is not None:
            d = self.proposed.shape[1]
            m = min(d, T)
            drafts, fed = self.proposed[:, :m].tolist(), tokens[:, :m].tolist()
            for b in range(B):
                # drafts now committed: the leading ones the tokens confirm, within the row's count
                a = next((j for j in range(min(m, counts_l[b])) if drafts[b][j] != fed[b][j]), min(m, counts_l[b]))
                # position i of depth k read tokens up to t_{i+k}; those up to t_{n+a} are now committed, and depth
                # k's positions also need depth k-1's there
                for k in range(1, len(self.valid)):
                    v = max(min(n[b], n[b] + a - k + 1), 0) if k <= d else self.valid[k][b]
                    self.valid[k][b] = v if k == 1 else min(v, self.valid[k - 1][b])
        common = _common(n)
        if common is not None:
            self.hid[0, :, common : common + T] = hidden
            self.seq[:, common + 1 : common + 1 + T] = tokens
        else:
            # unmasked writes: what lies past a row's count is past its new length, rewritten before it is read
            at = self._slots(n, T)
            self.hid[0].scatter_(1, at[..., None].expand(B, T, hidden.shape[-1]), hidden.to(self.hid.dtype))
            self.seq.scatter_(1, at + 1, tokens)
        self.n = [x + c for x, c in zip(n, counts_l, strict=True)]
        self.proposed = None

    @torch.no_grad()
    def propose(self, limit: int, sample: DraftSampler) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts ``t_{n+1} .. t_{n+d}`` per row, ``d = min(limit, depth)``: one chunk per depth over the rows' stale
        positions -> (tokens [B, d], probs [B, d, V] | None)."""
        B = self.seq.shape[0]
        dim = self.hid.shape[-1]
        n = self.n
        drafts, probs = [], []
        for k in range(1, min(limit, self.mtp.depth) + 1):
            # Row b recomputes positions valid[k][b] .. n_b - 1. One chunk of L positions serves all rows: it ends
            # at n_b - 1 (recomputing a few kept positions, whose inputs are committed) or, for a row shorter than
            # L, starts at 0 and runs past n_b - 1 into padding that no real position attends to.
            L = max(max(x - v for x, v in zip(n, self.valid[k], strict=True)), 1)
            starts = [max(x - L, 0) for x in n]
            cache = self.caches[k - 1]
            common = _common(starts)
            layer = self.mtp.layers[k - 1]
            if common is not None:
                cache.truncate(common)
                pos = torch.arange(common, common + L, device=self.device)  # (L,)
                toks = self.seq[:, common + k : common + k + L]  # t_{i+k}: committed, then the shallower drafts
                h = layer(self.hid[k - 1, :, common : common + L], self.embed(toks), pos, None, cache)  # (B, L, D)
                self.hid[k, :, common : common + L] = h
            else:
                cache.truncate(torch.tensor(starts))
                pos = pos_BL = self._slots(starts, L)  # (B, L)
                toks = self.seq.gather(1, pos_BL + k)
                index = pos_BL[..., None].expand(B, L, dim)
                h = layer(self.hid[k - 1].gather(1, index), self.embed(toks), pos, None, cache)
                self.hid[k].scatter_(1, index, h)
            last = [min(x, L) - 1 for x in n]  # each row's last real position in the chunk
            if _common(last) is not None:
                h_last = h[:, last[0]]  # (B, D)
            else:
                h_last = h[torch.arange(B, device=self.device), torch.tensor(last, device=self.device)]
            token, prob = sample(self.head(layer.shared_head.norm(h_last)))  # (B,), (B, V) | None
            if _common(n) is not None:
                self.seq[:, n[0] + k] = token
            else:
                self.seq.scatter_(1, (torch.tensor(n, device=self.device) + k)[:, None], token[:, None])
            drafts.append(token)
            probs.append(prob)
        self.proposed = torch.stack(drafts, dim=1)  # (B, d)
        return self.proposed, None if probs[0] is None else torch.stack(probs, dim=1)


def _common(values: list[int]) -> int | None:
    """The value every row has, or None."""
    first = values[0]
    return first if all(x == first for x in values) else None


def speculative_generate(
    model: Any,
    prompt: list[int] | list[list[int]],
    max_new_tokens: int,
    eos_id: int | None = None,
    *,
    depth: int | None = None,
    **options: Any,
) -> SpeculativeResult | SpeculativeBatchResult:
    """Speculative decoding with the MTP heads drafting: the core's speculative loop with the ``"mtp"`` drafter.

    Args:
        model: a model with MTP heads (``model.mtp``).
        prompt: token ids of one sequence, or a list of them (a batch).
        max_new_tokens: most tokens to generate per row.
        eos_id: a row stops after producing it.
        depth: drafts per round (default: all of ``model.mtp.depth``).
        options: the core loop's keyword options (``temperature``, ``top_p``, ``generator``, ``return_logprobs``,
            ``pad_id``, ``sync_done``: :func:`dsk.api.runtime.speculative_generate`).
    """
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        raise ValueError("the model has no MTP heads (model.mtp); speculative decoding needs them")
    return _speculative_generate(model, prompt, max_new_tokens, eos_id, drafter=mtp, max_drafts=depth, **options)

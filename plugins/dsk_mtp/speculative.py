"""Speculative decoding with the MTP heads: the drafter the core's greedy speculative loop asks for (spec §4.6).

Depth k drafts ``t_{n+k}`` from the committed ``t_0 .. t_n``, chained as in training: depth k at position i reads
depth k-1's hidden state ``h^{k-1}_i`` and the embedding of ``t_{i+k}``, which for the last positions runs past
``t_n`` into the drafts of the shallower depths. Each depth keeps its own KV cache, and of it only the positions
computed from committed tokens survive a round; the rest are recomputed in the next one. The core loop
(:func:`dsk.api.runtime.speculative_generate`) verifies the drafts with one forward of the main model, so the
output equals greedy decoding's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dsk.api.runtime import SpeculativeResult
from dsk.api.runtime import speculative_generate as _speculative_generate

if TYPE_CHECKING:  # pragma: no cover
    from dsk_mtp.mtp import MTP

__all__ = ["MTPDrafter", "speculative_generate"]


class MTPDrafter:
    """Drafts up to ``mtp.depth`` tokens per round for one sequence (a ``dsk.api.Drafter``).

    State: the committed tokens ``seq``; ``hid[k, i] = h^k_i`` (k = 0: the main model's final-norm output at the
    committed positions), preallocated so a round writes O(depth) rows; ``valid[k]``: depth k's cache holds
    positions ``0 .. valid[k]-1`` computed from committed tokens only, to be kept.
    """

    def __init__(self, mtp: MTP, model: nn.Module, max_len: int):
        self.mtp = mtp
        self.embed, self.head = model.embed_tokens, model.lm_head
        weight = self.embed.weight
        self.device = weight.device
        self.caches = mtp.make_caches(1, max_len, weight.device, weight.dtype)
        self.hid = weight.new_empty((mtp.depth + 1, max_len, weight.shape[1]))
        self.valid = [0] * (mtp.depth + 1)
        self.seq: list[int] = []
        self.fed = 0  # committed positions whose h^0 is known: all but the last committed token
        self.proposed: list[int] = []

    def observe(self, tokens: list[int], hidden: torch.Tensor) -> None:
        """Commit ``tokens`` and the main model's hidden states ``hidden [N, D]`` of the newly fed positions."""
        n = self.fed  # the last round's t_n (0 before the prefill)
        a = 0  # drafts the verifier accepted: the new tokens start with them
        while a < len(self.proposed) and a < len(tokens) and self.proposed[a] == tokens[a]:
            a += 1
        for k in range(1, len(self.proposed) + 1):
            # position i of depth k read tokens up to t_{i+k}; those up to t_{n+a} are now committed
            self.valid[k] = max(0, min(n, n + a - k + 1))
        self.hid[0, self.fed : self.fed + hidden.shape[0]] = hidden
        self.fed += hidden.shape[0]
        self.seq += tokens
        self.proposed = []

    @torch.no_grad()
    def propose(self, limit: int) -> list[int]:
        """Drafts ``t_{n+1} .. t_{n+d}``, ``d = min(limit, depth)``: one chunk per depth over its stale positions."""
        n = len(self.seq) - 1  # t_n is committed but not yet fed to the main model
        drafts: list[int] = []
        for k in range(1, min(limit, self.mtp.depth) + 1):
            start = self.valid[k]
            self.caches[k - 1].truncate(start)
            # depth k at positions start..n-1 reads h^{k-1} there and t_{i+k}, which runs past t_n into the drafts
            toks = torch.tensor([(self.seq[start + k :] + drafts)[: n - start]], device=self.device)
            h_k, logits = self.mtp.step(
                k,
                self.hid[k - 1, start:n][None],
                toks,
                self.embed,
                self.head,
                pos=torch.arange(start, n, device=self.device),
                cache=self.caches[k - 1],
            )
            self.hid[k, start:n] = h_k[0]
            drafts.append(int(logits[0, -1].argmax()))
        self.proposed = drafts
        return drafts


def speculative_generate(
    model: Any, prompt: list[int], max_new_tokens: int, eos_id: int | None = None, *, depth: int | None = None
) -> SpeculativeResult:
    """Greedy decoding with the MTP heads drafting: the core's speculative loop with the ``"mtp"`` drafter.

    Args:
        model: a model with MTP heads (``model.mtp``).
        prompt: token ids (one sequence).
        max_new_tokens: most tokens to generate.
        eos_id: stop after producing it.
        depth: drafts per round (default: all of ``model.mtp.depth``).
    """
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        raise ValueError("the model has no MTP heads (model.mtp); speculative decoding needs them")
    return _speculative_generate(model, prompt, max_new_tokens, eos_id, drafter=mtp, max_drafts=depth)

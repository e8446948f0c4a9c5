"""A seeded synthetic language with a known entropy rate: text drawn from a random Markov chain of order k.

Pre-training on it gives a loss curve that falls smoothly towards a known floor: every context has its own
next-symbol distribution (a Dirichlet draw, so some symbols are likely and most are rare), and a model improves by
learning more contexts' statistics a little better, never by discovering an algorithm all at once (the
arithmetic task's phase transitions). That makes small loss differences (FP8 against BF16: 0.25%) measurable.

The language: symbols are the first ``vocab`` lower-case letters; a state is the last ``order`` symbols; each state
s has a next-symbol distribution ``P(. | s) ~ Dirichlet(concentration)`` drawn from ``language_seed``. A record is
``length`` symbols: the first ``order`` drawn jointly from the chain's stationary distribution over states (so the
text is stationary from its first symbol), then each next symbol from ``P(. | last order symbols)``.

Known quantities (nats), computed exactly from the chain:

- entropy rate ``H = sum_s pi(s) H(P(. | s))``: the best possible next-symbol loss deep inside a text;
- ``H_0 = H(pi)``: the entropy of the first ``order`` symbols together (stationary distribution pi over states);
- the pre-training loss floor per target of one record ``[BOS] x_1 .. x_L [EOS]`` (targets: L symbols and EOS,
  which always follows the L-th symbol, so costs nothing): ``(H_0 + (L - order) H) / (L + 1)``.
"""

from __future__ import annotations

import bisect
import math
import random
import string
from functools import cached_property
from typing import Any

from dsk_tasks.base import SPLITS, stable_hash, take_records
from dsk_tasks.config import MarkovConfig

__all__ = ["MarkovTask"]

# power iteration for the stationary distribution stops when no state's probability moves by more than this
_STATIONARY_TOL = 1e-14
_MAX_ITERATIONS = 100_000
# as in the verifiable tasks: with test_percent <= 99 a draw lands in a split at least 1% of the time
_MAX_DRAWS = 20_000


class MarkovTask:
    """Text records of a random order-k Markov chain (kind ``task``); ``MarkovTask(config)``."""

    name = "markov"

    def __init__(self, config: MarkovConfig | None = None):
        self.config = config if config is not None else MarkovConfig()
        cfg = self.config
        self.alphabet = string.ascii_lowercase[: cfg.vocab]
        rng = random.Random(stable_hash(f"markov-language|{cfg.language_seed}|{cfg.vocab}|{cfg.order}"))
        n_states = cfg.vocab**cfg.order
        # state index: the last `order` symbols read as a base-vocab number, oldest symbol most significant
        self.transitions: list[list[float]] = [self._dirichlet(rng) for _ in range(n_states)]
        self._cumulative = [_cumsum(row) for row in self.transitions]

    def _dirichlet(self, rng: random.Random) -> list[float]:
        alpha = self.config.concentration
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(self.config.vocab)]
        # a Gamma(alpha) draw can underflow to 0 for small alpha; keep every symbol possible so the chain stays
        # irreducible (each state reachable) and its stationary distribution unique
        draws = [max(d, 1e-12) for d in draws]
        total = sum(draws)
        return [d / total for d in draws]

    # -- the chain's exact quantities ----------------------------------------------------------------------------
    @cached_property
    def stationary(self) -> list[float]:
        """pi over the ``vocab ** order`` states (power iteration on the state chain)."""
        V, n = self.config.vocab, len(self.transitions)
        pi = [1.0 / n] * n
        for _ in range(_MAX_ITERATIONS):
            nxt = [0.0] * n
            for s, (p_s, row) in enumerate(zip(pi, self.transitions, strict=True)):
                base = (s * V) % n  # drop the oldest symbol, append the new one
                for y, p in enumerate(row):
                    nxt[base + y] += p_s * p
            if max(abs(a - b) for a, b in zip(nxt, pi, strict=True)) < _STATIONARY_TOL:
                return nxt
            pi = nxt
        raise ValueError(f"markov: the chain did not mix in {_MAX_ITERATIONS} steps; raise data.concentration")

    @cached_property
    def entropy_rate(self) -> float:
        """H = sum_s pi(s) H(P(. | s)) in nats per symbol."""
        return sum(p_s * _entropy(row) for p_s, row in zip(self.stationary, self.transitions, strict=True))

    @cached_property
    def initial_entropy(self) -> float:
        """H(pi): the entropy of a record's first ``order`` symbols together, in nats."""
        return _entropy(self.stationary)

    @cached_property
    def loss_floor(self) -> float:
        """The lowest expected pre-training loss per target of one record (nats): see the module docstring."""
        L, k = self.config.length, self.config.order
        return (self.initial_entropy + (L - k) * self.entropy_rate) / (L + 1)

    def metadata(self) -> dict[str, Any]:
        """The language's known quantities, for reports and benchmarks."""
        return {
            "entropy_rate": self.entropy_rate,
            "initial_entropy": self.initial_entropy,
            "loss_floor": self.loss_floor,
            "states": len(self.transitions),
            "alphabet": self.alphabet,
        }

    def log_prob(self, text: str) -> float:
        """ln P(text) under the chain (the first ``order`` symbols under pi): an exact reference for a model's loss."""
        k, V = self.config.order, self.config.vocab
        ids = [self.alphabet.index(c) for c in text]
        state = 0
        for x in ids[:k]:
            state = state * V + x
        total = math.log(self.stationary[state])
        n = len(self.transitions)
        for x in ids[k:]:
            total += math.log(self.transitions[state][x])
            state = (state * V) % n + x
        return total

    # -- records -------------------------------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> str:
        k, V, n = self.config.order, self.config.vocab, len(self.transitions)
        state = _pick(self._stationary_cumulative, rng.random())
        out = []
        for i in range(k):  # the state's symbols, oldest first
            out.append(self.alphabet[(state // V ** (k - 1 - i)) % V])
        for _ in range(self.config.length - k):
            y = _pick(self._cumulative[state], rng.random())
            out.append(self.alphabet[y])
            state = (state * V) % n + y
        return "".join(out)

    @cached_property
    def _stationary_cumulative(self) -> list[float]:
        return _cumsum(self.stationary)

    def split_of(self, text: str) -> str:
        """A text's split, from the hash of the text alone (the same for every seed, so splits never overlap)."""
        return "test" if stable_hash(f"{self.name}|{text}") % 100 < self.config.test_percent else "train"

    def sample(self, split: str, index: int) -> dict[str, Any]:
        """The record ``{"text", "key", "split", "index"}`` at ``index`` of ``split``; a function of (config, split,
        index) alone.

        Raises:
            ValueError: unknown split or negative index.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: must be 'train' or 'test'")
        if index < 0:
            raise ValueError(f"index={index}: must be >= 0")
        rng = random.Random(stable_hash(f"{self.name}|{self.config.seed}|{split}|{index}"))
        for _ in range(_MAX_DRAWS):
            text = self._draw(rng)
            if self.split_of(text) == split:
                return {"task": self.name, "split": split, "index": index, "key": text, "text": text}
        raise ValueError(f"markov: no {split} text in {_MAX_DRAWS} draws; the language has too few texts")

    def records(self, split: str, n: int | None = None, *, unique: bool | None = None) -> list[dict[str, Any]]:
        """``n`` records of ``split`` (default ``config.test_size`` for test); ``unique`` (default for test) skips
        repeated texts."""
        return take_records(
            self.name,
            self.sample,
            split,
            n,
            self.config.test_size,
            unique,
            hint="lower test_size or lengthen the texts",
            noun="texts",
        )

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"MarkovTask(vocab={cfg.vocab}, order={cfg.order}, entropy_rate={self.entropy_rate:.4f} nats, "
            f"floor={self.loss_floor:.4f})"
        )


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def _cumsum(probs: list[float]) -> list[float]:
    out, total = [], 0.0
    for p in probs:
        total += p
        out.append(total)
    return out


def _pick(cumulative: list[float], u: float) -> int:
    # the last bucket absorbs the rounding of the running sum (it may end a hair below 1)
    return min(bisect.bisect_right(cumulative, u * cumulative[-1]), len(cumulative) - 1)

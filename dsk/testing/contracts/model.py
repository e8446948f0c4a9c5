"""Contract suites for the model component kinds (router, ffn, attention) and for any plugin's config and hooks.

A plugin's tests call them with its component::

    from dsk.testing.contracts.model import check_router

    def test_sinkhorn_meets_the_router_contract():
        ctx = ModelContext(dim=8, n_layers=1, vocab_size=16, max_seq_len=16)
        check_router(lambda: SinkhornRouter(SinkhornConfig(top_k=2), ctx, 6), n_experts=6, dim=8, top_k=2)

``build()`` returns a fresh module; the checks seed torch themselves, run at tiny sizes in the dtype of the
module's parameters (float32 or float64, on the CPU) and raise ``AssertionError`` naming what is wrong and what
to fix. The rules are those of ``docs/plugins.md`` ("Component kinds and their contracts") and of the side-channel
protocols in :mod:`dsk.api.contracts`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from dsk.testing.contracts import call as _call
from dsk.testing.contracts import fail as _fail

__all__ = [
    "check_attention",
    "check_config_round_trip",
    "check_ffn",
    "check_mtp",
    "check_registration",
    "check_router",
]

Build = Callable[[], nn.Module]


# -- helpers ---------------------------------------------------------------------------------------------------


def _build(build: Build, kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    module = _call(f"{kind} build()", build)
    if not isinstance(module, nn.Module):
        _fail(f"{kind} build() returned {type(module).__name__}; return a torch.nn.Module")
    return module


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype inputs are made in: that of the module's first floating parameter (float32 without one)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-4


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=tol)


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _check_grads(module: nn.Module, kind: str, through: str, *, every: bool) -> None:
    """After a backward: the gradients are finite and reach the parameters (every one, or at least one)."""
    params = _trainable(module)
    if not params:
        _fail(f"{kind} has no trainable parameters, so no gradient can reach it; register its weights as nn.Parameter")
    bad = [n for n, p in params.items() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        _fail(f"{kind} gradients of {bad} are not finite after a backward through {through}")
    missing = [n for n, p in params.items() if p.grad is None or not p.grad.any()]
    if every and missing:
        _fail(
            f"{kind} parameters {missing} got no gradient through {through}; compute the output from them "
            "without detaching (no .detach(), .data or torch.no_grad() on the differentiable path)"
        )
    if len(missing) == len(params):
        _fail(
            f"no gradient reached the {kind}'s parameters through {through}; compute {through} from them "
            "without detaching (no .detach(), .data or torch.no_grad() on the differentiable path)"
        )


def _grads(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in module.named_parameters()}


def _check_state_round_trip(module: nn.Module, build: Build, kind: str, seed: int, run: Callable[[nn.Module], Any]):
    """A fresh build (another seed) loaded with ``module.state_dict()`` gives the same eval outputs."""
    other = _build(build, kind, seed + 1)
    _call(f"{kind} load_state_dict(state_dict())", other.load_state_dict, module.state_dict())
    counters = {t.data_ptr() for t in _step_tensors(module)}  # a step's counts are not state
    theirs = dict(other.named_buffers())
    for n, buf in module.named_buffers():
        if buf.data_ptr() not in counters and n in theirs and not torch.equal(buf, theirs[n]):
            _fail(
                f"{kind} state dict round trip: buffer {n!r} of a fresh build loaded with state_dict() differs "
                "from the original's; register state the forward reads as a persistent buffer (persistent=True)"
            )
    module.eval(), other.eval()
    with torch.no_grad():
        a, b = run(module), run(other)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if not torch.equal(x, y):
            _fail(
                f"{kind} state dict round trip: output {i} of a fresh build loaded with state_dict() differs from "
                "the original's; keep everything the forward reads (weights, balancing biases) in parameters or "
                "persistent buffers"
            )


def _step_tensors(module: nn.Module) -> list[torch.Tensor]:
    fn = _side(module, "step_stat_tensors", "load_tensors")
    return list(fn()) if fn is not None else []


def _after_step_keeps_grads(module: nn.Module, kind: str, hook: Callable[[], None], name: str) -> None:
    before = _grads(module)
    _call(f"{kind}.{name}()", hook)
    after = _grads(module)
    for n, g in before.items():
        h = after[n]
        if (g is None) != (h is None) or (g is not None and not torch.equal(g, h)):
            _fail(
                f"{kind}.{name}() changed the gradient of {n!r}; it runs after the optimizer step and must never "
                "touch .grad (update buffers under torch.no_grad())"
            )


def _side(module: nn.Module, contract: str, own: str) -> Callable[..., Any] | None:
    """The side-channel method under its contract name, else under a router's own name: a router inside a layer
    that owns the contract names (so each side channel is found once per layer) names them ``load_tensors /
    load_metrics / end_step``."""
    return getattr(module, contract, None) or getattr(module, own, None)


# -- router ----------------------------------------------------------------------------------------------------


def check_router(build: Build, *, n_experts: int, dim: int, top_k: int, n_tokens: int = 12, seed: int = 0) -> None:
    """The router contract, as the MoE layer uses it: ``forward(x [N, D], seq_shape=(B, T)) -> (weights [N, k],
    experts [N, k], stats)`` with ``stats["load"]`` the per-expert slot counts ``[E]``, and the optional side
    channels ``balance_loss()``, ``load_tensors()``, ``load_metrics()`` and ``end_step()``.

    Checks: shapes and dtypes (weights floating, experts int64 in ``[0, n_experts)`` and distinct per row);
    ``stats["load"]`` counts the routed slots of the call (the layer's dispatch sizes its expert rows by it, in
    training and in evaluation); gradients reach the router's parameters through the weights; two builds after
    the same seed route alike; ``balance_loss()`` is None or a finite scalar; ``load_tensors()`` /
    ``load_metrics()`` count ``N * top_k`` slots per training forward and nothing in eval; ``end_step()`` leaves
    ``.grad`` alone and resets the counts; the state dict round trip.
    """
    kind = "router"
    router = _build(build, kind, seed).train()
    dtype = _dtype(router)
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(n_tokens, dim, generator=gen, dtype=dtype)
    seq_shape = (1, n_tokens)
    where = f"router forward(x [{n_tokens}, {dim}] {str(dtype).removeprefix('torch.')}, seq_shape={seq_shape})"

    def route(module: nn.Module) -> Any:
        try:
            return module(x, seq_shape=seq_shape)
        except TypeError as exc:
            if "seq_shape" in str(exc):
                _fail(
                    f"{where} raised TypeError: {exc}; the MoE layer passes seq_shape=(B, T) (the batch and "
                    "sequence the N rows come from): accept it, def forward(self, x, seq_shape=None)"
                )
            raise AssertionError(f"{where} raised TypeError: {exc}") from exc
        except AssertionError:
            raise
        except Exception as exc:
            raise AssertionError(f"{where} raised {type(exc).__name__}: {exc}") from exc

    out = route(router)
    if not isinstance(out, tuple) or len(out) != 3:
        _fail(f"{where} returned {type(out).__name__}; return the tuple (weights [N, k], experts [N, k], stats)")
    weights, experts, stats = out
    for name, t in (("weights", weights), ("experts", experts)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n_tokens, top_k):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            _fail(f"{where} returned {name} of shape {shape}; return {name} [N, top_k] = [{n_tokens}, {top_k}]")
    if not weights.is_floating_point():
        _fail(f"{where} returned weights of dtype {weights.dtype}; return floating routing weights")
    if not torch.isfinite(weights).all():
        _fail(f"{where} returned non-finite routing weights")
    if experts.dtype != torch.int64:
        _fail(f"{where} returned experts of dtype {str(experts.dtype).removeprefix('torch.')}; return int64 expert ids")
    if int(experts.min()) < 0 or int(experts.max()) >= n_experts:
        _fail(f"{where} returned expert ids outside [0, {n_experts}): {experts.min().item()}..{experts.max().item()}")
    sorted_NK = experts.sort(dim=-1).values
    dup = (sorted_NK[:, 1:] == sorted_NK[:, :-1]).any(dim=-1)
    if dup.any():
        row = int(dup.nonzero()[0])
        _fail(f"{where}: row {row} picks an expert twice ({experts[row].tolist()}); pick top_k distinct experts")
    _check_load_stat(where, stats, experts, n_experts)

    router.zero_grad(set_to_none=True)
    probe = torch.linspace(-1, 1, weights.numel(), dtype=weights.dtype).view_as(weights)
    if not weights.requires_grad:
        _fail(f"{where} returned weights without a gradient path; do not detach the gathered affinities")
    (weights * probe).sum().backward()
    _check_grads(router, kind, "the routing weights", every=False)

    # determinism: two builds after the same seed, the same input
    a, b = _build(build, kind, seed).train(), _build(build, kind, seed).train()
    oa, ob = route(a), route(b)
    for i, name in enumerate(("weights", "experts")):
        if not torch.equal(oa[i], ob[i]):
            _fail(
                f"router is not deterministic: two builds after torch.manual_seed({seed}) returned different "
                f"{name} for the same input; draw every random number from the seeded torch RNG at build time"
            )

    # the balance loss the layer adds to the training loss: None or a finite scalar
    fresh = _build(build, kind, seed).train()
    route(fresh)
    balance = getattr(fresh, "balance_loss", None)
    if balance is not None:
        loss = _call("router balance_loss()", balance)
        if loss is not None and (
            not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not torch.isfinite(loss).all()
        ):
            _fail(f"router balance_loss() returned {loss!r}; return None or a finite scalar tensor")

    # step statistics: a training forward counts N * top_k slots, an eval forward nothing
    fresh = _build(build, kind, seed).train()
    tensors = getattr(fresh, "load_tensors", None)
    metrics = getattr(fresh, "load_metrics", None)
    for contract, own in (
        ("step_stat_tensors", "load_tensors"),
        ("step_metrics", "load_metrics"),
        ("after_optimizer_step", "end_step"),
        ("aux_loss", "balance_loss"),
    ):
        if getattr(fresh, contract, None) is not None and getattr(fresh, own, None) is None:
            _fail(
                f"router has {contract}() but the MoE layer calls a router's {own}(); rename it (the layer "
                f"itself provides {contract}() to the trainer)"
            )
    if tensors is not None:
        route(fresh)
        total = sum(float(t.sum()) for t in _call("router load_tensors()", tensors))
        if total != n_tokens * top_k:
            _fail(
                f"router load_tensors() after one training forward of N = {n_tokens} tokens sum to {total:g}; "
                f"count each routed slot once (N x top_k = {n_tokens * top_k})"
            )
        if metrics is not None:
            m = _call("router load_metrics()", metrics)
            if not isinstance(m, dict):
                _fail(f"router load_metrics() returned {type(m).__name__}; return a dict of floats / lists")
            loads = m.get("expert_load")
            if loads is not None and (len(loads) != n_experts or sum(loads) != n_tokens * top_k):
                _fail(
                    f"router load_metrics()['expert_load'] = {loads}: expected {n_experts} per-expert counts "
                    f"summing to N x top_k = {n_tokens * top_k}"
                )
        fresh.eval()
        with torch.no_grad():
            route(fresh)
        again = sum(float(t.sum()) for t in tensors())
        if again != total:
            _fail(
                "router eval forward changed the step statistics; count only under self.training (evaluation and "
                "generation must not move the load balancing)"
            )
        fresh.train()

    # the per-step update: never touches .grad, resets the counts
    update = getattr(fresh, "end_step", None)
    if update is not None:
        fresh.zero_grad(set_to_none=True)
        w, _, _ = route(fresh)
        (w * probe).sum().backward()
        _after_step_keeps_grads(fresh, kind, update, "end_step")
        if tensors is not None and any(float(t.abs().sum()) for t in tensors()):
            _fail("router.end_step() left the step statistics non-zero; apply them, then reset them")

    # state dict round trip (after an update, so balancing state such as a bias is non-trivial)
    _check_state_round_trip(fresh, build, kind, seed, lambda m: route(m)[:2])


def _check_load_stat(where: str, stats: Any, experts: torch.Tensor, n_experts: int) -> None:
    """``stats["load"]``: an integer tensor [E] with each expert's slot count in ``experts`` (the dispatch uses it)."""
    if not isinstance(stats, dict) or "load" not in stats:
        got = sorted(stats) if isinstance(stats, dict) else type(stats).__name__
        _fail(
            f"{where} returned stats {got}; return a dict with 'load': the per-expert slot counts [E] "
            "(torch.bincount(experts.flatten(), minlength=n_experts)), which the MoE dispatch sizes its rows by"
        )
    load = stats["load"]
    want = torch.bincount(experts.flatten(), minlength=n_experts)
    if not isinstance(load, torch.Tensor) or tuple(load.shape) != (n_experts,) or load.is_floating_point():
        got = f"{tuple(load.shape)} {load.dtype}" if isinstance(load, torch.Tensor) else type(load).__name__
        _fail(f"{where} returned stats['load'] of {got}; return integer counts [E] = [{n_experts}]")
    if not torch.equal(load.to(torch.int64).cpu(), want.cpu()):
        _fail(
            f"{where} returned stats['load'] = {load.tolist()} but its experts count {want.tolist()}; "
            "count the experts this call picked (every call, training or not)"
        )


# -- ffn -------------------------------------------------------------------------------------------------------


def _check_like_input(where: str, y: Any, x: torch.Tensor) -> None:
    """``y`` is a finite tensor of ``x``'s shape and dtype (a [B, T, D] -> [B, T, D] component's output)."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        _fail(f"{where} returned {got}; return y [B, T, D] = {tuple(x.shape)}")
    if y.dtype != x.dtype:
        _fail(f"{where} returned dtype {y.dtype}; return the input's dtype {x.dtype}")
    if not torch.isfinite(y).all():
        _fail(f"{where} returned non-finite values")


def check_ffn(build: Build, *, dim: int, batch: int = 2, seq_len: int = 5, seed: int = 0) -> None:
    """The ffn contract: ``forward(x [B, T, D]) -> [B, T, D]``.

    Checks: shape and dtype; gradients reach the input and the parameters; determinism under a seed; the state
    dict round trip; where implemented, ``aux_loss()`` (None or a finite scalar with a gradient after a training
    forward), ``step_stat_tensors`` / ``step_metrics`` and an ``after_optimizer_step`` that never touches ``.grad``.
    """
    kind = "ffn"
    ffn = _build(build, kind, seed).train()
    dtype = _dtype(ffn)
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(batch, seq_len, dim, generator=gen, dtype=dtype)
    where = f"ffn forward(x [{batch}, {seq_len}, {dim}] {str(dtype).removeprefix('torch.')})"

    xg = x.clone().requires_grad_(True)
    y = _call(where, ffn, xg)
    _check_like_input(where, y, x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    if xg.grad is None or not xg.grad.any():
        _fail(f"no gradient reached the ffn's input through {where}; do not detach x")
    _check_grads(ffn, kind, "the ffn output", every=False)

    a, b = _build(build, kind, seed).train(), _build(build, kind, seed).train()
    if not torch.equal(_call(where, a, x), _call(where, b, x)):
        _fail(
            f"ffn is not deterministic: two builds after torch.manual_seed({seed}) gave different outputs for the "
            "same input; draw every random number from the seeded torch RNG at build time"
        )

    aux = getattr(ffn, "aux_loss", None)
    if callable(aux):
        fresh = _build(build, kind, seed).train()
        _call(where, fresh, x)
        loss = _call("ffn aux_loss()", fresh.aux_loss)
        if loss is not None:
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                _fail(f"ffn aux_loss() returned {got}; return a scalar tensor (already weighted) or None")
            if not torch.isfinite(loss):
                _fail(f"ffn aux_loss() returned {loss.item()}; return a finite loss")
            if not loss.requires_grad:
                _fail("ffn aux_loss() has no gradient; compute it from the parameters without detaching")
            fresh.zero_grad(set_to_none=True)
            loss.backward()
            _check_grads(fresh, kind, "aux_loss()", every=False)

    metrics = getattr(ffn, "step_metrics", None)
    if callable(metrics):
        fresh = _build(build, kind, seed).train()
        _call(where, fresh, x)
        m = _call("ffn step_metrics()", fresh.step_metrics)
        if not isinstance(m, dict) or not all(isinstance(v, (int, float, list)) for v in m.values()):
            _fail(f"ffn step_metrics() returned {m!r}; return a dict of floats or lists of floats")
    if callable(getattr(ffn, "after_optimizer_step", None)):
        fresh = _build(build, kind, seed).train()
        fresh.zero_grad(set_to_none=True)
        y = _call(where, fresh, x)
        y.sum().backward()
        _after_step_keeps_grads(fresh, kind, fresh.after_optimizer_step, "after_optimizer_step")
        tensors = getattr(fresh, "step_stat_tensors", None)
        if callable(tensors) and any(float(t.abs().sum()) for t in tensors()):
            _fail("ffn after_optimizer_step() left step_stat_tensors() non-zero; apply the counts, then reset them")

    _check_state_round_trip(ffn, build, kind, seed, lambda m: (m(x),))


# -- attention -------------------------------------------------------------------------------------------------


def check_attention(
    build: Build, *, dim: int, max_len: int, batch: int = 2, seq_len: int = 6, prefill: int = 3, seed: int = 0
) -> None:
    """The attention contract: ``forward(x [B, T, D], pos [T], mask=None, cache=None) -> [B, T, D]``.

    Checks: shape and dtype; causality (changing a later token leaves earlier outputs alone); ``make_cache``
    returns a :class:`dsk.api.AttentionCache`, and a prefill of ``prefill`` tokens then one token at a time
    equals the full forward (float32: within 1e-4), ``lengths`` count the tokens, and ``truncate`` rolls back so
    that decoding again gives the same outputs; gradients reach the input and every parameter; determinism under
    a seed; the state dict round trip.
    """
    from dsk.api import AttentionCache

    kind = "attention"
    if seq_len > max_len:
        _fail(f"check_attention: seq_len = {seq_len} > max_len = {max_len}")
    attn = _build(build, kind, seed).eval()
    dtype = _dtype(attn)
    tol = _tol(dtype)
    B, T = batch, seq_len
    gen = torch.Generator().manual_seed(seed + 7)
    x = torch.randn(B, T, dim, generator=gen, dtype=dtype)
    pos = torch.arange(T)
    where = f"attention forward(x [{B}, {T}, {dim}] {str(dtype).removeprefix('torch.')}, pos [{T}])"

    with torch.no_grad():
        y = _call(where, attn, x, pos)
    _check_like_input(where, y, x)

    # causality: each later token changed in turn, the outputs before it stay
    for t in range(1, T):
        x2 = x.clone()
        x2[:, t:] = torch.randn(B, T - t, dim, generator=gen, dtype=dtype)
        with torch.no_grad():
            y2 = attn(x2, pos)
        if not _close(y[:, :t], y2[:, :t], tol):
            _fail(
                f"attention is not causal: changing the tokens from position {t} on changed the outputs before "
                "it; with mask=None each token attends only to itself and the tokens before it"
            )

    # cached decoding equals the full forward
    cache = _call(f"attention make_cache({B}, {max_len}, 'cpu', {dtype})", attn.make_cache, B, max_len, "cpu", dtype)
    if not isinstance(cache, AttentionCache):
        _fail(
            f"attention make_cache returned {type(cache).__name__}, which is not a dsk.api.AttentionCache; give it "
            "lengths, max_len, positions(n) and truncate(length)"
        )
    if cache.lengths.tolist() != [0] * B:
        _fail(f"a new attention cache has lengths {cache.lengths.tolist()}; it must start empty ([0] * {B})")

    def decode(start: int) -> torch.Tensor:
        outs = []
        for t in range(start, T):
            p = cache.positions(1)
            if p.reshape(-1)[0].item() != t:
                _fail(f"attention cache.positions(1) = {p.tolist()} after {t} tokens; return lengths + arange(n)")
            outs.append(attn(x[:, t : t + 1], p, None, cache))
        return torch.cat(outs, dim=1)

    with torch.no_grad():
        head = _call(
            f"attention prefill of {prefill} tokens with a cache",
            attn,
            x[:, :prefill],
            cache.positions(prefill),
            None,
            cache,
        )
        tail = _call("attention decoding one token at a time with a cache", decode, prefill)
    if cache.lengths.tolist() != [T] * B:
        _fail(f"attention cache.lengths = {cache.lengths.tolist()} after {T} tokens; count each row's tokens")
    cached = torch.cat((head, tail), dim=1)
    if not _close(cached, y, tol):
        err = (cached - y).abs().max().item()
        _fail(
            f"cached decoding disagrees with the full forward (max |diff| {err:.3g} > {tol:g}): a prefill of "
            f"{prefill} tokens then one token at a time must give what forward(x, pos) gives; each new token must "
            "attend over every cached token of its row, at its position"
        )
    _call("attention cache.truncate()", cache.truncate, prefill)
    if cache.lengths.tolist() != [prefill] * B:
        _fail(f"attention cache.truncate({prefill}) left lengths {cache.lengths.tolist()}; roll back to {prefill}")
    with torch.no_grad():
        again = decode(prefill)
    if not _close(again, tail, tol):
        _fail(
            f"decoding again after cache.truncate({prefill}) gives other outputs; truncate must roll the cache "
            "back so that the slots after it are overwritten and not attended to"
        )

    # gradients: the input and every parameter
    attn.train().zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    yg = _call(where, attn, xg, pos)
    (yg * torch.linspace(-1, 1, yg.numel(), dtype=yg.dtype).view_as(yg)).sum().backward()
    if xg.grad is None or not xg.grad.any():
        _fail(f"no gradient reached the attention's input through {where}; do not detach x")
    _check_grads(attn, kind, "the attention output", every=True)

    a, b = _build(build, kind, seed).eval(), _build(build, kind, seed).eval()
    with torch.no_grad():
        if not torch.equal(_call(where, a, x, pos), _call(where, b, x, pos)):
            _fail(
                f"attention is not deterministic: two builds after torch.manual_seed({seed}) gave different outputs "
                "for the same input; draw every random number from the seeded torch RNG at build time"
            )

    _check_state_round_trip(attn, build, kind, seed, lambda m: (m(x, pos),))


# -- mtp -------------------------------------------------------------------------------------------------------


def check_mtp(build: Build, *, dim: int, vocab_size: int, batch: int = 2, seq_len: int = 8, seed: int = 0) -> None:
    """The mtp contract: ``forward(hidden [B, T, D], input_ids [B, T], embed, head, pos=, mask=)`` returns one
    logits tensor per depth, depth k's ``[B, T - k, V]``, and ``loss(logits, labels [B, T])`` a scalar.

    Checks: shapes; causality (depth k's logits at position i read tokens up to ``i + k`` only, never its target
    ``t_{i+k+1}``); the loss is a finite scalar whose gradient reaches the module, the main hidden states and the
    shared embedding and head; determinism under a seed; the state dict round trip. ``build()`` returns a fresh
    module built with its own block factory; the check makes the shared embedding and head.
    """
    kind = "mtp"
    mtp = _build(build, kind, seed).eval()
    dtype = _dtype(mtp)
    tol = _tol(dtype)
    B, T, V = batch, seq_len, vocab_size
    gen = torch.Generator().manual_seed(seed + 7)
    embed = nn.Embedding(V, dim).to(dtype)
    head = nn.Linear(dim, V, bias=False).to(dtype)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(V, dim, generator=gen, dtype=dtype))
        head.weight.copy_(torch.randn(V, dim, generator=gen, dtype=dtype) * 0.3)
    hidden = torch.randn(B, T, dim, generator=gen, dtype=dtype)
    ids = torch.randint(0, V, (B, T), generator=gen)
    pos = torch.arange(T)
    where = f"mtp forward(hidden [{B}, {T}, {dim}], input_ids [{B}, {T}], embed, head, pos=pos)"

    def run(m: nn.Module, h: torch.Tensor = hidden, t: torch.Tensor = ids) -> list[torch.Tensor]:
        return _call(where, m, h, t, embed, head, pos=pos)

    with torch.no_grad():
        logits = run(mtp)
    if not isinstance(logits, (list, tuple)) or not logits:
        _fail(f"{where} returned {type(logits).__name__}; return a list with one logits tensor per depth")
    for k, lg in enumerate(logits, start=1):
        if not isinstance(lg, torch.Tensor) or tuple(lg.shape) != (B, T - k, V):
            got = tuple(lg.shape) if isinstance(lg, torch.Tensor) else type(lg).__name__
            _fail(f"{where}: depth {k} logits are {got}; return [B, T - k, V] = [{B}, {T - k}, {V}]")
        if not torch.isfinite(lg).all():
            _fail(f"{where}: depth {k} logits are not finite")

    # causality: changing the last token may only change, at depth k, the positions i >= T - 1 - k
    ids2 = ids.clone()
    ids2[:, -1] = (ids[:, -1] + 1) % V
    with torch.no_grad():
        logits2 = run(mtp, hidden, ids2)
    for k, (a, b) in enumerate(zip(logits, logits2, strict=True), start=1):
        n = T - 1 - k  # positions whose inputs (tokens up to i + k) do not include the last token
        if not _close(a[:, :n], b[:, :n], tol):
            _fail(
                f"mtp depth {k} is not causal: changing token {T - 1} changed its logits before position {n}; "
                f"depth k at position i may read tokens up to i + k, never its target t_(i+k+1)"
            )

    loss_fn = getattr(mtp, "loss", None)
    if not callable(loss_fn):
        _fail("mtp has no loss(logits, labels) method; the training loss calls it with forward's logits")
    mtp.train().zero_grad(set_to_none=True)
    embed.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)
    hg = hidden.clone().requires_grad_(True)
    loss = _call("mtp loss(logits, labels)", loss_fn, run(mtp, hg), ids)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not torch.isfinite(loss):
        _fail(f"mtp loss(logits, labels) returned {loss!r}; return a finite scalar tensor")
    loss.backward()
    _check_grads(mtp, kind, "the mtp loss", every=False)
    for name, t in (
        ("the main hidden states", hg.grad),
        ("the shared embedding", embed.weight.grad),
        ("the shared head", head.weight.grad),
    ):
        if t is None or not t.any():
            _fail(f"no gradient reached {name} through the mtp loss; use the embed and head passed to forward")

    a, b = _build(build, kind, seed).eval(), _build(build, kind, seed).eval()
    with torch.no_grad():
        for x, y in zip(run(a), run(b), strict=True):
            if not torch.equal(x, y):
                _fail(
                    f"mtp is not deterministic: two builds after torch.manual_seed({seed}) gave different logits; "
                    "draw every random number from the seeded torch RNG at build time"
                )

    _check_state_round_trip(mtp, build, kind, seed, lambda m: tuple(run(m)))


# -- config and registration -----------------------------------------------------------------------------------


def check_config_round_trip(config_model: type, table: dict[str, Any], *, registry: Any = None) -> Any:
    """The config validates from ``table``, dumps to TOML (``tomli_w``) and validates back equal; returns it.

    Every field must have a default or be given by ``table`` (a recipe may leave any option out). Nested slots
    resolve against ``registry`` (default: dsk's built-ins, :func:`dsk.testing.builtin_registry`).
    """
    import tomli_w

    from dsk.api import config_to_table
    from dsk.recipe.load import tomllib  # tomllib, or tomli on Python 3.10
    from dsk.testing import builtin_registry

    name = getattr(config_model, "__name__", repr(config_model))
    registry = registry if registry is not None else builtin_registry()
    given = set(table)
    for field_name, info in config_model.model_fields.items():
        if info.is_required() and field_name not in given and (info.alias or field_name) not in given:
            _fail(
                f"{name}.{field_name} has no default and the table does not give it; give every field a default "
                "(a recipe may leave any option out)"
            )
    config = _call(f"{name} validating {table!r}", registry.validate, config_model, table)
    try:
        text = tomli_w.dumps(config_to_table(config))
    except Exception as exc:
        raise AssertionError(
            f"{name} does not dump to TOML ({type(exc).__name__}: {exc}); use field types TOML can hold "
            "(str, int, float, bool, lists, tables)"
        ) from exc
    back = _call(f"{name} validating its own TOML dump\n{text}", registry.validate, config_model, tomllib.loads(text))
    if back != config:
        a, b = config.model_dump(), back.model_dump()
        diff = {k: (a[k], b.get(k)) for k in a if a[k] != b.get(k)}
        changed = ", ".join(f"{k} = {x!r} came back as {y!r}" for k, (x, y) in diff.items()) or repr(back)
        _fail(
            f"{name} does not survive a TOML round trip: {changed}; make every field serialise to a value TOML "
            "holds that validates back to it (TOML has no None: a field whose None is not its default is lost)"
        )
    return config


def check_registration(plugin_module: ModuleType | str, kind: str, name: str) -> None:
    """``plugin_module`` registers ``(kind, name)`` through its ``register_*`` hook, and imports without torch.

    The import is checked in a fresh interpreter (``sys.modules`` after ``import plugin_module``), so that
    ``dsk --help`` and ``dsk recipe validate`` stay light; the registration in a plugin manager holding only this
    module.
    """
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    module = plugin_module
    if isinstance(module, str):
        import importlib

        module = _call(f"import {plugin_module}", importlib.import_module, plugin_module)
    modname = module.__name__

    pm = isolated_plugin_manager(module, builtins=False)
    registry = build_registry(pm)
    failed = [f"{i.name}: {i.error}" for i in pm.failures()]
    if failed or registry.errors:
        _fail(f"plugin {modname} failed to register: {'; '.join(failed + list(registry.errors))}")
    specs = [s for s in registry.all(kind) if s.name == name]
    if not specs:
        found = sorted(f"{s.kind}/{s.name}" for s in registry.all())
        _fail(
            f"plugin {modname} does not register {kind}/{name} (it registers {found or 'nothing'}); call "
            f'register("{kind}", "{name}", "package.module:Class", config=...) in its register_* hook'
        )

    heavy = _IMPORTS.get(modname)
    if heavy is None:
        heavy = _IMPORTS[modname] = _imports_of(modname)
    if "torch" in heavy:
        _fail(
            f"importing plugin {modname} imports torch; keep plugin.py and config.py torch-free and name the "
            'implementation as a lazy "package.module:Class" string'
        )


_IMPORTS: dict[str, list[str]] = {}  # heavy modules a plugin module's import pulled in, per module (one subprocess)


def _imports_of(modname: str) -> list[str]:
    """The heavy modules (torch, numpy) that importing ``modname`` loads in a fresh interpreter."""
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({modname!r})\n"
        "heavy = sorted(m for m in ('torch', 'numpy') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env_with_path()
    )
    if proc.returncode != 0:
        _fail(f"importing plugin {modname} in a fresh interpreter failed:\n{proc.stderr.strip()[-2000:]}")
    return [m for m in proc.stdout.strip().split(",") if m]


def _env_with_path() -> dict[str, str]:
    """The environment, with this process's ``sys.path`` so the subprocess finds what the test imported."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env

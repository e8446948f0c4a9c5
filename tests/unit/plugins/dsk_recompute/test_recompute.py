"""Recompute (full / selective) on a tiny MLA + MoE + MTP model: exactly the run without it, at fewer saved bytes.

Tolerances: losses and router statistics must be equal (recomputation reruns the same kernels on the same inputs,
on CPU bit for bit); gradients within the dtype's rounding: every element within 2e-6 (float32) or 1e-14 (float64)
of the tensor's largest magnitude. Full recomputation and the SAC method give bit-identical gradients in practice;
selective by region back-propagates through each recomputed region in its own backward call, which sums a region
input's gradient with the other paths' in another order (measured: 5e-7 of the largest element in float32, 8e-16
in float64).
"""

from __future__ import annotations

import copy

import pytest
import torch
from dsk_mla import kernels as mla_kernels
from dsk_moe import kernels as moe_kernels
from dsk_recompute.recompute import apply_recompute, recomputed_blocks, remove_recompute

from dsk.model.loss import collect_side_channels, training_loss
from dsk.model.transformer import Block
from dsk.profile.activations import saved_activation_bytes
from tests.unit.model.tiny import VOCAB, tiny_model

TOL = {torch.float32: 2e-6, torch.float64: 1e-14}


@pytest.fixture(params=["kernels", "no_kernels"])
def kernels_on(request, monkeypatch):
    """Each test runs with the C++ kernels (DSK_CPU_KERNELS=1, the default) and without (=0)."""
    on = request.param == "kernels"
    monkeypatch.setenv("DSK_CPU_KERNELS", "1" if on else "0")
    if on and (mla_kernels.EXTENSION.load() is None or moe_kernels.EXTENSION.load() is None):
        pytest.skip("the C++ kernels do not build here")
    return on


def _batch(B=3, T=12, seed=1):
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))
    return ids, ids.clone()


#: the modes compared with the run without recompute: selective by region (the default), selective on torch's
#: selective-checkpoint contexts, full
MODES = {"selective": ("selective", "regions"), "selective-sac": ("selective", "sac"), "full": ("full", "regions")}


def _step(mode, dtype, *, seed=0):
    """One training forward/backward and optimizer step; everything the comparison needs."""
    model = tiny_model(seed=seed, dtype=dtype).train()
    if mode is not None:
        apply_recompute(model, MODES[mode][0], method=MODES[mode][1])
    side = collect_side_channels(model)
    ids, labels = _batch()
    out = training_loss(model, ids, labels, side=side)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loads = [t.clone() for t in side.stat_tensors()]
    metrics = side.metrics()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    side.after_optimizer_step()  # the router bias update from the step's loads
    biases = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    return {"loss": out.loss.detach(), "grads": grads, "loads": loads, "metrics": metrics, "biases": biases}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", list(MODES))
def test_loss_gradients_and_router_statistics_equal_the_run_without_recompute(mode, dtype, kernels_on):
    want, got = _step(None, dtype), _step(mode, dtype)
    assert torch.equal(got["loss"], want["loss"])
    assert got["grads"].keys() == want["grads"].keys() and len(want["grads"]) > 30
    for name, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=0, atol=TOL[dtype] * float(g.abs().max()), msg=name)
    # a recomputed forward counts no tokens: the step's loads, maxvio and the bias update are the same
    assert len(want["loads"]) == 4 and all(torch.equal(a, b) for a, b in zip(got["loads"], want["loads"], strict=True))
    assert want["loads"][0].sum() == 3 * 12 * 2  # B * T tokens, top-2, counted once (2 MoE layers, 2 MTP blocks)
    assert got["metrics"] == want["metrics"] and "maxvio" in str(want["metrics"])
    assert got["biases"].keys() == want["biases"].keys() and want["biases"]
    assert all(torch.equal(got["biases"][k], v) for k, v in want["biases"].items())
    assert any(v.abs().sum() > 0 for v in want["biases"].values())  # the update moved them


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_every_block_is_wrapped_and_the_state_dict_names_are_unchanged(mode):
    plain = tiny_model()
    model = copy.deepcopy(plain)
    blocks = apply_recompute(model, mode)
    assert len(blocks) == 3 + 2  # model.layers and the two MTP heads' blocks
    assert all(isinstance(b, Block) for b in blocks) and recomputed_blocks(model) == blocks
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_modules()] == [n for n, _ in plain.named_modules()]
    model.load_state_dict(plain.state_dict())  # a checkpoint written without the feature loads (and vice versa)
    twin = copy.deepcopy(model)  # a copy (EMA, reference model) runs its own blocks under recomputation
    assert recomputed_blocks(twin) and recomputed_blocks(twin)[0].forward.forward.__self__ is twin.layers[0]
    remove_recompute(model)
    assert recomputed_blocks(model) == []


def test_eval_and_generation_without_grad_run_the_blocks_directly(monkeypatch):
    import dsk_recompute.recompute as rc

    model = tiny_model()
    ids, _ = _batch(B=1, T=6)
    with torch.no_grad():
        want = model(ids).logits
    for mode, method, target in [("full", "regions", "checkpoint"), ("selective", "regions", "RegionRecompute")]:
        apply_recompute(model, mode, method=method)
        calls = []
        real = getattr(rc, target)
        monkeypatch.setattr(rc, target, lambda *a, real=real, calls=calls, **k: calls.append(1) or real(*a, **k))
        with torch.no_grad():
            got = model(ids).logits
        model(ids[:, :2], caches=model.make_caches(1, 8))
        assert calls == []  # no recomputation machinery without grad, nor with a KV cache (generation)
        model(ids)
        assert len(calls) == 3  # the main layers under grad (the MTP heads run only with with_mtp)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _count_kernel(monkeypatch, module, name):
    calls = []
    fn = getattr(module, name)

    def counted(*args):
        calls.append(1)
        return fn(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(("mode", "reruns"), [("selective", False), ("selective-sac", False), ("full", True)])
def test_selective_mode_keeps_the_kernels_outputs_instead_of_rerunning_them(mode, reruns, monkeypatch):
    if mla_kernels.EXTENSION.load() is None or moe_kernels.EXTENSION.load() is None:
        pytest.skip("the C++ kernels do not build here")
    model = tiny_model(dtype=torch.float32).train()
    apply_recompute(model, MODES[mode][0], method=MODES[mode][1])
    attn = _count_kernel(monkeypatch, mla_kernels.EXTENSION.load(), "mla_attention_forward")
    experts = _count_kernel(monkeypatch, moe_kernels.EXTENSION.load(), "experts_forward")
    ids, labels = _batch()
    loss = training_loss(model, ids, labels).loss
    forward_calls = (len(attn), len(experts))
    assert forward_calls == (5, 4)  # attention in 3 layers + 2 MTP blocks; experts in 2 MoE layers + 2 MTP blocks
    loss.backward()
    rerun = (len(attn) - forward_calls[0], len(experts) - forward_calls[1])
    assert rerun == (forward_calls if reruns else (0, 0))


def test_saved_activation_bytes_fall_in_both_modes(kernels_on):
    ids, labels = _batch(B=4, T=16)
    saved = {}
    for mode in (None, *MODES):
        model = tiny_model(dtype=torch.float32).train()
        if mode is not None:
            apply_recompute(model, MODES[mode][0], method=MODES[mode][1])
        training_loss(model, ids, labels).loss.backward()  # warm-up: lazily built tables are not activations
        got = saved_activation_bytes(lambda m=model: training_loss(m, ids, labels).loss, model)
        got.output.backward()
        saved[mode] = got.bytes
    assert saved["full"] < saved["selective"] < saved[None]
    assert saved["full"] < saved["selective-sac"] < saved[None]
    assert saved["full"] < 0.4 * saved[None]

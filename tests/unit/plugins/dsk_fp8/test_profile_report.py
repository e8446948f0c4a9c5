"""What the fp8 feature reports to ``dsk profile`` (:class:`dsk.api.Profiled`): per site, the mean over the measured
training forwards of the FP8 output's relative error against the same product in the input's dtype and of the
weight's E4M3 round-trip error, checked against a float64 computation from the plugin's own quantiser on the
inputs each call saw; nothing recorded outside ``profile_start`` / ``profile_report``; JSON-ready; pooled over
two gloo ranks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from dsk_fp8.config import FP8Config
from dsk_fp8.feature import FP8Feature, layer_of
from dsk_fp8.linear import FP8Linear, QuantErrors
from dsk_fp8.quant import quantize
from torch import nn

from dsk.api import Profiled
from dsk.model.loss import loss_from_output
from tests.distributed.harness import GROUP, run_ranks
from tests.unit.model.tiny import VOCAB, tiny_model

B = 16  # the block size the tiny model's dims take
DENSE, GROUPED = "layers.0.self_attn.o_proj", "layers.1.mlp.experts.w_down"


def _fp8_model(seed: int = 0, run=None) -> tuple[nn.Module, FP8Feature]:
    model = tiny_model(seed, torch.float32).train()
    feature = FP8Feature(FP8Config(block_size=B))
    feature.name = "fp8"
    feature.transform_model(model, run)
    return model, feature


def _step(model: nn.Module, seed: int, optimizer=None, autocast: bool = False) -> None:
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = loss_from_output(model, model(ids, with_mtp=True), ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()


def _capture(model: nn.Module, site: str) -> list[tuple[torch.Tensor, ...]]:
    """Every call's (x_RK, weight_ENK, load_E) of one site, copied as the impl receives them."""
    module_name, _, name = site.rpartition(".")
    impl = model.get_submodule(module_name).linear_impl
    calls: list[tuple[torch.Tensor, ...]] = []
    linear, grouped = impl.linear, impl.grouped

    def linear_and_keep(x, weight, s):
        if s == name:
            x_RK = x.detach().reshape(-1, x.shape[-1]).clone()
            calls.append((x_RK, weight.detach().clone().unsqueeze(0), torch.tensor([x_RK.shape[0]])))
        return linear(x, weight, s)

    def grouped_and_keep(x_RK, weight_ENK, load_E, s):
        if s == name:
            calls.append((x_RK.detach().clone(), weight_ENK.detach().clone(), load_E.detach().clone()))
        return grouped(x_RK, weight_ENK, load_E, s)

    impl.linear, impl.grouped = linear_and_keep, grouped_and_keep
    return calls


def _float64_errors(calls: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """The mean over the calls of ``||x_q W_q^T - x W^T|| / ||x W^T||`` and ``||W_q - W|| / ||W||`` in float64,
    with ``x_q`` (1 x B tiles) and ``W_q`` (B x B blocks per expert) the plugin's E4M3 values times their scales."""
    out, weight = [], []
    for x_RK, w_ENK, load_E in calls:
        xq = quantize(x_RK, (1, B)).dequantize().double()
        wq = quantize(w_ENK, (B, B)).dequantize().double()
        x, w = x_RK.double(), w_ENK.double()
        sizes = load_E.tolist()
        y8 = torch.cat([a @ b.t() for a, b in zip(xq.split(sizes), wq.unbind(0), strict=True)])
        ref = torch.cat([a @ b.t() for a, b in zip(x.split(sizes), w.unbind(0), strict=True)])
        out.append(float(torch.linalg.vector_norm(y8 - ref) / torch.linalg.vector_norm(ref)))
        weight.append(float(torch.linalg.vector_norm(wq - w) / torch.linalg.vector_norm(w)))
    return sum(out) / len(out), sum(weight) / len(weight)


def test_reported_errors_equal_a_float64_computation_on_the_same_inputs():
    model, feature = _fp8_model()
    assert isinstance(feature, Profiled)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # the weights move between the measured calls
    calls = {site: _capture(model, site) for site in (DENSE, GROUPED)}
    _step(model, 0, optimizer)  # a warm-up step: not recorded
    assert feature.errors.sums == {}
    for c in calls.values():
        c.clear()
    feature.profile_start()
    _step(model, 1, optimizer)
    _step(model, 2, optimizer)
    report = feature.profile_report()

    errors = report["quant_error"]
    assert set(errors) == set(feature.sites)  # every site ran in both measured steps (MTP blocks included)
    for site, e in errors.items():
        assert e["calls"] == 2, site
        assert 1e-4 < e["output_rel_error"] < 0.1, (site, e)  # E4M3, 16-wide tiles: ~2-5e-2 here
        assert 1e-4 < e["weight_rel_error"] < 0.1, (site, e)
    for site, c in calls.items():
        assert len(c) == 2
        out, weight = _float64_errors(c)
        assert errors[site]["output_rel_error"] == pytest.approx(out, rel=1e-4), site
        assert errors[site]["weight_rel_error"] == pytest.approx(weight, rel=1e-5), site
    # the two calls saw other weights and inputs: the mean is not simply one call's
    assert _float64_errors(calls[DENSE][:1])[0] != pytest.approx(_float64_errors(calls[DENSE])[0], rel=1e-6)

    layers = {layer_of(s) for s in errors}
    assert set(report["by_layer"]) == layers
    assert {"layers.0", "layers.1", "mtp.layers.0", "mtp.layers.1"} <= layers
    for layer, e in report["by_layer"].items():
        mine = [v for s, v in errors.items() if layer_of(s) == layer]
        assert e["output_rel_error"] == max(v["output_rel_error"] for v in mine)
        assert e["weight_rel_error"] == max(v["weight_rel_error"] for v in mine)
    assert json.loads(json.dumps(report)) == report  # plain floats, ints and strings


def test_nothing_is_recorded_outside_start_and_report_nor_in_eval_forwards():
    model, feature = _fp8_model()
    _step(model, 0)
    assert feature.profile_report() == {"quant_error": {}, "by_layer": {}}  # never started: nothing
    feature.profile_start()
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 32, dtype=torch.long))  # evaluation is not a measured training forward
    model.train()
    assert feature.errors.sums == {}
    _step(model, 1)
    first = feature.profile_report()
    assert all(e["calls"] == 1 for e in first["quant_error"].values())
    _step(model, 2)  # after the report: recording is off again
    assert feature.errors.sums == {} and not feature.errors.on
    assert feature.profile_report()["quant_error"] == {}
    assert dict(feature.counts) == {s: 9 for s in feature.sites}  # 3 steps x 3 GEMMs: counting is untouched


def test_bf16_activations_are_compared_with_the_bf16_product():
    # an impl on its own (no module: "training" is autograd on); bf16 activations, a float32 master weight
    errors = QuantErrors()
    impl = FP8Linear("m", block_size=B, gemm="dequant", errors=errors)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 64, generator=g).to(torch.bfloat16).requires_grad_()
    w = torch.randn(32, 64, generator=g, requires_grad=True)
    errors.on = True
    y = impl.linear(x, w, "proj")
    assert y.dtype == torch.bfloat16
    # the FP8 product (float64 from the E4M3 operands, rounded to the output's bf16) against the product of a plain
    # bf16 linear, x @ W^T with W cast to bf16 (what a linear computes on bf16 activations)
    y8 = quantize(x.detach(), (1, B)).dequantize().double() @ quantize(w.detach(), (B, B)).dequantize().double().t()
    ref = (x.detach() @ w.detach().to(torch.bfloat16).t()).double()
    want = float(torch.linalg.vector_norm(y8.to(torch.bfloat16).double() - ref) / torch.linalg.vector_norm(ref))
    out, _, calls = errors.sums["m.proj"]
    assert calls == 1
    assert float(out) == pytest.approx(want, rel=1e-3)
    assert 1e-3 < float(out) < 0.1


def _rank(rank: int, world: int) -> tuple[dict, dict]:
    """One rank: the same model, its own batch; this rank's own sums and the pooled report."""
    from dsk_parallel.data import Replicate

    torch.set_num_threads(1)
    strategy = Replicate()
    strategy.setup(None)
    model, feature = _fp8_model(run=SimpleNamespace(parallel=strategy))
    feature.profile_start()
    _step(model, 10 + rank)
    local = {k: (float(o), float(w), n) for k, (o, w, n) in feature.errors.sums.items()}
    report = feature.profile_report()
    strategy.teardown()
    return local, report


@pytest.mark.xdist_group(GROUP)
def test_two_ranks_pool_their_calls_and_report_the_same():
    (local0, report0), (local1, report1) = run_ranks(_rank, 2)
    assert report0 == report1
    assert set(report0["quant_error"]) == set(local0) == set(local1)
    for site, e in report0["quant_error"].items():
        assert e["calls"] == local0[site][2] + local1[site][2] == 2
        assert e["output_rel_error"] == pytest.approx((local0[site][0] + local1[site][0]) / 2, rel=1e-12)
        assert e["weight_rel_error"] == pytest.approx(local0[site][1], rel=1e-6)  # the same weights on both
        assert not math.isclose(local0[site][0], local1[site][0], rel_tol=1e-9)  # the batches differ

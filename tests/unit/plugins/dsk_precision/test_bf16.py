"""The bf16 feature: BF16 compute under autocast, FP32 master weights and gradients, names and eval unchanged."""

from __future__ import annotations

import pytest
import torch
from dsk_precision.bf16 import BF16

from dsk.api.runtime import generate, training_loss
from dsk.train.metrics import read_metrics
from tests.unit.train.helpers import TINY_RECIPE, make_run, tiny_table, write_recipe


def _run(tmp_path, features, **trainer):
    table = tiny_table()
    table["features"] = features
    table["trainer"].update(trainer)
    return make_run(tmp_path, table, *_registry())


def _registry():
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager()
    return build_registry(pm), pm


def _dtypes_of_linears(model, input_ids, labels):
    """Output dtype of every projection GEMM of the forward (F.linear calls of the components and the head)."""
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen.setdefault(name, out.dtype)

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        loss = training_loss(model, input_ids, labels)
    finally:
        for h in hooks:
            h.remove()
    return loss, seen


def test_a_bf16_step_keeps_fp32_weights_and_grads_and_computes_in_bf16(tmp_path):
    run = _run(tmp_path / "bf16", {"bf16": {}})
    ref = _run(tmp_path / "fp32", {})
    state = run.batches.state_dict()
    batch = next(run.batches)
    run.batches.load_state_dict(state)
    # the linears the components read through linear_impl are not called as modules; the head and the MTP
    # projection are, and they are GEMMs autocast runs in BF16
    loss, dtypes = _dtypes_of_linears(run.model, batch["input_ids"], batch["labels"])
    assert dtypes["lm_head"] == torch.bfloat16 and dtypes["mtp.layers.0.eh_proj"] == torch.bfloat16
    assert loss.loss.dtype == torch.float32 and loss.logits.dtype == torch.bfloat16  # the CE upcasts
    with torch.no_grad():
        ref_loss = training_loss(ref.model, batch["input_ids"], batch["labels"])
        assert ref_loss.logits.dtype == torch.float32  # without the feature nothing is BF16
    # BF16 rounding (8 bits of mantissa, 2^-8 relative) of every GEMM moves the loss by far less than that
    assert float(loss.lm_loss.detach()) == pytest.approx(float(ref_loss.lm_loss), rel=4e-3)
    assert float(loss.lm_loss.detach()) != float(ref_loss.lm_loss)  # but it does move: the GEMMs really ran in BF16
    row = run.train_step()
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in run.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in run.optimizer.state.values())
    ref_row = ref.train_step()
    assert row["loss"] == pytest.approx(ref_row["loss"], rel=4e-3)


def test_routed_experts_run_a_bf16_grouped_gemm_under_bf16(tmp_path):
    run = _run(tmp_path, {"bf16": {}})
    experts = run.model.layers[1].mlp.experts
    x_RD, load_E = torch.randn(12, 32), torch.tensor([3, 0, 5, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # not the fp32 CPU kernel (it would ignore autocast): torch._grouped_mm on operands the experts cast
        assert experts.resolve_dispatch(x_RD, "auto") == "grouped_mm"
        out_RD = experts(x_RD, load_E)
    assert out_RD.dtype == torch.bfloat16
    assert experts.resolve_dispatch(x_RD, "auto") in ("cpu_kernel", "grouped_mm")  # fp32 without autocast
    with torch.no_grad():
        w = [p.detach().double() for p in (experts.w_gate, experts.w_up, experts.w_down)]
        rows = []
        for e, (x, n) in enumerate(zip(x_RD.double().split(load_E.tolist()), load_E.tolist(), strict=True)):
            if n:
                rows.append(torch.nn.functional.silu(x @ w[0][e].T) * (x @ w[1][e].T) @ w[2][e].T)
        ref_RD = torch.cat(rows)
    err = (out_RD.double() - ref_RD).abs().max() / ref_RD.abs().max()
    assert err < 2e-2  # BF16 operands: a few 2^-8 roundings, nothing like a wrong product


def test_the_router_scores_in_fp32_under_autocast(tmp_path):
    run = _run(tmp_path, {"bf16": {}})
    gate = run.model.layers[1].mlp.gate
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = gate.scores(x)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, gate.scores(x))  # the same GEMM as without autocast, to FP32 rounding


def test_state_dict_names_are_unchanged_and_hooks_come_off(tmp_path):
    run = _run(tmp_path / "a", {"bf16": {}})
    ref = _run(tmp_path / "b", {})
    assert list(run.model.state_dict()) == list(ref.model.state_dict())
    feature = run.built.features[0]
    assert isinstance(feature, BF16)
    feature.remove()
    batch = next(run.batches)
    with torch.no_grad():
        assert training_loss(run.model, batch["input_ids"], batch["labels"]).logits.dtype == torch.float32


def test_the_autocast_context_is_left_when_the_forward_raises(tmp_path):
    run = _run(tmp_path, {"bf16": {}})
    with pytest.raises(ValueError):
        run.model(torch.zeros(1, 4, dtype=torch.long), caches=[None])  # wrong number of caches
    assert not torch.is_autocast_enabled("cpu")


def test_policy_names_the_dtypes_for_a_sharding_strategy():
    from dsk_precision.config import BF16Config

    policy = BF16(BF16Config(reduce_dtype="bfloat16")).policy
    assert (policy.param_dtype, policy.compute_dtype, policy.reduce_dtype, policy.master_dtype) == (
        torch.bfloat16,
        torch.bfloat16,
        torch.bfloat16,
        torch.float32,
    )
    assert BF16().policy.reduce_dtype == torch.float32
    mp = BF16().policy.fsdp_policy()
    assert mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32


def test_generation_after_bf16_training_works(tmp_path):
    run = _run(tmp_path, {"bf16": {}})
    run.train_step()
    prompt = run.tokenizer.encode("12+3=")
    out = generate(run.model, [prompt], max_new_tokens=5, temperature=0.0)
    assert len(out.tokens[0]) == 5
    assert not torch.is_autocast_enabled("cpu")
    assert all(p.dtype == torch.float32 for p in run.model.parameters())


def test_cli_trains_a_few_steps_in_bf16(tmp_path, dsk_cli):
    recipe = write_recipe(tmp_path, TINY_RECIPE + "\n[features.bf16]\n")
    result = dsk_cli(["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--set", "trainer.steps=4",
                      "--set", "trainer.eval_samples=2", "--set", "checkpoint.every=0"])  # fmt: skip
    assert result.exit_code == 0, result.output + str(result.exception)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(rows) == 4 and all(r["loss"] == r["loss"] for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_bf16_composes_with_recompute(tmp_path, mode):
    plain = _run(tmp_path / "p", {"bf16": {}})
    again = _run(tmp_path / "r", {"bf16": {}, "recompute": {"mode": mode}})
    assert [f.name for f in again.built.features] == ["bf16", "recompute"]
    rows = [plain.train_step(), again.train_step()]
    # the rerun replays the forward's ops in the dtypes autocast gave them: the same BF16 arithmetic
    assert rows[0]["loss"] == rows[1]["loss"]
    for (name, a), b in zip(plain.model.named_parameters(), again.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)

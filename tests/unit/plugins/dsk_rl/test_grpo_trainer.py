"""The GRPO trainer's step on a tiny model: masking, zero-signal batches, old log-probs, KL reference, resume."""

import math

import pytest
import torch
from dsk_rl import grpo as grpo_module
from dsk_rl.rollout import Samples

from .helpers import grpo_table, make_grpo_run, parameters


def fake_sampler(completions, truncated):
    """A stand-in for ``rollout.sample`` returning fixed completion texts (encoded with the run's tokenizer)."""

    def sample(model, tokenizer, prompt_ids, n, **kwargs):
        repeated = [list(p) for p in prompt_ids for _ in range(n)]
        texts = [completions[i % len(completions)] for i in range(len(repeated))]
        ids = [tokenizer.encode(t) + ([] if truncated[i % len(truncated)] else [tokenizer.eos_id]) for i, t in
               enumerate(texts)]  # fmt: skip
        return Samples(repeated, ids, [truncated[i % len(truncated)] for i in range(len(repeated))], texts)

    return sample


def with_reward_spread(run):
    """Replace the accuracy reward by 0, 1, 2, 0, 1, 2... so that every group has a learning signal (a random policy
    rarely answers right)."""
    rollout = run.rollout

    def spread(step):
        records, samples, scores = rollout(step)
        scores.values[:, 0] = torch.arange(len(samples), dtype=torch.float64) % 3
        scores.__post_init__()
        return records, samples, scores

    run.rollout = spread
    return run


def test_all_truncated_completions_with_masking_give_zero_loss_and_no_update(tmp_path, dsk_registry, dsk_pm,
                                                                              monkeypatch):  # fmt: skip
    monkeypatch.setattr(grpo_module, "sample", fake_sampler(["<answer>1", "<answer>23"], [True, True]))
    run = make_grpo_run(tmp_path, grpo_table(mask_truncated_completions=True), dsk_registry, dsk_pm)
    before = parameters(run.model)
    row = run.train_step()
    assert row["loss"] == 0.0 and row["completions/clipped_ratio"] == 1.0
    for name, value in parameters(run.model).items():
        assert torch.equal(value, before[name]), name


def test_a_step_changes_every_trained_parameter_and_logs_the_grpo_metrics(tmp_path, dsk_registry, dsk_pm):
    run = make_grpo_run(tmp_path, grpo_table(lr=5e-2, prompts_per_step=8, max_completion_length=4), dsk_registry,
                        dsk_pm)  # fmt: skip
    assert not any(p.requires_grad for p in run.model.mtp.parameters())  # a policy loss never reaches MTP heads
    before = parameters(run.model)
    row = with_reward_spread(run).train_step()
    unchanged = [n for n, v in parameters(run.model).items() if torch.equal(v, before[n])]
    assert not unchanged
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy/mean", "rewards/format/std",
                "clip_ratio/region_mean", "entropy", "completions/mean_length", "completions/clipped_ratio",
                "grad_norm", "lr"):  # fmt: skip
        assert key in row and row[key] is not None, key
    assert row["frac_reward_zero_std"] == 0.0 and math.isfinite(row["loss"])


def test_zero_reward_spread_gives_zero_loss_without_running_the_backward(tmp_path, dsk_registry, dsk_pm,
                                                                          monkeypatch):  # fmt: skip
    monkeypatch.setattr(grpo_module, "sample", fake_sampler(["<answer>1</answer>"], [False]))
    run = make_grpo_run(tmp_path, grpo_table(), dsk_registry, dsk_pm)
    before = parameters(run.model)
    row = run.train_step()
    assert row["frac_reward_zero_std"] == 1.0 and row["loss"] == 0.0 and row["grad_norm"] == 0.0
    # a first AdamW step with a zero gradient has no momentum yet: nothing moves
    assert all(torch.equal(v, before[n]) for n, v in parameters(run.model).items())


@pytest.mark.parametrize("overhead", [100_000, 1], ids=["one_pass_per_micro_batch", "length_groups"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_leaving_out_zero_advantage_rows_keeps_the_exact_update(tmp_path, dsk_registry, dsk_pm, loss_type, overhead):
    """Rows with advantage 0 are not forwarded, and (overhead 1) the rows of a micro-batch run in groups of equal
    length; either way the update equals the full batch's in one pass per micro-batch (computed here by hand)."""
    from dsk_rl.grpo_loss import aggregate, clipped_surrogate, group_advantages, token_logprobs
    from dsk_rl.rollout import completion_logits, length_groups, pack

    table = grpo_table(loss_type=loss_type, micro_batch_size=6, lr=1e-2, length_group_overhead=overhead)
    run = with_reward_spread(make_grpo_run(tmp_path, table, dsk_registry, dsk_pm))
    run.model.double()
    records, samples, scores = run.rollout(1)
    scores.values[4:8, 0] = 1.0  # the second group has no spread: its rows are left out of the forward
    scores.values[:, 1] = 0.0
    scores.__post_init__()
    run.rollout = lambda step: (records, samples, scores)
    packed = pack(samples.prompt_ids, samples.completion_ids, run.tokenizer.pad_id)
    adv = group_advantages(scores.total, 4).advantages
    assert (adv[4:8] == 0).all() and (adv[:4] != 0).any()
    run.model.zero_grad()
    chunks = [torch.arange(s, min(s + 6, 16)) for s in range(0, 16, 6)]
    for idx in chunks:
        mb = packed.rows(idx)
        logp = token_logprobs(completion_logits(run.model, mb), mb.targets)
        token = clipped_surrogate(logp, logp.detach(), adv[idx])
        aggregate(token.loss, mb.mask, loss_type, max_completion_length=6, num_items_in_batch=packed.mask.sum(),
                  grad_accum_steps=len(chunks)).backward()  # fmt: skip
    expected = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    aux = run.model.layers[1].mlp
    aux.aux_loss = lambda: None  # compare the policy gradient alone
    run.optimizer.step = lambda: None  # keep the gradients for inspection
    passes = []
    forward = completion_logits

    def counted(model, mb):
        passes.append(mb.input_ids.shape)
        return forward(model, mb)

    grpo_module.completion_logits = counted
    try:
        run.train_step()
    finally:
        grpo_module.completion_logits = forward
    # one pass per micro-batch with rows that carry a signal, or (overhead 1) about one per distinct row length
    lengths = [len(p) + len(c) for p, c in zip(samples.prompt_ids, samples.completion_ids, strict=True)]
    signal = [[i for i in idx.tolist() if adv[i] != 0] for idx in chunks]
    signal = [rows for rows in signal if rows]
    if overhead == 1:
        assert len(passes) == sum(len(length_groups([lengths[i] for i in rows], 1)) for rows in signal)
        assert len(passes) > len(signal), "the completions should differ in length"
    else:
        assert len(passes) == len(signal)
    for name, p in run.model.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-9, atol=1e-12, msg=name)


def test_later_iterations_reuse_the_first_pass_log_probs(tmp_path, dsk_registry, dsk_pm, monkeypatch):
    calls = []
    real = grpo_module.clipped_surrogate

    def spy(logp, old, adv, **kw):
        calls.append((logp.detach().clone(), old.clone()))
        return real(logp, old, adv, **kw)

    monkeypatch.setattr(grpo_module, "clipped_surrogate", spy)
    run = make_grpo_run(tmp_path, grpo_table(num_iterations=2, micro_batch_size=16, lr=5e-2), dsk_registry, dsk_pm)
    with_reward_spread(run).train_step()
    (logp0, old0), (logp1, old1) = calls
    assert torch.equal(logp0, old0)  # first pass: rho = 1 exactly
    assert torch.equal(old1, old0)  # second pass: the stored old log-probs
    assert not torch.equal(logp1, old1)  # ... against a policy that has moved


def test_beta_adds_a_k3_kl_to_a_reference_saved_for_resume(tmp_path, dsk_registry, dsk_pm):
    run = make_grpo_run(tmp_path, grpo_table(beta=0.1, lr=5e-2, ref_update_every=2), dsk_registry, dsk_pm)
    assert (tmp_path / "reference" / "step-0.safetensors").is_file()
    first = run.train_step()
    assert first["kl"] == pytest.approx(0.0, abs=1e-12)  # the policy starts as the reference
    second = run.train_step()
    assert second["kl"] > 0
    assert (tmp_path / "reference" / "step-2.safetensors").is_file()  # refreshed at step 2


def test_resume_continues_with_the_same_losses(tmp_path, dsk_registry, dsk_pm):
    table = grpo_table(steps=3, lr=5e-2, beta=0.05)
    table["checkpoint"] = {"every": 1, "keep": 3}
    full = make_grpo_run(tmp_path / "full", table, dsk_registry, dsk_pm)
    rows = [full.train_step() for _ in range(3)]
    first = make_grpo_run(tmp_path / "split", table, dsk_registry, dsk_pm)
    first.train_step()
    first.train_step()
    ckpt = first.save("interval")
    resumed = make_grpo_run(tmp_path / "split", table, dsk_registry, dsk_pm, resume_from=ckpt)
    again = resumed.train_step()
    for key in ("loss", "reward", "entropy", "kl", "grad_norm"):
        assert again[key] == rows[2][key], key

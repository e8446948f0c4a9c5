"""GRPO rollouts with speculative sampling (``trainer.rollout_drafter = "mtp"``): greedy rollouts identical to plain
ones, so the whole step is; sampled rollouts reproducible and reporting acceptance; refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from .helpers import grpo_table, make_grpo_run


def _run(tmp_path, **trainer):
    from dsk.registry import build_registry
    from dsk.testing import isolated_plugin_manager

    pm = isolated_plugin_manager()
    return make_grpo_run(tmp_path, grpo_table(**trainer), build_registry(pm), pm)


def test_greedy_speculative_rollouts_give_the_plain_step(tmp_path):
    """At temperature 0 the drafted rollouts are the plain rollouts token for token, so the losses, rewards and
    updated weights of two steps are equal; the row reports the drafts' acceptance."""
    torch.manual_seed(0)
    plain = _run(tmp_path / "p", temperature=0.0)
    torch.manual_seed(0)
    spec = _run(tmp_path / "s", temperature=0.0, rollout_drafter="mtp")
    for _ in range(2):
        a, b = plain.train_step(), spec.train_step()
        assert plain._last_batch[1].completion_ids == spec._last_batch[1].completion_ids
        for key in ("loss", "reward", "grad_norm", "completions/mean_length"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        assert "rollout/acceptance_rate" not in a
        assert 0.0 <= b["rollout/acceptance_rate"] <= 1.0
        assert b["rollout/tokens_per_forward"] >= 1.0 - 1e-9
    for (n, p), (_, q) in zip(plain.model.named_parameters(), spec.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_sampled_speculative_rollouts_are_reproducible(tmp_path):
    """At temperature 1, two runs from the same seed draw the same completions (per-group generators, a fixed
    generation batch), and the step counts its drafts."""
    rows, batches = [], []
    for name in ("a", "b"):
        torch.manual_seed(0)
        run = _run(tmp_path / name, rollout_drafter="mtp")
        rows.append(run.train_step())
        batches.append(run._last_batch[1])
    assert batches[0].completion_ids == batches[1].completion_ids
    assert rows[0]["loss"] == rows[1]["loss"]
    assert batches[0].drafted > 0 and 0 <= batches[0].accepted <= batches[0].drafted
    assert rows[0]["rollout/acceptance_rate"] == batches[0].accepted / batches[0].drafted


def test_a_drafter_the_model_does_not_offer_is_a_setup_error(tmp_path):
    from dsk.api.runtime import RunSetupError

    with pytest.raises(RunSetupError, match=r"trainer.rollout_drafter: .*no component offering a drafter named 'eagle' "
                       r"\(offered: mtp\)"):  # fmt: skip
        _run(tmp_path, rollout_drafter="eagle")

"""dsk.profile.activations: saved-activation bytes on cases whose answer is known by hand."""

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dsk.profile.activations import saved_activation_bytes

M, K, N = 16, 8, 12


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(K, N, generator=g, requires_grad=True)
    return x, w


def test_exp_saves_its_output_and_nothing_else():
    x, _ = _inputs()
    got = saved_activation_bytes(lambda: x.exp().sum())
    assert got.bytes == M * K * 4  # exp's backward reads its result; sum keeps only the shape
    got.output.backward()
    torch.testing.assert_close(x.grad, x.detach().exp())


def test_a_gemm_output_consumed_by_relu_is_freed_and_relu_output_is_kept():
    x, w = _inputs()
    lin = torch.nn.Linear(K, N, bias=False)
    # mm saves its input x (made before the forward, not counted) and the weight (a parameter); relu saves its output
    got = saved_activation_bytes(lambda: torch.relu(lin(x)).sum(), lin)
    assert got.bytes == M * N * 4
    assert got.n_storages == 1
    assert got.created_bytes >= 2 * M * N * 4  # the freed mm output was created too


def test_nothing_is_saved_without_grad():
    x, w = _inputs()
    with torch.no_grad():
        assert saved_activation_bytes(lambda: (x @ w).exp().sum()).bytes == 0


def test_full_checkpoint_keeps_only_its_inputs():
    x, w = _inputs()
    got = saved_activation_bytes(
        lambda: checkpoint(lambda a, b: (a @ b).sin().exp(), x, w, use_reentrant=False, preserve_rng_state=False).sum()
    )
    assert got.bytes == 0
    got.output.backward()
    z = (x @ w).detach()
    torch.testing.assert_close(x.grad, (z.sin().exp() * z.cos()) @ w.detach().T)


def test_selective_checkpoint_cache_is_counted_where_saved_tensor_hooks_see_nothing():
    x, w = _inputs()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op == torch.ops.aten.mm.default else CheckpointPolicy.PREFER_RECOMPUTE

    packed = []

    def fwd():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            return checkpoint(
                lambda a, b: (a @ b).exp(),
                x,
                w,
                use_reentrant=False,
                preserve_rng_state=False,
                context_fn=lambda: create_selective_checkpoint_contexts(policy),
            ).sum()

    got = saved_activation_bytes(fwd)
    # SAC caches mm's output (exp is recomputed from it in the backward): the hooks saw checkpoint's holders only
    assert got.bytes == M * N * 4
    assert packed and all(t.shape != (M, N) for t in packed)

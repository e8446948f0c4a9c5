"""DSKModel: shapes, the training loss (LM + MTP + aux, computed apart from forward), stages, caches, side channels."""

import pytest
import torch
import torch.nn.functional as F

from dsk.data.batching import IGNORE_INDEX
from dsk.model.build import build_model
from dsk.model.loss import collect_side_channels, cross_entropy, staged_training_loss, training_loss
from dsk.model.transformer import split_layers
from tests.unit.model.tiny import VOCAB, tiny_config, tiny_model


def _batch(B=2, T=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    return ids, ids.clone()


def test_forward_returns_logits_and_hidden_of_every_position():
    model = tiny_model()
    ids, _ = _batch(B=3, T=7)
    out = model(ids)
    assert out.logits.shape == (3, 7, VOCAB)
    assert out.hidden.shape == (3, 7, 32)
    assert out.mtp_logits is None


def test_keep_logits_computes_only_the_last_positions():
    model = tiny_model()
    ids, _ = _batch(B=2, T=7)
    torch.testing.assert_close(model(ids, keep_logits=2).logits, model(ids).logits[:, -2:])


def test_first_k_dense_layers_use_the_dense_ffn_and_the_rest_the_moe():
    model = tiny_model()
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["Dense", "MoE", "MoE"]
    assert all(type(layer.block.mlp).__name__ == "MoE" for layer in model.mtp.layers)


def test_loss_is_hand_computed_cross_entropy_plus_mtp_plus_aux():
    model = tiny_model().train()
    ids, labels = _batch()
    labels[0, :3] = -100  # a masked prompt
    out = training_loss(model, ids, labels)

    logp = F.log_softmax(out.logits, dim=-1)
    B, T = ids.shape
    nll, n = 0.0, 0
    for b in range(B):
        for t in range(1, T):
            if labels[b, t] != -100:
                nll -= logp[b, t - 1, labels[b, t]]
                n += 1
    lm = nll / n
    # MTP: depth k at position i scores labels[i+k+1]; normalised by the main loss's n (the paper's 1/T).
    mtp = 0.0
    for k, lg in enumerate(out.mtp_logits, start=1):
        lpk = F.log_softmax(lg, dim=-1)
        for b in range(B):
            for i in range(T - k - 1):
                if labels[b, i + k + 1] != -100:
                    mtp -= lpk[b, i, labels[b, i + k + 1]] / n
    mtp = 0.3 / 2 * mtp
    aux = sum(m.aux_loss() for m in model.modules() if type(m).__name__ == "MoE")

    torch.testing.assert_close(out.lm_loss, lm)
    torch.testing.assert_close(out.mtp_loss, mtp)
    torch.testing.assert_close(out.aux_loss, aux.to(out.aux_loss.dtype))
    torch.testing.assert_close(out.loss, lm + mtp + out.aux_loss)


def test_all_ignored_labels_give_zero_lm_loss_not_nan():
    model = tiny_model(mtp=None)
    ids, labels = _batch()
    out = training_loss(model, ids, torch.full_like(labels, -100))
    assert out.lm_loss.item() == 0.0
    assert out.mtp_loss is None


def test_loss_backpropagates_into_embedding_mtp_and_experts():
    model = tiny_model(dtype=torch.float32).train()
    ids, labels = _batch()
    training_loss(model, ids, labels).loss.backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0
    assert model.layers[1].mlp.experts.w_gate.grad.abs().sum() > 0


def test_chunked_forward_with_caches_equals_one_full_forward():
    model = tiny_model()
    ids, _ = _batch(B=2, T=9)
    full = model(ids).logits
    caches = model.make_caches(2, 9)
    parts = [model(ids[:, a:b], caches=caches).logits for a, b in ((0, 4), (4, 5), (5, 9))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full)
    assert caches[0].length == 9


def test_cache_longer_than_max_seq_len_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        tiny_model().make_caches(1, 65)


def test_tied_embeddings_share_the_weight_and_count_once():
    tied = tiny_model(tie_embeddings=True)
    untied = tiny_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 32
    assert tied.num_parameters(exclude_embeddings=True) == untied.num_parameters(exclude_embeddings=True)


def test_vocab_size_comes_from_the_tokenizer_when_unset():
    cfg = tiny_config(vocab_size=None)
    assert build_model(cfg, vocab_size=40).lm_head.weight.shape == (40, 32)
    with pytest.raises(ValueError, match="no tokenizer vocabulary size"):
        build_model(cfg)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_model(tiny_config(), vocab_size=VOCAB + 1)


def test_side_channels_report_each_moe_layer_and_update_router_bias():
    model = tiny_model(dtype=torch.float32).train()
    ids, labels = _batch()
    training_loss(model, ids, labels).loss.backward()
    n_moe = 2 + 2  # two main MoE layers, one per MTP depth
    side = collect_side_channels(model)
    assert len(side.stat_tensors()) == n_moe
    metrics = side.metrics()
    assert {"layers.1.mlp.maxvio", "layers.2.mlp.maxvio", "maxvio/mean", "maxvio/max"} <= set(metrics)
    routers = [m.gate for m in model.modules() if type(m).__name__ == "MoE"]
    unbalanced = [r for r in routers if r.step_load.unique().numel() > 1]
    assert unbalanced, "the batch happens to balance every layer; pick another seed"
    biases = [r.e_score_correction_bias.clone() for r in unbalanced]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    side.after_optimizer_step()
    assert all(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(biases, unbalanced, strict=True))
    assert all(
        torch.equal(g, p.grad)
        for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True)
    )


def _old_in_forward_loss(model, ids, labels):
    """The loss as ``DSKModel.forward(ids, labels)`` computed it before it moved out of forward (same ops, same
    order): shifted-label CE, then ``mtp.loss``, then the sum of the components' aux losses in module order."""
    h = model.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])
    for layer in model.layers:
        h = layer(h, pos, None, None)
    h = model.norm(h)
    logits = model.lm_head(h)
    loss = cross_entropy(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))
    loss = loss + model.mtp.loss(model.mtp(h, ids, model.embed_tokens, model.lm_head, pos=pos, mask=None), labels)
    aux = [m.aux_loss() for m in model.modules() if m is not model and callable(getattr(m, "aux_loss", None))]
    aux = [a for a in aux if a is not None]
    return loss + torch.stack([a.to(loss.dtype) for a in aux]).sum()


def test_training_loss_equals_the_old_in_forward_loss_bit_for_bit():
    model = tiny_model(dtype=torch.float32).train()
    ids, labels = _batch()
    labels[1, :4] = IGNORE_INDEX
    torch.manual_seed(0)
    new = training_loss(model, ids, labels).loss
    old = _old_in_forward_loss(model, ids, labels)
    assert torch.equal(new, old)


def _deep_model():
    table = {"n_layers": 8, "first_k_dense": 1}
    return tiny_model(dtype=torch.float64, **table).train()


@pytest.mark.parametrize("n_stages", [2, 3, 4, 8])
def test_stages_run_in_turn_give_the_unsplit_loss_and_gradients_exactly(n_stages):
    ids, labels = _batch(B=2, T=12)
    whole = _deep_model()
    loss = training_loss(whole, ids, labels).loss
    loss.backward()
    cut = _deep_model()
    bounds = split_layers(len(cut.layers), n_stages)
    stages = [cut.stage(a, b, first=i == 0, last=i == n_stages - 1) for i, (a, b) in enumerate(bounds)]
    staged = staged_training_loss(stages, cut, ids, labels).loss
    staged.backward()
    assert torch.equal(loss, staged)
    for (name, p), (_, q) in zip(whole.named_parameters(), cut.named_parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), name
    # every parameter belongs to exactly the stages that run it: the embedding to the first, head and MTP to the last
    owned = [{id(p) for p in s.parameters()} for s in stages]
    assert id(cut.embed_tokens.weight) in owned[0] and id(cut.lm_head.weight) in owned[-1]
    assert sum(len(o) for o in owned) >= len({id(p) for p in cut.parameters()})


def test_layers_split_evenly_or_as_asked_and_impossible_splits_are_refused():
    assert split_layers(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_layers(8, 2, [5, 3]) == [(0, 5), (5, 8)]
    with pytest.raises(ValueError, match="cannot cut 8 layers into 9 stages"):
        split_layers(8, 9)
    with pytest.raises(ValueError, match="summing to 8"):
        split_layers(8, 2, [4, 3])


def test_parts_are_listed_in_execution_order():
    names = [n for n, _ in tiny_model().parts()]
    assert names == ["embed_tokens", "layers.0", "layers.1", "layers.2", "norm", "lm_head", "mtp"]

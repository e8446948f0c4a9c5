"""DSKModel: shapes, the loss (LM + MTP + aux), caches and the side-channel helpers."""

import pytest
import torch
import torch.nn.functional as F

from dsk.model.build import build_model
from dsk.model.transformer import after_optimizer_step, step_metrics, step_stat_tensors
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
    assert out.loss is None and out.mtp_logits is None


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
    out = model(ids, labels)

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
    out = model(ids, torch.full_like(labels, -100))
    assert out.lm_loss.item() == 0.0
    assert out.mtp_loss is None


def test_loss_backpropagates_into_embedding_mtp_and_experts():
    model = tiny_model(dtype=torch.float32).train()
    ids, labels = _batch()
    model(ids, labels).loss.backward()
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
    model(ids, labels).loss.backward()
    n_moe = 2 + 2  # two main MoE layers, one per MTP depth
    assert len(step_stat_tensors(model)) == n_moe
    metrics = step_metrics(model)
    assert {"layers.1.mlp.maxvio", "layers.2.mlp.maxvio", "maxvio/mean", "maxvio/max"} <= set(metrics)
    routers = [m.gate for m in model.modules() if type(m).__name__ == "MoE"]
    unbalanced = [r for r in routers if r.step_load.unique().numel() > 1]
    assert unbalanced, "the batch happens to balance every layer; pick another seed"
    biases = [r.e_score_correction_bias.clone() for r in unbalanced]
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    after_optimizer_step(model)
    assert all(not torch.equal(b, r.e_score_correction_bias) for b, r in zip(biases, unbalanced, strict=True))
    assert all(
        torch.equal(g, p.grad)
        for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None], strict=True)
    )

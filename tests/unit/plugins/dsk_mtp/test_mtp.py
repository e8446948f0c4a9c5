"""MTP heads: shapes, the loss against a hand computation, the concat order and registration."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from dsk_mtp.config import MTPConfig
from pydantic import ValidationError

from tests.unit.model.tiny import VOCAB, tiny_model


def _batch(B=2, T=9):
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    return ids, ids.clone()


def test_depth_k_gives_logits_for_t_minus_k_positions():
    model = tiny_model()
    ids, _ = _batch()
    out = model(ids)
    logits = model.mtp(out.hidden, ids, model.embed_tokens, model.lm_head)
    assert [lg.shape for lg in logits] == [(2, 8, VOCAB), (2, 7, VOCAB)]


def test_mtp_loss_matches_a_hand_computation_with_the_paper_1_over_t():
    model = tiny_model()
    ids, labels = _batch()
    labels[1, :4] = -100  # a masked prompt
    labels[0, 6] = -100
    logits = model.mtp(model(ids).hidden, ids, model.embed_tokens, model.lm_head)
    total, per_depth = model.mtp.loss(logits, labels, per_depth=True)

    B, T = ids.shape
    n_main = int((labels[:, 1:] != -100).sum())  # targets of the main next-token loss
    for k, lg in enumerate(logits, start=1):
        logp = F.log_softmax(lg, dim=-1)
        s = 0.0
        for b in range(B):
            for i in range(T - k - 1):  # depth k at i predicts the token at i + k + 1
                if labels[b, i + k + 1] != -100:
                    s -= logp[b, i, labels[b, i + k + 1]].item()
        assert per_depth[k - 1].item() == pytest.approx(s / n_main, rel=1e-12)
    assert total.item() == pytest.approx(0.3 / 2 * sum(x.item() for x in per_depth), rel=1e-12)


def test_depth_one_chain_is_eh_proj_of_embedding_then_hidden_through_the_block():
    model = tiny_model()
    ids, _ = _batch(B=1, T=6)
    h0 = model(ids).hidden
    layer = model.mtp.layers[0]
    emb = model.embed_tokens(ids[:, 1:])
    # embedding first, as the engines that run the released weights do
    x = F.linear(torch.cat([layer.enorm(emb), layer.hnorm(h0[:, :5])], dim=-1), layer.eh_proj.weight)
    want = model.lm_head(layer.shared_head.norm(layer.block(x, torch.arange(5))))
    got = model.mtp(h0, ids, model.embed_tokens, model.lm_head)[0]
    torch.testing.assert_close(got, want)


def test_mtp_logits_at_a_position_do_not_depend_on_later_tokens():
    model = tiny_model()
    ids, _ = _batch(B=1, T=8)
    other = ids.clone()
    other[0, 6:] = (other[0, 6:] + 1) % VOCAB
    a = model.mtp(model(ids).hidden, ids, model.embed_tokens, model.lm_head)
    b = model.mtp(model(other).hidden, other, model.embed_tokens, model.lm_head)
    # depth k at position i reads tokens up to i + k: positions i <= 5 - k are untouched by the change at 6
    torch.testing.assert_close(a[0][:, :5], b[0][:, :5])
    torch.testing.assert_close(a[1][:, :4], b[1][:, :4])


def test_step_with_a_cache_equals_the_full_sequence_forward():
    model = tiny_model()
    ids, _ = _batch(B=1, T=8)
    h0 = model(ids).hidden
    full = model.mtp(h0, ids, model.embed_tokens, model.lm_head)[0]
    cache = model.mtp.make_caches(1, 8)[0]
    parts = []
    for a, b in ((0, 3), (3, 4), (4, 7)):
        _, lg = model.mtp.step(
            1, h0[:, a:b], ids[:, a + 1 : b + 1], model.embed_tokens, model.lm_head, pos=torch.arange(a, b), cache=cache
        )
        parts.append(lg)
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_config_validates_depth_and_weight():
    assert MTPConfig().depth == 1 and MTPConfig().loss_weight == 0.3
    with pytest.raises(ValidationError):
        MTPConfig(depth=0)
    with pytest.raises(ValidationError):
        MTPConfig(loss_weight=-0.1)


def test_plugin_registers_mtp_without_importing_torch(dsk_registry):
    spec = dsk_registry.get("mtp", "mtp")
    assert spec.config is MTPConfig and spec.impl == "dsk_mtp.mtp:MTP"
    code = "import sys, dsk_mtp.plugin, dsk_mtp.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

"""One optimizer step of the next-token trainers: accumulation, SFT masking, non-finite skipping, metrics."""

import math

import pytest
import torch
from dsk_trainers.lm import encoder_for, moe_metrics

from dsk.data.batching import IGNORE_INDEX, encode_example
from dsk.data.tokenizers import CharTokenizer
from tests.unit.train.helpers import make_run, tiny_table


def _dense_table(**trainer):
    """The tiny recipe with a dense FFN and no MTP: its loss is a plain mean over target tokens."""
    table = tiny_table()
    table["model"]["ffn"] = {"type": "dense", "hidden_dim": 64}
    del table["model"]["mtp"]
    table["trainer"].update(trainer)
    return table


def test_grad_accumulation_equals_one_big_batch(tmp_path, dsk_registry, dsk_pm):
    runs = []
    for name, bs, accum in (("big", 8, 1), ("accum", 4, 2)):
        run = make_run(tmp_path / name, _dense_table(batch_size=bs, grad_accum=accum), dsk_registry, dsk_pm)
        run.model.double()  # float64 so that the only difference left would be a real one
        runs.append(run)
    rows = [run.train_step() for run in runs]
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)  # rows hold float32 values
    assert rows[0]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-10)
    for (name, a), b in zip(runs[0].model.named_parameters(), runs[1].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_sft_encoder_masks_the_prompt_and_pretrain_does_not():
    tok = CharTokenizer()
    record = {"prompt": "12+3=", "completion": "<answer>15</answer>"}
    sft_ids, sft_mask = encoder_for("sft", tok)(record)
    pre_ids, pre_mask = encoder_for("pretrain", tok)(record)
    assert sft_ids == pre_ids == encode_example(tok, record["prompt"], record["completion"])[0]
    n_prompt = 1 + len(tok.encode(record["prompt"]))  # BOS + prompt
    assert sft_mask == [0] * n_prompt + [1] * (len(sft_ids) - n_prompt)
    assert pre_mask == [0] + [1] * (len(pre_ids) - 1)


def test_sft_masking_reaches_the_loss(tmp_path, dsk_registry, dsk_pm):
    """The SFT step's loss is the cross-entropy over completion tokens only, computed here independently."""
    run = make_run(tmp_path, _dense_table(type="sft", batch_size=4), dsk_registry, dsk_pm)
    state = run.batches.state_dict()
    batch = next(run.batches)
    run.batches.load_state_dict(state)  # the step below reads the same batch
    tok = run.tokenizer
    prompt_lens = [1 + len(tok.encode(r["prompt"])) for r in (run.task.sample("train", i) for i in range(4))]
    labels = batch["labels"]  # aligned with input_ids: BOS and the prompt are not targets
    for row, n_prompt in enumerate(prompt_lens):
        assert (labels[row, :n_prompt] == IGNORE_INDEX).all()
        assert labels[row, n_prompt] != IGNORE_INDEX

    with torch.no_grad():
        logits = run.model(batch["input_ids"]).logits
    ids = batch["input_ids"]
    total, count = 0.0, 0
    for row, n_prompt in enumerate(prompt_lens):
        length = int((batch["doc_ids"][row] >= 0).sum())
        for t in range(n_prompt - 1, length - 1):  # predict tokens n_prompt .. length-1 (completion + EOS)
            total -= torch.log_softmax(logits[row, t].double(), -1)[ids[row, t + 1]].item()
            count += 1
    row = run.train_step()
    assert row["loss"] == pytest.approx(total / count, rel=1e-5)


def test_non_finite_step_is_skipped_without_touching_weights_or_router_biases(tmp_path, dsk_registry, dsk_pm):
    table = tiny_table()
    table["trainer"]["debug_nonfinite_steps"] = [1]
    run = make_run(tmp_path, table, dsk_registry, dsk_pm)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    row = run.train_step()
    assert row["skipped"] and math.isnan(row["loss"]) and row["nonfinite_skipped"] == 1
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    row = run.train_step()
    assert not row["skipped"] and row["nonfinite_skipped"] == 1 and run.in_a_row == 0


def test_step_row_has_per_layer_maxvio_and_the_mean(tmp_path, dsk_registry, dsk_pm):
    run = make_run(tmp_path, tiny_table(), dsk_registry, dsk_pm)
    row = run.train_step()
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "nonfinite_skipped"} <= set(row)
    assert "moe/layer1/maxvio" in row and "moe/mtp0/maxvio" in row
    assert row["moe/maxvio"] == pytest.approx((row["moe/layer1/maxvio"] + row["moe/mtp0/maxvio"]) / 2)
    assert moe_metrics(run.built.side.metrics()) == {}  # counts were reset by after_optimizer_step


def test_packed_rows_give_each_example_the_logits_it_has_alone(tmp_path, dsk_registry, dsk_pm):
    """With the document mask and one position range per row, packing changes nothing an example sees (RoPE is
    relative), which is what the packed trainer step relies on."""
    from dsk.data.batching import collate, document_causal_mask, pack

    table = tiny_table()
    table["trainer"].update(packing=True, seq_len=48)
    run = make_run(tmp_path, table, dsk_registry, dsk_pm)
    run.model.double().eval()
    encode = encoder_for("pretrain", run.tokenizer)
    examples = [encode(run.task.sample("train", i)) for i in range(2)]
    rows = pack(examples, 48)
    assert len(rows) == 1 and rows[0].doc_ids[-1] == 1  # both examples share one row
    packed = collate(rows, run.tokenizer.pad_id, 48)
    with torch.no_grad():
        logits = run.model(packed["input_ids"], mask=document_causal_mask(packed["doc_ids"])).logits[0]
        n0 = len(examples[0][0])
        for start, (ids, _) in ((0, examples[0]), (n0, examples[1])):
            alone = run.model(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(logits[start : start + len(ids)], alone, rtol=1e-9, atol=1e-9)
    row = run.train_step()  # and the packed step trains
    assert math.isfinite(row["loss"]) and row["tokens"] > 8 * 20


def test_the_loop_collects_garbage_itself_and_restores_the_collector(tmp_path, dsk_registry, dsk_pm, monkeypatch):
    import gc

    from dsk.train import loop

    monkeypatch.setattr(loop, "GC_EVERY", 2)
    collections = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation) or 0)
    table = _dense_table(steps=4)
    run = make_run(tmp_path, table, dsk_registry, dsk_pm)
    enabled_in_loop = []
    step = run.train_step
    monkeypatch.setattr(run, "train_step", lambda: enabled_in_loop.append(gc.isenabled()) or step())
    assert gc.isenabled()
    run.run()
    assert enabled_in_loop == [False] * 4  # automatic collections are off while the loop steps
    assert collections == [2, 1, 1]  # a full pass before the loop, then the young generations every GC_EVERY steps
    assert gc.isenabled() and gc.get_freeze_count() == 0

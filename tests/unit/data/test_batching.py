"""Batching: SFT loss masks, packing with document ids, collation and exact resume of the data stream."""

from itertools import islice

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsk.data.batching import (
    IGNORE_INDEX,
    BatchIterator,
    ExampleStream,
    TokenRow,
    collate,
    document_causal_mask,
    encode_example,
    pack,
)
from dsk.data.tokenizers import CharTokenizer

TOK = CharTokenizer()


def test_sft_labels_are_ignored_on_exactly_the_prompt_tokens():
    ids, mask = encode_example(TOK, "12+34=", "<think>2+4=6 1+3=4</think><answer>46</answer>")
    n_prompt = 1 + len("12+34=")  # BOS + prompt
    assert mask[:n_prompt] == [0] * n_prompt
    assert all(mask[n_prompt:]) and ids[-1] == TOK.eos_id
    batch = collate([(ids, mask)], TOK.pad_id, max_len=64)
    labels = batch["labels"][0].tolist()
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert TOK.decode(labels[n_prompt:]) == "<think>2+4=6 1+3=4</think><answer>46</answer>"


@given(st.text(alphabet="0123456789+=", max_size=12), st.text(alphabet="0123456789", min_size=1, max_size=8))
@settings(max_examples=100, deadline=None)
def test_sft_mask_property(prompt, completion):
    ids, mask = encode_example(TOK, prompt, completion)
    assert len(ids) == len(mask) == len(prompt) + len(completion) + 2
    assert sum(mask) == len(completion) + 1  # completion and EOS


def test_pretraining_text_is_a_target_everywhere_but_bos():
    ids, mask = encode_example(TOK, "1+1=2")
    assert ids[0] == TOK.bos_id and mask == [0] + [1] * (len(ids) - 1)


def test_collate_pads_with_pad_id_and_ignores_padding():
    a = encode_example(TOK, "1+1=", "2")
    b = encode_example(TOK, "10+10=", "20")
    batch = collate([a, b], TOK.pad_id, max_len=64)
    assert batch["input_ids"].shape == (2, len(b[0])) and batch["input_ids"].dtype == torch.long
    pad = len(b[0]) - len(a[0])
    assert batch["input_ids"][0, -pad:].tolist() == [TOK.pad_id] * pad
    assert batch["labels"][0, -pad:].tolist() == [IGNORE_INDEX] * pad
    assert batch["doc_ids"][0, -pad:].tolist() == [-1] * pad
    assert collate([a], TOK.pad_id, max_len=32, pad_to_max_len=True)["input_ids"].shape == (1, 32)


def test_collate_truncates_to_max_len():
    ex = encode_example(TOK, "1234567890", "1234567890")
    assert collate([ex], TOK.pad_id, max_len=8)["input_ids"].shape == (1, 8)


def test_pack_keeps_order_and_numbers_documents_per_row():
    examples = [([1, 5, 5, 2], [0, 1, 1, 1]), ([1, 6, 2], [0, 1, 1]), ([1, 7, 7, 7, 2], [0, 1, 1, 1, 1])]
    rows = pack(examples, max_len=8)
    assert [r.ids for r in rows] == [[1, 5, 5, 2, 1, 6, 2], [1, 7, 7, 7, 2]]
    assert rows[0].doc_ids == [0, 0, 0, 0, 1, 1, 1] and rows[1].doc_ids == [0] * 5
    assert rows[0].loss_mask == [0, 1, 1, 1, 0, 1, 1]


def test_pack_truncates_an_example_longer_than_a_row():
    rows = pack([([1] * 10, [1] * 10), ([2, 2], [1, 1])], max_len=4)
    assert [r.ids for r in rows] == [[1, 1, 1, 1], [2, 2]]


def test_packed_positions_restart_per_document_and_mask_blocks_other_documents():
    rows = pack([([1, 5, 2], [0, 1, 1]), ([1, 6, 6, 2], [0, 1, 1, 1])], max_len=10)
    batch = collate(rows + [TokenRow([1, 7], [0, 1], [0, 0])], TOK.pad_id, max_len=10)
    assert batch["doc_ids"][0].tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 0, 0, 0, 0]
    mask = document_causal_mask(batch["doc_ids"])
    assert mask.shape == (2, 7, 7)
    assert not mask[0, 3, :3].any()  # second document never sees the first
    assert mask[0, 6, 3:7].all() and not mask[0, 2, 3:].any()
    assert mask.any(dim=-1).all()  # no empty query row, padding included
    assert not mask[1, :2, 2:].any()  # real tokens never see padding


def records(n):
    return [{"prompt": f"{i}+{i}=", "completion": f"<answer>{2 * i}</answer>"} for i in range(n)]


def test_stream_reshuffles_each_epoch_and_is_seeded():
    data = records(10)
    first = [r["prompt"] for r in islice(ExampleStream(data, seed=1), 20)]
    again = [r["prompt"] for r in islice(ExampleStream(data, seed=1), 20)]
    other = [r["prompt"] for r in islice(ExampleStream(data, seed=2), 20)]
    assert first == again and first != other
    assert sorted(first[:10]) == sorted(first[10:]) and first[:10] != first[10:]


@pytest.mark.parametrize("packed", [False, True])
def test_batch_iterator_resumes_exactly(packed):
    def make():
        return BatchIterator(ExampleStream(records(13), seed=7), TOK, batch_size=3, max_len=24, pack=packed)

    full = make()
    reference = [next(full) for _ in range(8)]
    head = make()
    for _ in range(3):
        next(head)
    state = head.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for want in reference[3:]:
        got = next(resumed)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert resumed.state_dict() == full.state_dict()


def test_packed_batches_hold_several_documents_and_lose_none():
    it = BatchIterator(ExampleStream(records(50), shuffle=False), TOK, batch_size=2, max_len=40, pack=True)
    batch = next(it)
    assert batch["doc_ids"].max() >= 1
    # Every record placed is consumed once: the stream position equals the number of documents in the batch.
    n_docs = int((batch["doc_ids"].max(dim=1).values + 1).sum())
    assert it.stream.position == n_docs


def test_task_stream_is_infinite_and_resumable():
    class FakeTask:
        def sample(self, split, index):
            return {"prompt": f"{index}=", "completion": str(index)}

    stream = ExampleStream.from_task(FakeTask())
    assert [next(stream)["completion"] for _ in range(3)] == ["0", "1", "2"]
    state = stream.state_dict()
    again = ExampleStream.from_task(FakeTask())
    again.load_state_dict(state)
    assert next(again)["completion"] == "3" and state["source_len"] is None


def test_resume_refuses_changed_data_or_seed():
    state = ExampleStream(records(5), seed=0).state_dict()
    with pytest.raises(ValueError, match="source of 5 records"):
        ExampleStream(records(6), seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        ExampleStream(records(5), seed=1).load_state_dict(state)

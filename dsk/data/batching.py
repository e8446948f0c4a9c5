"""Turn records into training batches: encoding with SFT loss masks, packing, collation and a resumable stream.

Label convention (the Hugging Face one): ``labels`` is *aligned* with ``input_ids``; ``labels[b, t]`` is the token
at position ``t`` when that token is a training target, else ``-100``. The loss shifts: logits at ``t - 1`` are
scored against ``labels[:, t]``. Aligned labels let multi-token prediction read the targets of depth ``k`` as
``labels[:, t + k]`` without a second tensor.

What is a target:
- pre-training text (``{"text"}``): every token except BOS;
- SFT (``{"prompt", "completion"}``): the completion tokens and the closing EOS, never the prompt (DeepSeek-V3
  SFT, TRL ``completion_only_loss``).
BOS is never a target: in a packed row it would be "predicted" from the previous document's last token.

Torch is imported inside the functions that build tensors; the rest is plain Python.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "IGNORE_INDEX",
    "BatchIterator",
    "ExampleStream",
    "TokenRow",
    "collate",
    "document_causal_mask",
    "encode_example",
    "encode_record",
    "pack",
]

IGNORE_INDEX = -100  # the ignore_index of torch.nn.functional.cross_entropy

Encoded = tuple[list[int], list[int]]  # (ids, loss_mask)


def encode_example(
    tok: Any,
    prompt: str,
    completion: str | None = None,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
) -> Encoded:
    """Token ids and loss mask of one example.

    ``ids = [BOS] + encode(prompt) + encode(completion) + [EOS]``. With a completion (SFT) the mask is 1 on the
    completion tokens and EOS only; without one (pre-training text in ``prompt``) it is 1 on every token but BOS.
    Prompt and completion are encoded separately so the boundary is exact even for BPE, whose merges could
    otherwise cross it.

    Args:
        tok: a dsk tokenizer (``encode``, ``bos_id``, ``eos_id``).
        prompt: the prompt, or the whole text for pre-training.
        completion: the target text of an SFT example; None for pre-training.
        add_bos: prepend BOS when the tokenizer has one.
        add_eos: append EOS when the tokenizer has one (so a model learns to stop).

    Returns:
        ``(ids, loss_mask)``, two lists of the same length; ``loss_mask[t]`` is 1 when token ``t`` is a target.
    """
    head = [tok.bos_id] if add_bos and tok.bos_id is not None else []
    tail = [tok.eos_id] if add_eos and tok.eos_id is not None else []
    prompt_ids = tok.encode(prompt)
    if completion is None:
        ids = head + prompt_ids + tail
        return ids, [0] * len(head) + [1] * (len(prompt_ids) + len(tail))
    completion_ids = tok.encode(completion)
    ids = head + prompt_ids + completion_ids + tail
    return ids, [0] * (len(head) + len(prompt_ids)) + [1] * (len(completion_ids) + len(tail))


def encode_record(tok: Any, record: dict[str, Any]) -> Encoded:
    """Encode a record: ``{"prompt", "completion", ...}`` as SFT, ``{"text"}`` as pre-training text."""
    if "prompt" in record and "completion" in record:
        return encode_example(tok, record["prompt"], record["completion"])
    if "text" in record:
        return encode_example(tok, record["text"])
    raise ValueError(f"record has keys {sorted(record)}; expected 'text' or 'prompt' and 'completion'")


@dataclass
class TokenRow:
    """One row of a batch: tokens, loss mask and the document index of each token (several when packed)."""

    ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, example: Encoded) -> None:
        """Append one example as the next document of this row."""
        ids, mask = example
        doc = self.doc_ids[-1] + 1 if self.doc_ids else 0
        self.ids.extend(ids)
        self.loss_mask.extend(mask)
        self.doc_ids.extend([doc] * len(ids))


def _truncate(example: Encoded, max_len: int) -> Encoded:
    ids, mask = example
    return ids[:max_len], mask[:max_len]


def pack(examples: Iterable[Encoded], max_len: int) -> list[TokenRow]:
    """Pack examples, in order, into rows of at most ``max_len`` tokens (greedy, order-preserving).

    An example that does not fit in the current row starts the next one; one longer than ``max_len`` is truncated
    and fills a row alone. ``doc_ids`` numbers the examples within each row from 0, so attention can be limited to
    each example (:func:`document_causal_mask`) and positions restarted per example.
    """
    if max_len < 1:
        raise ValueError(f"pack max_len={max_len}: must be >= 1")
    rows: list[TokenRow] = []
    row = TokenRow()
    for example in examples:
        example = _truncate(example, max_len)
        if len(row) and len(row) + len(example[0]) > max_len:
            rows.append(row)
            row = TokenRow()
        row.add(example)
    if len(row):
        rows.append(row)
    return rows


def collate(
    examples: Sequence[Encoded | TokenRow],
    pad_id: int,
    max_len: int,
    *,
    pad_to_max_len: bool = False,
) -> dict[str, Any]:
    """Pad examples into a batch of LongTensors.

    Args:
        examples: ``(ids, loss_mask)`` pairs (one document per row) or packed :class:`TokenRow` s.
        pad_id: the tokenizer's pad id.
        max_len: rows longer than this are truncated.
        pad_to_max_len: pad every batch to ``max_len`` (fixed shapes, e.g. for ``torch.compile``) instead of to the
            longest row.

    Returns:
        ``input_ids`` [B, T] (padded with ``pad_id``); ``labels`` [B, T] (token where the loss mask is 1, else
        -100, including padding); ``doc_ids`` [B, T] (document index within the row, -1 on padding);
        ``position_ids`` [B, T] (position within the document, 0 on padding).
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    rows = [ex if isinstance(ex, TokenRow) else TokenRow(list(ex[0]), list(ex[1]), [0] * len(ex[0])) for ex in examples]
    for row in rows:
        if len(row.ids) != len(row.loss_mask):
            raise ValueError(f"ids ({len(row.ids)}) and loss_mask ({len(row.loss_mask)}) differ in length")
    T = max_len if pad_to_max_len else min(max_len, max(len(r) for r in rows))
    B = len(rows)

    def padded(values: list[int], fill: int) -> list[int]:
        values = values[:T]
        return values + [fill] * (T - len(values))

    input_ids = torch.tensor([padded(r.ids, pad_id) for r in rows], dtype=torch.long)  # (B, T)
    mask = torch.tensor([padded(r.loss_mask, 0) for r in rows], dtype=torch.bool)  # (B, T)
    doc_ids = torch.tensor([padded(r.doc_ids, -1) for r in rows], dtype=torch.long)  # (B, T)
    labels = input_ids.masked_fill(~mask, IGNORE_INDEX)

    # Position within each document: t minus the index where the token's document starts. A document starts where
    # doc_ids changes; cummax carries the latest start index forward along the row.
    t = torch.arange(T).expand(B, T)
    starts = torch.ones(B, T, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    position_ids = (t - first).masked_fill(doc_ids < 0, 0)
    return {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids, "position_ids": position_ids}


def document_causal_mask(doc_ids: Any) -> Any:
    """Attention mask [B, T, T] (True = may attend) for packed rows: causal and within the same document.

    Padding (doc id -1) only sees earlier padding, itself included, so no query row is empty (an all-False row
    would make the softmax NaN) and no real token ever sees padding.
    """
    import torch

    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # (B, T, T)
    return same_doc & causal


class ExampleStream:
    """A seeded, resumable, infinite stream of records.

    Args:
        source: a finite sequence of records (e.g. :class:`dsk.data.jsonl.JsonlSource`), read epoch after epoch in
            an order reshuffled every epoch from ``(seed, epoch)``; or a callable ``index -> record`` (e.g.
            ``lambda i: task.sample("train", i)``), read at index 0, 1, 2, ... (the callable owns its randomness).
        seed: seed of the shuffling.
        shuffle: False reads a finite source in file order every epoch.

    The whole state is the number of records consumed (``position``): the record at any position is a pure
    function of ``(source, seed, position)``, so ``load_state_dict`` resumes exactly where ``state_dict`` was taken.
    """

    def __init__(
        self, source: Sequence[dict[str, Any]] | Callable[[int], dict[str, Any]], *, seed: int = 0, shuffle: bool = True
    ):
        self.source = source
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0
        self._finite = not callable(source) or hasattr(source, "__len__")
        if self._finite and len(source) == 0:  # type: ignore[arg-type]
            raise ValueError("ExampleStream source is empty")
        self._order_epoch = -1
        self._order: list[int] = []

    @classmethod
    def from_task(cls, task: Any, split: str = "train") -> ExampleStream:
        """An infinite stream of ``task.sample(split, i)`` for i = 0, 1, 2, ..."""
        # partial, not a lambda: the stream stays picklable for data-loader worker processes
        return cls(functools.partial(task.sample, split))

    def _order_of(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            n = len(self.source)  # type: ignore[arg-type]
            order = list(range(n))
            if self.shuffle:
                # A string seed is hashed with SHA-512 by `random`, so the order is the same in every process.
                random.Random(f"dsk-stream:{self.seed}:{epoch}").shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def _record_at(self, position: int) -> dict[str, Any]:
        if not self._finite:
            return self.source(position)  # type: ignore[operator]
        n = len(self.source)  # type: ignore[arg-type]
        epoch, offset = divmod(position, n)
        return self.source[self._order_of(epoch)[offset]]  # type: ignore[index]

    @property
    def epoch(self) -> int:
        """Completed passes over a finite source (0 for a callable source)."""
        return self.position // len(self.source) if self._finite else 0  # type: ignore[arg-type]

    def peek(self) -> dict[str, Any]:
        """The next record, without consuming it."""
        return self._record_at(self.position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        record = self._record_at(self.position)
        self.position += 1
        return record

    def state_dict(self) -> dict[str, Any]:
        """The exact position: ``{"position", "seed", "source_len"}`` (plain ints, JSON-friendly)."""
        return {
            "position": self.position,
            "seed": self.seed,
            "source_len": len(self.source) if self._finite else None,  # type: ignore[arg-type]
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["position"]``; refuses a state taken with another seed or source size."""
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data stream state has seed {state['seed']}, this stream uses seed {self.seed}")
        source_len = len(self.source) if self._finite else None  # type: ignore[arg-type]
        if state.get("source_len", source_len) != source_len:
            raise ValueError(
                f"data stream state was taken on a source of {state['source_len']} records, this one has "
                f"{source_len}: the data changed, so resuming would not continue the same sequence"
            )
        self.position = int(state["position"])


class BatchIterator:
    """Seeded, resumable iterator of training batches built from an :class:`ExampleStream`.

    Args:
        stream: where records come from.
        tokenizer: a dsk tokenizer.
        batch_size: rows per batch.
        max_len: tokens per row (longer examples are truncated).
        pack: pack several examples into each row (:func:`pack` semantics) instead of one example per row.
        pad_to_max_len: always pad to ``max_len``.
        encode: ``record -> (ids, loss_mask)``; defaults to :func:`encode_record` with ``tokenizer``.

    Each batch is the dict of :func:`collate`. ``state_dict()`` is the stream position of the first record not yet
    placed in a batch (a record peeked at but left for the next packed row is not consumed), so a resumed iterator
    yields exactly the batches the original would have.
    """

    def __init__(
        self,
        stream: ExampleStream,
        tokenizer: Any,
        *,
        batch_size: int,
        max_len: int,
        pack: bool = False,
        pad_to_max_len: bool = False,
        encode: Callable[[dict[str, Any]], Encoded] | None = None,
    ):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
        self.stream = stream
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = max_len
        self.pack = pack
        self.pad_to_max_len = pad_to_max_len
        self._encode = encode or (lambda record: encode_record(tokenizer, record))
        self.batches = 0
        # Encoding of the record at a stream position, kept when a packed row peeks at a record it cannot take;
        # derived data, so it is not part of the state.
        self._peeked: tuple[int, Encoded] | None = None

    def _peek_encoded(self) -> Encoded:
        pos = self.stream.position
        if self._peeked is None or self._peeked[0] != pos:
            self._peeked = (pos, _truncate(self._encode(self.stream.peek()), self.max_len))
        return self._peeked[1]

    def _next_row(self) -> TokenRow:
        row = TokenRow()
        while len(row) < self.max_len:
            example = self._peek_encoded()
            if len(row) and len(row) + len(example[0]) > self.max_len:
                break  # leave it for the next row
            row.add(example)
            self.stream.position += 1
            if not self.pack:
                break
        return row

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        rows = [self._next_row() for _ in range(self.batch_size)]
        self.batches += 1
        return collate(rows, self.tokenizer.pad_id, self.max_len, pad_to_max_len=self.pad_to_max_len)

    def state_dict(self) -> dict[str, Any]:
        """``{"stream": stream.state_dict(), "batches": batches yielded}``."""
        return {"stream": self.stream.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume exactly where ``state_dict`` was taken."""
        self.stream.load_state_dict(state["stream"])
        self.batches = int(state.get("batches", 0))
        self._peeked = None

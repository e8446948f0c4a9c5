"""Build a :class:`DSKModel` from a validated :class:`ModelConfig`: every component through its slot."""

from __future__ import annotations

from dsk.api import ModelContext
from dsk.model.config import ModelConfig
from dsk.model.transformer import Block, DSKModel


def model_context(cfg: ModelConfig, vocab_size: int, layer_idx: int = 0) -> ModelContext:
    """The ``ModelContext`` handed to the components of layer ``layer_idx``."""
    return ModelContext(
        dim=cfg.dim,
        n_layers=cfg.n_layers,
        vocab_size=vocab_size,
        max_seq_len=cfg.max_seq_len,
        layer_idx=layer_idx,
        norm_eps=cfg.norm_eps,
        init_std=cfg.init_std,
    )


def build_block(cfg: ModelConfig, vocab_size: int, layer_idx: int) -> Block:
    """Layer ``layer_idx``: attention from ``cfg.attention``; FFN from ``cfg.dense_ffn`` below ``first_k_dense``,
    else ``cfg.ffn``. MTP blocks get indices ``n_layers, n_layers+1, ...`` and so the MoE FFN, as in V3."""
    ctx = model_context(cfg, vocab_size, layer_idx)
    dense = layer_idx < cfg.first_k_dense
    ffn = cfg.dense_ffn if dense else cfg.ffn
    block = Block(cfg.attention.build(ctx), ffn.build(ctx), cfg.dim, cfg.norm_eps)
    block.ffn_part = "dense_ffn" if dense else "ffn"  # the [model] slot it came from, for dsk profile's table
    return block


def resolve_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
    """``model.vocab_size`` when set (it may exceed the tokenizer's, e.g. padded), else the tokenizer's."""
    if cfg.vocab_size is None:
        if vocab_size is None:
            raise ValueError("model.vocab_size is not set and no tokenizer vocabulary size was given")
        return vocab_size
    if vocab_size is not None and vocab_size > cfg.vocab_size:
        raise ValueError(
            f"model.vocab_size = {cfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size}); "
            "unset it to use the tokenizer's size"
        )
    return cfg.vocab_size


def build_model(cfg: ModelConfig, vocab_size: int | None = None) -> DSKModel:
    """Construct the model described by ``cfg``.

    Args:
        cfg: the validated ``[model]`` table.
        vocab_size: the tokenizer's vocabulary size, used when ``cfg.vocab_size`` is None.
    """
    vocab = resolve_vocab_size(cfg, vocab_size)
    layers = [build_block(cfg, vocab, i) for i in range(cfg.n_layers)]
    mtp = None
    if cfg.mtp is not None:
        mtp = cfg.mtp.build(model_context(cfg, vocab, cfg.n_layers), lambda idx: build_block(cfg, vocab, idx))
    return DSKModel(cfg, vocab, layers, mtp)

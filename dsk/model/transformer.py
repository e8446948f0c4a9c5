"""The transformer skeleton: embedding, pre-norm blocks whose parts come from registry slots, final norm, head.

Module names follow HF's ``DeepseekV3ForCausalLM`` (``embed_tokens``, ``layers.i.input_layernorm``,
``layers.i.self_attn``, ``layers.i.post_attention_layernorm``, ``layers.i.mlp``, ``norm``, ``lm_head``), so a
checkpoint maps by adding or removing the ``model.`` prefix (see CHECKPOINT.md).

Label convention (the HF one, shared with ``dsk.data.batching``): ``labels`` is aligned with ``input_ids``;
``labels[:, t]`` is the token at position t when it is a training target, else -100 (padding, prompt, BOS). The
loss shifts: the logits at t-1 are scored against ``labels[:, t]``, and MTP depth k at t-1 against
``labels[:, t+k]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsk.model.config import ModelConfig
from dsk.model.norm import RMSNorm
from dsk.model.regions import profile_part


@dataclass
class ModelOutput:
    """What ``DSKModel.forward`` returns (the loss is computed apart: :func:`dsk.model.loss.training_loss`).

    Attributes:
        logits: [B, T, V] next-token logits of every position ([B, keep_logits, V] when asked for fewer).
        hidden: [B, T, D] final-norm hidden states (the ``h^0`` the MTP heads start from).
        mtp_logits: per MTP depth k, logits [B, T-k, V] for the tokens at i+k+1 (only with ``with_mtp=True``).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] | None = field(default=None, repr=False)


class Block(nn.Module):
    """One pre-norm layer: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``.

    Under ``dsk profile`` the parts run as profile parts named after their ``[model]`` slots (``attention``, and
    ``ffn_part``: ``ffn``, or ``dense_ffn`` for the first dense layers) and ``norm``.
    """

    #: the profile part of the FFN (set by the builder from the slot the FFN came from)
    ffn_part: str = "ffn"

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, dim: int, eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = mlp

    def forward(
        self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None
    ) -> torch.Tensor:
        """x [B,T,D], pos [T], mask [B,T,S] | None, cache | None -> [B,T,D]."""
        with profile_part("norm"):
            h = self.input_layernorm(x)
        with profile_part("attention"):
            x = x + self.self_attn(h, pos, mask, cache)
        with profile_part("norm"):
            h = self.post_attention_layernorm(x)
        with profile_part(self.ffn_part):
            return x + self.mlp(h)


class DSKModel(nn.Module):
    """A decoder-only DeepSeek-V3-style language model assembled from registry components.

    Built by :func:`dsk.model.build.build_model`; ``layers`` and ``mtp`` come already constructed.
    """

    def __init__(self, config: ModelConfig, vocab_size: int, layers: Sequence[nn.Module], mtp: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.embed_tokens = nn.Embedding(vocab_size, config.dim)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, vocab_size, bias=False)
        nn.init.normal_(self.embed_tokens.weight, std=config.init_std)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=config.init_std)
        self.mtp = mtp

    # -- parts in order (a pipeline cuts the model between them) ------------------------------------------------
    def parts(self) -> list[tuple[str, nn.Module]]:
        """The model's parts in execution order: ``embed_tokens``, ``layers.0`` .. ``layers.{L-1}``, ``norm``,
        ``lm_head``, then ``mtp`` when there are MTP heads (they run after the head and share the embedding and the
        head's weight, so they belong with the last stage)."""
        out: list[tuple[str, nn.Module]] = [("embed_tokens", self.embed_tokens)]
        out += [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]
        out += [("norm", self.norm), ("lm_head", self.lm_head)]
        if self.mtp is not None:
            out.append(("mtp", self.mtp))
        return out

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> h [B, T, D] (the first stage's own part)."""
        with profile_part("embedding"):
            return self.embed_tokens(input_ids)

    def run_layers(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
        caches: Sequence[Any] | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Blocks ``start .. end-1`` on h [B, T, D] -> [B, T, D]; ``caches`` holds one cache per model layer."""
        end = len(self.layers) if end is None else end
        for i in range(start, end):
            h = self.layers[i](h, pos, mask, caches[i] if caches is not None else None)
        return h

    def finish(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        pos: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        keep_logits: int | None = None,
        with_mtp: bool = False,
    ) -> ModelOutput:
        """The last stage's own parts: final norm, output head and (``with_mtp``) the MTP heads on h [B, T, D]."""
        with profile_part("norm"):
            h = self.norm(h)
        if not with_mtp:
            # the [B, T, V] logits of a long prompt cost more than the rest of a small model's prefill
            with profile_part("head"):
                return ModelOutput(logits=self.lm_head(h[:, -keep_logits:] if keep_logits else h), hidden=h)
        with profile_part("head"):
            out = ModelOutput(logits=self.lm_head(h), hidden=h)
        if self.mtp is not None:
            # The MTP chain starts at the main model's final-norm output h^0 (spec §4.6), as the engines that run the
            # released MTP weights do. Its blocks, and its head calls, are profiled as the slot's.
            with profile_part("mtp", absorb=True):
                out.mtp_logits = self.mtp(h, input_ids, self.embed_tokens, self.lm_head, pos=pos, mask=mask)
        return out

    def stage(self, start: int, end: int, *, first: bool, last: bool) -> ModelStage:
        """A pipeline stage running blocks ``start .. end-1``; the first stage also embeds, the last also runs the
        final norm, the head and the MTP heads. The stage holds the model's own modules (no copy)."""
        return ModelStage(self, start, end, first=first, last=last)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        caches: Sequence[Any] | None = None,
        keep_logits: int | None = None,
        with_mtp: bool = False,
    ) -> ModelOutput:
        """Run the model on ``input_ids``.

        Args:
            input_ids: [B, T] token ids.
            pos: absolute positions of the T tokens ([T], or [B, T] per row); default: the caches' next positions
                (``cache.positions(T)``), else ``arange(T)``.
            mask: [B, T, S] bool, True = may attend (S = cached + T keys); None = causal by position.
            caches: one cache per layer from :meth:`make_caches`; the T tokens are appended to them.
            keep_logits: compute the logits of the last ``keep_logits`` positions only (a prefill needs one);
                ignored with ``with_mtp``.
            with_mtp: also run the MTP heads (training: :func:`dsk.model.loss.training_loss` asks for them).

        Returns:
            ModelOutput with logits [B, T, V] and hidden [B, T, D] (and the MTP logits when asked).
        """
        B, T = input_ids.shape
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"got {len(caches)} caches for {len(self.layers)} layers")
        if pos is None:
            pos = caches[0].positions(T) if caches else torch.arange(T, device=input_ids.device)
        h = self.embed(input_ids)  # (B, T, D)
        h = self.run_layers(h, pos, mask, caches)
        return self.finish(h, input_ids, pos, mask, keep_logits=keep_logits, with_mtp=with_mtp)

    # -- inference helpers -------------------------------------------------------------------------
    def make_caches(
        self, batch: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> list[Any]:
        """One attention cache per layer, each holding up to ``max_len`` tokens of ``batch`` rows."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds model.max_seq_len = {self.config.max_seq_len}")
        device = device if device is not None else self.embed_tokens.weight.device
        dtype = dtype if dtype is not None else self.embed_tokens.weight.dtype
        return [layer.self_attn.make_cache(batch, max_len, device, dtype) for layer in self.layers]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (tied weights counted once); optionally without embedding and head."""
        skip = {id(self.embed_tokens.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) in seen or id(p) in skip:
                continue
            seen.add(id(p))
            total += p.numel()
        return total

    def cache_values_per_token(self) -> int:
        """Values cached per token over all main layers (for memory reports)."""
        return sum(int(layer.self_attn.cache_values_per_token()) for layer in self.layers)


class ModelStage(nn.Module):
    """Blocks ``start .. end-1`` of a :class:`DSKModel` as one pipeline stage (see :meth:`DSKModel.stage`).

    ``forward(x, input_ids, pos, mask)``: x is ``input_ids`` [B, T] on the first stage and the previous stage's
    hidden states [B, T, D] elsewhere; returns hidden states, or on the last stage the :class:`ModelOutput` with the
    MTP logits (the loss is computed from it by :func:`dsk.model.loss.training_loss`). The embedding counts as part
    of the first stage and the final norm, head and MTP heads as parts of the last; an MTP head reads the shared
    embedding and head, so a pipeline that puts the first and last stage on different ranks must share them (as
    DualPipeV places both on rank 0).
    """

    def __init__(self, model: DSKModel, start: int, end: int, *, first: bool, last: bool):
        super().__init__()
        if not 0 <= start <= end <= len(model.layers):
            raise ValueError(f"stage layers {start}..{end} outside the model's {len(model.layers)} layers")
        self.start, self.end, self.first, self.last = start, end, first, last
        # the layers are registered as this stage's submodules; the model is kept outside the module tree so that
        # a stage's parameters are exactly its own parts'
        self.layers = nn.ModuleList(model.layers[start:end])
        # the last stage's MTP heads embed the shifted tokens with the shared table: it is the last stage's too, so
        # that the stage's parameters (what a schedule computes weight gradients for) are all it uses
        shares_embedding = last and (model.mtp is not None or model.config.tie_embeddings)
        self.embed_tokens = model.embed_tokens if first or shares_embedding else None
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.mtp = model.mtp if last else None
        object.__setattr__(self, "_model", model)

    def forward(
        self, x: torch.Tensor, input_ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None
    ) -> Any:
        model: DSKModel = self._model  # type: ignore[assignment]
        # Each stage's forward is framed by the whole model's forward hooks, as the model's own forward would be:
        # a feature's region entered by a pre-hook on the model (BF16 autocast) then covers every stage. The hooks
        # see this stage's input and output.
        args = (x,)
        for key, hook in list(model._forward_pre_hooks.items()):
            hook(model, args, {}) if key in model._forward_pre_hooks_with_kwargs else hook(model, args)
        out: Any = None
        try:
            h = model.embed(x) if self.first else x
            h = model.run_layers(h, pos, mask, None, self.start, self.end)
            out = h if not self.last else model.finish(h, input_ids, pos, mask, with_mtp=True)
        finally:
            for key, hook in list(model._forward_hooks.items()):
                if out is None and key not in model._forward_hooks_always_called:
                    continue
                hook(model, args, {}, out) if key in model._forward_hooks_with_kwargs else hook(model, args, out)
        return out


def split_layers(n_layers: int, n_stages: int, layers_per_stage: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` of each stage: ``layers_per_stage`` when given (must sum to ``n_layers``), else as
    even as possible with the earlier stages one layer longer.

    Raises:
        ValueError: an impossible split (the message names the numbers).
    """
    if n_stages < 1 or n_stages > n_layers:
        raise ValueError(f"cannot cut {n_layers} layers into {n_stages} stages (1..{n_layers})")
    if layers_per_stage is not None:
        if len(layers_per_stage) != n_stages or sum(layers_per_stage) != n_layers or min(layers_per_stage) < 1:
            raise ValueError(
                f"layers_per_stage = {list(layers_per_stage)} must have {n_stages} entries >= 1 summing to {n_layers}"
            )
        sizes = list(layers_per_stage)
    else:
        base, extra = divmod(n_layers, n_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(n_stages)]
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def truncate_caches(caches: Sequence[Any], length: int | torch.Tensor) -> None:
    """Roll every cache back to ``length`` tokens (an int for every row, or a LongTensor [B] per row)."""
    for c in caches:
        c.truncate(length)

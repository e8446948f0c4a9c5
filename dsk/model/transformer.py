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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dsk.data.batching import IGNORE_INDEX
from dsk.model.config import ModelConfig
from dsk.model.norm import RMSNorm


@dataclass
class ModelOutput:
    """What ``DSKModel.forward`` returns.

    Attributes:
        logits: [B, T, V] next-token logits of every position ([B, keep_logits, V] when asked for fewer).
        hidden: [B, T, D] final-norm hidden states (the ``h^0`` the MTP heads start from).
        loss: total loss ``lm_loss + mtp_loss + aux_loss`` (None without labels).
        lm_loss: mean next-token cross-entropy over the targets ``labels[:, 1:] != -100``.
        mtp_loss: weighted MTP loss ``(lambda/D) sum_k L^k`` (None without MTP heads or labels).
        aux_loss: sum of the components' auxiliary losses of this forward (None when there are none).
        mtp_logits: per MTP depth k, logits [B, T-k, V] for the tokens at i+k+1 (only computed with labels).
    """

    logits: torch.Tensor
    hidden: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    mtp_logits: list[torch.Tensor] | None = field(default=None, repr=False)


class Block(nn.Module):
    """One pre-norm layer: ``x + self_attn(input_layernorm(x))``, then ``x + mlp(post_attention_layernorm(x))``."""

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
        x = x + self.self_attn(self.input_layernorm(x), pos, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    # -- forward -----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        caches: Sequence[Any] | None = None,
        keep_logits: int | None = None,
    ) -> ModelOutput:
        """Run the model on ``input_ids``.

        Args:
            input_ids: [B, T] token ids.
            labels: [B, T] aligned with input_ids (-100 = not a target; the loss shifts them). With labels the
                output has the losses, and the MTP heads run.
            pos: [T] absolute positions of the T tokens, shared by the batch; default ``cache.length + arange(T)``.
            mask: [B, T, S] bool, True = may attend (S = cached + T keys); None = causal by position.
            caches: one cache per layer from :meth:`make_caches`; the T tokens are appended to them.
            keep_logits: compute the logits of the last ``keep_logits`` positions only (a prefill needs one);
                ignored when labels are given.

        Returns:
            ModelOutput with logits [B, T, V] and hidden [B, T, D] (and the losses when labels are given).
        """
        B, T = input_ids.shape
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"got {len(caches)} caches for {len(self.layers)} layers")
        if pos is None:
            start = int(caches[0].length) if caches else 0
            pos = torch.arange(start, start + T, device=input_ids.device)
        h = self.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, mask, caches[i] if caches is not None else None)
        h = self.norm(h)
        if labels is None:
            # the [B, T, V] logits of a long prompt cost more than the rest of a small model's prefill
            return ModelOutput(logits=self.lm_head(h[:, -keep_logits:] if keep_logits else h), hidden=h)
        logits = self.lm_head(h)  # (B, T, V)
        out = ModelOutput(logits=logits, hidden=h)

        # logits at t-1 score the token at t: shift the labels, not the logits (slicing [B, T, V] would copy it
        # forward and scatter its gradient into a zero [B, T, V] backward); the last position scores nothing
        out.lm_loss = cross_entropy(logits, F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX))
        loss = out.lm_loss
        if self.mtp is not None:
            # The MTP chain starts at the main model's final-norm output h^0 (spec §4.6), as the engines that
            # run the released MTP weights do.
            out.mtp_logits = self.mtp(h, input_ids, self.embed_tokens, self.lm_head, pos=pos, mask=mask)
            out.mtp_loss = self.mtp.loss(out.mtp_logits, labels)
            loss = loss + out.mtp_loss
        aux = [a for a in (m.aux_loss() for m in _side_channel_modules(self, "aux_loss")) if a is not None]
        if aux:
            out.aux_loss = torch.stack([a.to(loss.dtype) for a in aux]).sum()
            loss = loss + out.aux_loss
        out.loss = loss
        return out

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Summed CE over targets != -100, divided by ``denominator`` (default: their count, at least 1).

    logits [..., V], labels [...] -> scalar. The log-softmax runs in at least float32 (bf16 logits lose the
    small probabilities the loss is made of).
    """
    flat = logits.reshape(-1, logits.shape[-1])
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    if denominator is None:
        denominator = (labels != IGNORE_INDEX).sum()
    # An all-padding batch gives 0 rather than 0/0.
    return total / denominator.clamp(min=1).to(total.dtype)


# -- side channels (docs/plugins.md): found by walking the modules --------------------------------
def _side_channel_modules(model: nn.Module, method: str) -> Iterator[nn.Module]:
    for m in model.modules():
        if m is not model and not isinstance(m, DSKModel) and callable(getattr(m, method, None)):
            yield m


def _named_side_channel_modules(model: nn.Module, method: str) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if m is not model and not isinstance(m, DSKModel) and callable(getattr(m, method, None)):
            yield name, m


def after_optimizer_step(model: nn.Module) -> None:
    """Call every component's ``after_optimizer_step()`` (router bias updates); run after ``optimizer.step()``."""
    for m in _side_channel_modules(model, "after_optimizer_step"):
        m.after_optimizer_step()


def step_stat_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The step statistics buffers of every component, in module order (a DP strategy all-reduces them)."""
    return [t for m in _side_channel_modules(model, "step_stat_tensors") for t in m.step_stat_tensors()]


def step_metrics(model: nn.Module) -> dict[str, float | list[float]]:
    """Per-component step metrics keyed ``"<module path>.<metric>"`` plus ``"<metric>/mean"`` and ``"/max"``.

    E.g. ``layers.3.mlp.maxvio`` for each MoE layer and ``maxvio/mean``, ``maxvio/max`` over the layers. Scalar
    metrics are aggregated; list-valued ones (per-expert loads) are passed through per module only.
    Read before :func:`after_optimizer_step`, which resets the counters.
    """
    out: dict[str, float | list[float]] = {}
    per_key: dict[str, list[float]] = {}
    for name, m in _named_side_channel_modules(model, "step_metrics"):
        for key, value in m.step_metrics().items():
            if isinstance(value, (list, tuple)):
                out[f"{name}.{key}"] = [float(v) for v in value]
                continue
            out[f"{name}.{key}"] = float(value)
            per_key.setdefault(key, []).append(float(value))
    for key, values in per_key.items():
        out[f"{key}/mean"] = sum(values) / len(values)
        out[f"{key}/max"] = max(values)
    return out


def truncate_caches(caches: Sequence[Any], length: int) -> None:
    """Roll every cache back to ``length`` tokens."""
    for c in caches:
        c.truncate(length)

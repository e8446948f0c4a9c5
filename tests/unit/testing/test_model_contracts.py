"""The model contract suites of dsk.testing: every built-in router, ffn and attention passes; broken ones fail each
check with a message that says what to fix."""

from __future__ import annotations

import sys

import pytest
import torch
from dsk_mla.config import MHAConfig, MLAConfig
from dsk_mla.mha import MHA
from dsk_mla.mla import MLA
from dsk_moe.config import AuxLossConfig, DenseConfig, GreedyConfig, MoEConfig, NoauxTCConfig
from dsk_moe.experts import Dense
from dsk_moe.moe import MoE
from dsk_moe.router import AuxLossRouter, GreedyRouter, NoauxTCRouter
from dsk_mtp.config import MTPConfig
from dsk_mtp.mtp import MTP
from pydantic import Field

from dsk.api import BaseConfig, ModelContext, ResolvedSlot
from dsk.model.transformer import Block
from dsk.testing.contracts.model import (
    check_attention,
    check_config_round_trip,
    check_ffn,
    check_mtp,
    check_registration,
    check_router,
)

DIM, E, K = 8, 6, 2
CTX = ModelContext(dim=DIM, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.5)

ROUTERS = {
    "noaux_tc": lambda: NoauxTCRouter(NoauxTCConfig(top_k=K, n_groups=3, topk_groups=2), CTX, E),
    "noaux_tc-softmax": lambda: NoauxTCRouter(NoauxTCConfig(top_k=K, score_func="softmax"), CTX, E),
    "aux_loss": lambda: AuxLossRouter(AuxLossConfig(top_k=K), CTX, E),
    "greedy": lambda: GreedyRouter(GreedyConfig(top_k=K), CTX, E),
}


def _moe(router: str) -> MoE:
    cfgs = {"noaux_tc": (NoauxTCConfig, NoauxTCRouter), "aux_loss": (AuxLossConfig, AuxLossRouter)}
    cfg_cls, impl = cfgs[router]
    slot = ResolvedSlot(kind="router", name=router, config=cfg_cls(top_k=K), impl=impl)
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=1, expert_hidden_dim=4, router=slot)
    return MoE(cfg, CTX).double()


FFNS = {
    "moe-noaux_tc": lambda: _moe("noaux_tc"),
    "moe-aux_loss": lambda: _moe("aux_loss"),
    "dense": lambda: Dense(DenseConfig(hidden_dim=12), CTX).double(),
}

ACTX = ModelContext(dim=16, n_layers=1, vocab_size=16, max_seq_len=16, init_std=0.3)
_MLA = dict(n_heads=2, kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, rope_theta=500.0)
ATTENTIONS = {
    "mla-latent": lambda: MLA(MLAConfig(q_lora_rank=8, decode_cache="latent", **_MLA), ACTX).double(),
    "mla-full": lambda: MLA(MLAConfig(q_lora_rank=None, decode_cache="full", **_MLA), ACTX).double(),
    "mha": lambda: MHA(MHAConfig(n_heads=2, rope_theta=500.0), ACTX).double(),
    "mha-float32": lambda: MHA(MHAConfig(n_heads=2, rope_theta=500.0), ACTX),
}


# -- every built-in passes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ROUTERS)
def test_builtin_routers_meet_the_router_contract(name):
    check_router(ROUTERS[name], n_experts=E, dim=DIM, top_k=K)


@pytest.mark.parametrize("name", FFNS)
def test_builtin_ffns_meet_the_ffn_contract(name):
    check_ffn(FFNS[name], dim=DIM)


@pytest.mark.parametrize("name", ATTENTIONS)
def test_builtin_attentions_meet_the_attention_contract(name):
    check_attention(ATTENTIONS[name], dim=16, max_len=8)


def _mtp(depth: int, cls: type = MTP) -> MTP:
    def block(idx: int) -> Block:
        ctx = ModelContext(dim=16, n_layers=1, vocab_size=12, max_seq_len=16, layer_idx=idx, init_std=0.3)
        return Block(MHA(MHAConfig(n_heads=2, rope_theta=500.0), ctx), Dense(DenseConfig(hidden_dim=12), ctx), 16)

    return cls(MTPConfig(depth=depth), ACTX, block).double()


@pytest.mark.parametrize("depth", [1, 2])
def test_builtin_mtp_meets_the_mtp_contract(depth):
    check_mtp(lambda: _mtp(depth), dim=16, vocab_size=12)


@pytest.mark.parametrize(
    "config,table",
    [
        (MoEConfig, {"n_routed_experts": 8, "router": {"type": "noaux_tc", "top_k": 2, "n_groups": 2}}),
        (MoEConfig, {"router": {"type": "aux_loss", "aux_alpha": 0.1}}),
        (DenseConfig, {"hidden_dim": 64}),
        (NoauxTCConfig, {"top_k": 3, "group_score": "max"}),
        (GreedyConfig, {}),
        (MLAConfig, {"q_lora_rank": 12, "rope_scaling": {"factor": 4.0}, "decode_cache": "full"}),
        (MHAConfig, {"n_heads": 4, "head_dim": 8}),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_builtin_configs_survive_the_toml_round_trip(config, table):
    check_config_round_trip(config, table)


@pytest.mark.parametrize("table", [{"q_lora_rank": None}, {"q_lora_rank": 0}])
def test_mla_without_query_compression_survives_the_toml_round_trip(table):
    # found by the suite: TOML has no None, so None was dropped on dump and came back as the default, 1536; a
    # recipe now writes 0 for "no query compression", and resolved.toml writes None as 0
    config = check_config_round_trip(MLAConfig, table)
    assert config.q_lora_rank is None


@pytest.mark.parametrize(
    "module,kind,name",
    [
        ("dsk_moe.plugin", "router", "noaux_tc"),
        ("dsk_moe.plugin", "router", "aux_loss"),
        ("dsk_moe.plugin", "router", "greedy"),
        ("dsk_moe.plugin", "ffn", "moe"),
        ("dsk_moe.plugin", "ffn", "dense"),
        ("dsk_mla.plugin", "attention", "mla"),
        ("dsk_mla.plugin", "attention", "mha"),
    ],
)
def test_builtin_plugins_register_their_components_without_torch(module, kind, name):
    check_registration(module, kind, name)


# -- broken routers ----------------------------------------------------------------------------------------------


class FloatIds(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, stats = super().forward(x, seq_shape)
        return w, idx.float(), stats


class Duplicates(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, stats = super().forward(x, seq_shape)
        return w, idx[:, :1].expand(-1, idx.shape[1]).contiguous(), stats


class OutOfRange(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, stats = super().forward(x, seq_shape)
        return w, idx + self.n_experts, stats


class Detached(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, stats = super().forward(x, seq_shape)
        return w.detach(), idx, stats


class Noisy(GreedyRouter):
    def scores(self, x):
        return super().scores(x + torch.randn_like(x))  # noise drawn per forward: not reproducible


class CountsTopOne(GreedyRouter):
    def forward(self, x, seq_shape=None):
        out = super().forward(x, seq_shape)
        if self.training:
            self.step_load -= torch.bincount(out[1][:, 1], minlength=self.n_experts).float()
        return out


class CountsInEval(GreedyRouter):
    def forward(self, x, seq_shape=None):
        out = super().forward(x, seq_shape)
        if not self.training:
            self.step_load += out[2]["load"].float()
        return out


class ZeroesGrad(NoauxTCRouter):
    def end_step(self):
        super().end_step()
        self.weight.grad = None


class NeverResets(NoauxTCRouter):
    def end_step(self):
        self.e_score_correction_bias.add_(1e-3)


class BiasNotSaved(NoauxTCRouter):
    def __init__(self, cfg, ctx, n):
        super().__init__(cfg, ctx, n)
        del self.e_score_correction_bias
        self.register_buffer("e_score_correction_bias", torch.zeros(n), persistent=False)


class RandomInit(GreedyRouter):
    def __init__(self, cfg, ctx, n):
        super().__init__(cfg, ctx, n)
        g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
        self.weight.data = torch.randn(self.weight.shape, generator=g)


class NoSeqShape(GreedyRouter):
    def forward(self, x):
        return super().forward(x)


class NoLoad(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, _ = super().forward(x, seq_shape)
        return w, idx, {}


class WrongLoad(GreedyRouter):
    def forward(self, x, seq_shape=None):
        w, idx, stats = super().forward(x, seq_shape)
        return w, idx, {"load": stats["load"].flip(0)}


class ContractNames(GreedyRouter):
    """Names its update as an ffn layer does: the MoE layer would never call it."""

    def after_optimizer_step(self):
        self.end_step()

    end_step = None  # type: ignore[assignment]


BROKEN_ROUTERS = {
    NoSeqShape: "the MoE layer passes seq_shape=(B, T)",
    NoLoad: "return a dict with 'load': the per-expert slot counts [E]",
    WrongLoad: "count the experts this call picked",
    ContractNames: "router has after_optimizer_step() but the MoE layer calls a router's end_step(); rename it",
    FloatIds: "returned experts of dtype float32; return int64 expert ids",
    Duplicates: "picks an expert twice",
    OutOfRange: "expert ids outside [0, 6)",
    Detached: "weights without a gradient path",
    Noisy: "router is not deterministic",
    RandomInit: "router is not deterministic",
    CountsTopOne: "count each routed slot once (N x top_k = 24)",
    CountsInEval: "eval forward changed the step statistics",
    ZeroesGrad: "end_step() changed the gradient of 'weight'",
    NeverResets: "left the step statistics non-zero",
    BiasNotSaved: "state dict round trip",
}


@pytest.mark.parametrize("cls", BROKEN_ROUTERS, ids=lambda c: c.__name__)
def test_broken_routers_fail_with_what_to_fix(cls):
    cfg = NoauxTCConfig(top_k=K) if issubclass(cls, NoauxTCRouter) else GreedyConfig(top_k=K)
    with pytest.raises(AssertionError, match=_re(BROKEN_ROUTERS[cls])):
        check_router(lambda: cls(cfg, CTX, E), n_experts=E, dim=DIM, top_k=K)


class PlainTopK(torch.nn.Module):
    """A router with only a forward: softmax top-k, no balancing, none of the optional side channels."""

    def __init__(self, cfg, ctx, n_experts):
        super().__init__()
        self.n_experts, self.top_k = n_experts, cfg.top_k
        self.weight = torch.nn.Parameter(torch.randn(n_experts, ctx.dim) * ctx.init_std)

    def forward(self, x, seq_shape=None):
        w, idx = torch.softmax(x @ self.weight.T, dim=-1).topk(self.top_k, dim=-1)
        return w.to(x.dtype), idx, {"load": torch.bincount(idx.flatten(), minlength=self.n_experts)}


def test_a_router_with_only_a_forward_passes_and_runs_in_the_moe_layer():
    check_router(lambda: PlainTopK(GreedyConfig(top_k=K), CTX, E), n_experts=E, dim=DIM, top_k=K)
    slot = ResolvedSlot(kind="router", name="plain", config=GreedyConfig(top_k=K), impl=PlainTopK)
    cfg = MoEConfig(n_routed_experts=E, n_shared_experts=1, expert_hidden_dim=4, router=slot)
    check_ffn(lambda: MoE(cfg, CTX).double(), dim=DIM)  # the layer's side channels tolerate a router without any
    moe, x = MoE(cfg, CTX).double(), torch.randn(2, 3, DIM, dtype=torch.float64)
    moe(x)
    assert moe.aux_loss() is None and moe.step_stat_tensors() == [] and moe.step_metrics() == {}
    moe.after_optimizer_step()


def test_a_router_with_the_wrong_top_k_fails_on_the_shape():
    with pytest.raises(AssertionError, match=_re("return weights [N, top_k] = [12, 3]")):
        check_router(ROUTERS["greedy"], n_experts=E, dim=DIM, top_k=3)


def _re(text: str) -> str:
    import re

    return re.escape(text)


# -- broken ffns -------------------------------------------------------------------------------------------------


class Squeezes(Dense):
    def forward(self, x):
        return super().forward(x).mean(dim=1)


class Float32Out(Dense):
    def forward(self, x):
        return super().forward(x).float()


class NoisyFFN(Dense):
    def forward(self, x):
        return super().forward(x) + 1e-3 * torch.randn_like(x)


class VectorAux(Dense):
    def aux_loss(self):
        return self.up_proj.weight.sum(dim=0)


class DetachedAux(Dense):
    def aux_loss(self):
        return self.up_proj.weight.sum().detach()


class GradTouchingFFN(Dense):
    def after_optimizer_step(self):
        for p in self.parameters():
            p.grad.mul_(0.5)


BROKEN_FFNS = {
    Squeezes: "return y [B, T, D] = (2, 5, 8)",
    Float32Out: "return the input's dtype torch.float64",
    NoisyFFN: "ffn is not deterministic",
    VectorAux: "return a scalar tensor (already weighted) or None",
    DetachedAux: "ffn aux_loss() has no gradient",
    GradTouchingFFN: "must never touch .grad",
}


@pytest.mark.parametrize("cls", BROKEN_FFNS, ids=lambda c: c.__name__)
def test_broken_ffns_fail_with_what_to_fix(cls):
    with pytest.raises(AssertionError, match=_re(BROKEN_FFNS[cls])):
        check_ffn(lambda: cls(DenseConfig(hidden_dim=12), CTX).double(), dim=DIM)


# -- broken attentions -------------------------------------------------------------------------------------------


class PeeksAhead(MHA):
    """Attends over the whole sequence without a cache: a future token changes earlier outputs."""

    def forward(self, x, pos, mask=None, cache=None):
        if cache is None and mask is None:
            B, T, _ = x.shape
            mask = torch.ones(B, T, T, dtype=torch.bool)
        return super().forward(x, pos, mask, cache)


class ForgetsCache(MHA):
    """Decodes each new token against itself only: cached decoding disagrees with the full forward."""

    def forward(self, x, pos, mask=None, cache=None):
        if cache is not None:
            T = x.shape[1]
            out = super().forward(x, pos - pos.reshape(-1)[0], mask, None)
            cache.append(
                k=torch.zeros_like(cache.buffers["k"][:, :, :T]), v=torch.zeros_like(cache.buffers["v"][:, :, :T])
            )
            return out
        return super().forward(x, pos, mask, cache)


class NoTruncate(MHA):
    def make_cache(self, *args, **kwargs):
        cache = super().make_cache(*args, **kwargs)
        cache.truncate = lambda length: None
        return cache


class UnusedParam(MHA):
    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.extra = torch.nn.Parameter(torch.ones(3))


class NotACache(MHA):
    def make_cache(self, *args, **kwargs):
        return {"k": None}


BROKEN_ATTENTIONS = {
    PeeksAhead: "attention is not causal",
    ForgetsCache: "cached decoding disagrees with the full forward",
    NoTruncate: "cache.truncate(3) left lengths",
    UnusedParam: "parameters ['extra'] got no gradient",
    NotACache: "is not a dsk.api.AttentionCache",
}


@pytest.mark.parametrize("cls", BROKEN_ATTENTIONS, ids=lambda c: c.__name__)
def test_broken_attentions_fail_with_what_to_fix(cls):
    with pytest.raises(AssertionError, match=_re(BROKEN_ATTENTIONS[cls])):
        check_attention(lambda: cls(MHAConfig(n_heads=2, rope_theta=500.0), ACTX).double(), dim=16, max_len=8)


# -- broken mtp ---------------------------------------------------------------------------------------------------


class PeeksAtTarget(MTP):
    """Depth k reads the embedding of t_(i+k+1), the token it predicts."""

    def forward(self, hidden, input_ids, embed, head, *, pos=None, mask=None):
        return super().forward(hidden, torch.roll(input_ids, -1, dims=1), embed, head, pos=pos, mask=mask)


class OwnHead(MTP):
    """Predicts through a head of its own instead of the shared one."""

    def __init__(self, config, ctx, block_factory):
        super().__init__(config, ctx, block_factory)
        self.own_head = torch.nn.Linear(ctx.dim, 12, bias=False)

    def forward(self, hidden, input_ids, embed, head, *, pos=None, mask=None):
        return super().forward(hidden, input_ids, embed, self.own_head, pos=pos, mask=mask)


class DropsLastDepthPosition(MTP):
    def forward(self, hidden, input_ids, embed, head, *, pos=None, mask=None):
        return [lg[:, :-1] for lg in super().forward(hidden, input_ids, embed, head, pos=pos, mask=mask)]


BROKEN_MTPS = {
    PeeksAtTarget: "mtp depth 1 is not causal",
    OwnHead: "no gradient reached the shared head",
    DropsLastDepthPosition: "depth 1 logits are (2, 6, 12); return [B, T - k, V] = [2, 7, 12]",
}


@pytest.mark.parametrize("cls", BROKEN_MTPS, ids=lambda c: c.__name__)
def test_broken_mtps_fail_with_what_to_fix(cls):
    with pytest.raises(AssertionError, match=_re(BROKEN_MTPS[cls])):
        check_mtp(lambda: _mtp(1, cls), dim=16, vocab_size=12)


# -- broken configs and plugins ----------------------------------------------------------------------------------


class NoDefault(BaseConfig):
    top_k: int = Field(description="routed experts per token")


class Lossy(BaseConfig):
    ratio: float = Field(0.5, description="rounded on dump")

    def model_dump(self, **kwargs):
        out = super().model_dump(**kwargs)
        out["ratio"] = round(out["ratio"])
        return out


@pytest.mark.parametrize(
    "config,message",
    [
        (NoDefault, "NoDefault.top_k has no default and the table does not give it"),
        (Lossy, "does not survive a TOML round trip"),
    ],
    ids=["no-default", "lossy"],
)
def test_broken_configs_fail_the_round_trip(config, message):
    with pytest.raises(AssertionError, match=_re(message)):
        check_config_round_trip(config, {})


def test_a_table_that_does_not_validate_is_reported():
    with pytest.raises(AssertionError, match=_re("MHAConfig validating {'n_head': 4} raised")):
        check_config_round_trip(MHAConfig, {"n_head": 4})


def test_a_config_without_defaults_passes_when_the_table_gives_the_field():
    assert check_config_round_trip(NoDefault, {"top_k": 3}).top_k == 3


def _plugin(tmp_path, monkeypatch, name: str, body: str):
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


_REGISTERS = """
from dsk import hookimpl
from dsk.api import NoConfig

@hookimpl
def register_model_components(register):
    register("router", "sinkhorn", "somewhere.router:Sinkhorn", config=NoConfig)
"""


def test_a_plugin_that_imports_torch_fails_registration(tmp_path, monkeypatch):
    name = _plugin(tmp_path, monkeypatch, "heavy_plugin_for_contract", "import torch\n" + _REGISTERS)
    with pytest.raises(AssertionError, match=_re("imports torch; keep plugin.py and config.py torch-free")):
        check_registration(name, "router", "sinkhorn")


def test_a_plugin_registering_another_kind_fails_registration(tmp_path, monkeypatch):
    name = _plugin(tmp_path, monkeypatch, "light_plugin_for_contract", _REGISTERS)
    check_registration(name, "router", "sinkhorn")  # torch-free, right kind: passes
    with pytest.raises(AssertionError, match=_re("does not register ffn/sinkhorn (it registers ['router/sinkhorn'])")):
        check_registration(name, "ffn", "sinkhorn")


def test_a_plugin_whose_hook_fails_is_reported(tmp_path, monkeypatch):
    body = _REGISTERS.replace('register("router"', 'register("tokenizer"')  # outside the hook's family
    name = _plugin(tmp_path, monkeypatch, "wrong_family_plugin_for_contract", body)
    with pytest.raises(AssertionError, match="failed to register"):
        check_registration(name, "tokenizer", "sinkhorn")

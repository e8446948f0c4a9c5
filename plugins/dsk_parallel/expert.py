"""Node-limited expert parallelism (``[parallel.expert] type = "node_limited"``; spec §4.5, §4.8).

The mesh is DeepSeek-V3's: ``world = PP x DP`` (no pipeline strategy yet, so PP = 1, but the mesh keeps its
dimension), and the expert-parallel (EP) group of ``ep`` consecutive ranks lies inside the data-parallel ranks,
so EP ranks read different data shards and ``DP / ep`` groups hold the same expert shards. The EP group is cut into
nodes of ``ranks_per_node`` ranks::

    DeviceMesh (pp, dp_replicate, ep_node, ep_local) = (1, W / ep, ep / ranks_per_node, ranks_per_node)
    dp = (dp_replicate, ep_node, ep_local) flattened    the dense gradients' mean, the router loads' sum
    ep = (ep_node, ep_local) flattened                  the expert shards (gathered for checkpoints)
    ep_node: the ranks with one in-node index, one per node (the inter-node hop)
    ep_local: the ranks of one node (the intra-node hop)

Rank i of the EP group holds routed experts ``i * E / ep ... (i + 1) * E / ep``, so node j holds the router's expert
group j: the router's group-limited top-k (``n_groups`` = nodes, ``topk_groups`` = ``max_nodes``, groups ranked by
the sum of their two best affinities) is the node limit, and a mismatch is refused when the run is built.

Dispatch (:class:`NodeLimitedDispatcher`), as V3 does it: a token goes ONCE to each node holding one of its experts,
to the rank with the same in-node index there (``all_to_all_single`` over ``ep_node``, variable splits), which
forwards it inside the node to the ranks owning its experts (a second ``all_to_all_single`` over ``ep_local``;
none when ``ranks_per_node = 1``). Each row carries the token's K routing weights for that destination (zeros for
the slots elsewhere) and its K expert ids (-1 elsewhere; their bits in K more columns of the rows' dtype), so one
collective per hop moves everything and the gate gets its gradient through it. The rank runs
its experts on the rows it received (the MoE layer's own path: the CPU kernel on CPU), sums each row's slots, and
the combine runs the two hops backwards, summing the partial outputs at each step. Both collectives are autograd
functions (the backward of a dispatch is the combine's reverse all-to-all, and the other way around). A token's
inter-node bytes are at most ``max_nodes x (dim + 2 top_k)`` elements: ``max_nodes x dim`` of activations, and its
weights and ids. With ``fp8_dispatch`` the rows travel as E4M3 codes with one float32 scale per 1 x ``fp8_block``
tile (``dim + 4 dim / fp8_block`` bytes instead of ``dim x 4`` in FP32, as V3's dispatch), the receiver dequantises
them for its experts, and the combine and every backward stay in the activations' dtype (the dispatch's gradient is
straight-through); an FP8 expert GEMM re-quantises the same tiles to the same codes.

Gradients follow the loss convention of :meth:`dsk.api.runtime.BuiltRun.loss_weights`: every rank's loss is weighted
by ``n_local * W / n_global`` and dense gradients are the mean over the W data ranks. An expert shard's gradient
already sums the contributions of every token of its EP group (they were sent to it), so it is summed over the
``W / ep`` replicas of the shard (where there are any) and divided by W. With no other ``[parallel.*]`` table the
strategy also does the dense data parallelism itself (one flat all-reduce); with one (replicate, FSDP, ZeRO-1) that
strategy owns the dense parameters and this one leaves them alone (it marks its shards ``dsk.api.SHARDED_PARAM``).

Shape suffixes: N tokens of this rank, D model dim, K experts per token, E routed experts of a layer, Q nodes of
the EP group, P ranks per node, L experts per rank, S rows sent by the first hop (token x destination node),
V rows received by the first hop, U rows sent by the second (row x destination rank), J rows received by the
second (the rows this rank's experts run on), R routed (row, slot) pairs, F = D + 2K payload columns.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dsk.api import SHARDED_PARAM, ExpertShardable
from dsk.api.runtime import (
    CheckpointLoadError,
    RunSetupError,
    load_model_weights,
    load_optimizer_state,
    model_state_for_saving,
    optimizer_state_to_tensors,
)

from .expert_config import NodeLimitedConfig, node_limit_problems
from .layout import RankLayout

__all__ = [
    "NodeLimitedExperts",
    "NodeLimitedDispatcher",
    "all_to_all",
    "dispatch_rows",
    "quantize_rows",
    "dequantize_rows",
]


class _AllToAll(torch.autograd.Function):
    """``dist.all_to_all_single`` with variable splits as an autograd node: its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_SF, send, recv, group):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x_SF.new_empty((sum(recv), *x_SF.shape[1:]))
        dist.all_to_all_single(out, x_SF.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_VF):  # type: ignore[override]
        out = grad_VF.new_empty((sum(ctx.send), *grad_VF.shape[1:]))
        dist.all_to_all_single(out, grad_VF.contiguous(), ctx.send, ctx.recv, group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    """Rows ``x`` (``send[j]`` of them for member j of ``group``, in order) exchanged: ``recv[j]`` rows from member j.

    Differentiable in ``x`` when it requires grad (the backward exchanges the gradients back); a plain
    ``dist.all_to_all_single`` otherwise (integer metadata, no-grad forwards).
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllToAll.apply(x, send, recv, group)
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}
#: largest finite E4M3 value, and the amax floor of the DeepSeek reference ``act_quant``
_E4M3_MAX, _AMAX_EPS = 448.0, 1e-4


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group: Any) -> torch.Tensor:
    """``dist.all_to_all_single`` of rows with variable splits (the rows themselves when there is no group)."""
    if group is None:
        return x
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def quantize_rows(x_SD: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 codes (as uint8) ``[S, D]`` and float32 scales ``[S, D / block]`` of 1 x ``block`` tiles
    (``scale = max(amax, 1e-4) / 448``, as DeepSeek-V3's activation quantisation)."""
    S, D = x_SD.shape
    t = x_SD.detach().float().view(S, D // block, block)
    scale = t.abs().amax(-1).clamp(min=_AMAX_EPS) / _E4M3_MAX
    q = (t / scale.unsqueeze(-1)).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(S, D).view(torch.uint8), scale


def dequantize_rows(codes_SD: torch.Tensor, scale_SB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The values :func:`quantize_rows` encoded, in ``dtype``."""
    S, D = codes_SD.shape
    n_tiles = scale_SB.shape[1]
    t = codes_SD.view(torch.float8_e4m3fn).float().view(S, n_tiles, D // n_tiles) * scale_SB.unsqueeze(-1)
    return t.view(S, D).to(dtype)


def _pack(x_SD: torch.Tensor, w_SK: torch.Tensor, eid_SK: torch.Tensor, block: int | None) -> torch.Tensor:
    """One payload row per dispatched row: ``[x | w | ids]`` in x's dtype (the ids' bits in columns of that dtype),
    or with ``block`` ``[E4M3 codes | scales | w | ids]`` as bytes."""
    if block is None:
        ids = eid_SK.to(_INT_OF_SIZE[x_SD.dtype.itemsize]).view(x_SD.dtype)
        return torch.cat((x_SD, w_SK.to(x_SD.dtype), ids), dim=1)
    codes, scale = quantize_rows(x_SD, block)
    parts = (codes, scale, w_SK.to(x_SD.dtype).contiguous(), eid_SK.to(torch.int32))
    return torch.cat([t.contiguous().view(torch.uint8) for t in parts], dim=1)


def _unpack(
    rows: torch.Tensor, D: int, K: int, block: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [V, D], w [V, K], ids [V, K] int)`` of payload rows made by :func:`_pack`."""
    if block is None:
        ids = rows[:, D + K :].contiguous().view(_INT_OF_SIZE[dtype.itemsize])
        return rows[:, :D], rows[:, D : D + K], ids
    elt, n_scales = torch.empty((), dtype=dtype).element_size(), D // block
    cuts = [D, D + 4 * n_scales, D + 4 * n_scales + K * elt]
    scale = rows[:, cuts[0] : cuts[1]].contiguous().view(torch.float32)
    w = rows[:, cuts[1] : cuts[2]].contiguous().view(dtype)
    ids = rows[:, cuts[2] :].contiguous().view(torch.int32)
    return dequantize_rows(rows[:, :D].contiguous(), scale, dtype), w, ids


class _DispatchRows(torch.autograd.Function):
    """Rows, their routing weights and expert ids sent in ONE all-to-all (optionally the rows as FP8 with scales).

    Backward: the gradients of the rows and the weights go back in one reverse all-to-all in the gradients'
    dtype (an FP8 dispatch's backward is straight-through: the rows' gradient is the dequantised rows' one).
    """

    @staticmethod
    def forward(ctx, x_SD, w_SK, eid_SK, send, recv, group, block):  # type: ignore[override]
        ctx.send, ctx.recv, ctx.group = send, recv, group
        ctx.D, ctx.w_dtype = x_SD.shape[1], w_SK.dtype
        out = _exchange(_pack(x_SD, w_SK, eid_SK, block), send, recv, group)
        x_VD, w_VK, eid_VK = _unpack(out, x_SD.shape[1], w_SK.shape[1], block, x_SD.dtype)
        ctx.mark_non_differentiable(eid_VK)
        return x_VD, w_VK, eid_VK

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_VD, grad_VK, _):  # type: ignore[override]
        back = _exchange(torch.cat((grad_VD, grad_VK.to(grad_VD.dtype)), dim=1), ctx.recv, ctx.send, ctx.group)
        return back[:, : ctx.D], back[:, ctx.D :].to(ctx.w_dtype), None, None, None, None, None


def dispatch_rows(
    x_SD: torch.Tensor,
    w_SK: torch.Tensor,
    eid_SK: torch.Tensor,
    send: list[int],
    recv: list[int],
    group: Any,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Send row i of ``x_SD`` with its weights and expert ids to the member its place in ``send`` says (``send[j]``
    rows for member j, in order); returns the rows received ``(x_VD, w_VK, eid_VK)``. Differentiable in x and w.
    ``block``: send the rows as E4M3 with one float32 scale per 1 x block tile (the receiver dequantises)."""
    return _DispatchRows.apply(x_SD, w_SK, eid_SK, send, recv, group, block)


def _exchange_counts(send_Q: torch.Tensor, group: Any) -> list[int]:
    """Each member's row count for this rank, given this rank's count for each member (one small all-to-all)."""
    recv_Q = torch.empty_like(send_Q)
    dist.all_to_all_single(recv_Q, send_Q, group=group)
    return recv_Q.tolist()


class NodeLimitedDispatcher:
    """The routed part of one MoE layer across the EP group: dispatch, local experts, combine (module docstring).

    Called by the layer as ``dispatcher(x_ND, weights_NK, idx_NK, local_experts)``; returns
    ``sum_k weights[n, k] * expert_{idx[n, k]}(x[n])`` for this rank's N tokens.

    Attributes:
        fp8_block: send the rows as E4M3 with 1 x ``fp8_block`` scales (None: in their own dtype).
        record: keep :attr:`last` (per-token destination counts and the bytes sent), for tests and benchmarks.
        last: what the last call sent (when ``record``): ``dest_nodes_N`` (nodes each token went to),
            ``inter_rows_N`` (rows each token sent to other nodes), ``inter_act_bytes`` / ``inter_meta_bytes``
            (activation and routing-metadata bytes this rank sent to other nodes; ``row_act_bytes`` per row),
            ``intra_rows`` (rows forwarded inside the node to other ranks), ``rows_in`` (rows its experts ran),
            ``slots_in`` ((row, expert) pairs they ran), ``elt`` (bytes per element of the activations).
    """

    def __init__(
        self,
        n_experts: int,
        ep_rank: int,
        ep_size: int,
        ranks_per_node: int,
        node_group: Any,
        local_group: Any,
        max_nodes: int,
        fp8_block: int | None = None,
        where: str = "parallel.expert",
    ):
        self.n_experts = n_experts
        self.ranks_per_node = ranks_per_node
        self.n_nodes = ep_size // ranks_per_node
        self.experts_per_rank = n_experts // ep_size
        self.experts_per_node = self.experts_per_rank * ranks_per_node
        self.node, self.in_node = divmod(ep_rank, ranks_per_node)
        self.node_group, self.local_group = node_group, local_group
        self.max_nodes = max_nodes
        self.fp8_block, self.where = fp8_block, where
        self.record = False
        self.last: dict[str, Any] = {}

    def __deepcopy__(self, memo: dict) -> NodeLimitedDispatcher:
        """A copy over the same process groups (a deep-copied model, e.g. GRPO's reference policy, dispatches through
        them too; process groups cannot be copied)."""
        other = copy.copy(self)
        other.last = {}
        return other

    def __call__(
        self,
        x_ND: torch.Tensor,
        weights_NK: torch.Tensor,
        idx_NK: torch.Tensor,
        local_experts: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    ) -> torch.Tensor:
        N, D = x_ND.shape
        K = idx_NK.shape[1]
        Q, P, L = self.n_nodes, self.ranks_per_node, self.experts_per_rank
        if self.fp8_block is not None and D % self.fp8_block:
            raise ValueError(f"{self.where}.fp8_block = {self.fp8_block} must divide the model dim {D}")
        weights_NK = weights_NK.to(x_ND.dtype)

        # hop 1: one row per (token, destination node), ordered by node then token
        node_NK = torch.div(idx_NK, self.experts_per_node, rounding_mode="floor")
        dest_NQ = torch.zeros(N, Q, dtype=torch.bool, device=x_ND.device).scatter_(1, node_NK, True)
        node_S, tok_S = dest_NQ.t().nonzero(as_tuple=True)
        on_SK = node_NK.index_select(0, tok_S) == node_S.unsqueeze(1)
        eid_SK = torch.where(on_SK, idx_NK.index_select(0, tok_S) - node_S.unsqueeze(1) * self.experts_per_node, -1)
        w_SK = weights_NK.index_select(0, tok_S).masked_fill(~on_SK, 0.0)
        send1_Q = torch.bincount(node_S, minlength=Q)
        send1, recv1 = send1_Q.tolist(), [int(send1_Q.sum())]
        if Q > 1:
            recv1 = _exchange_counts(send1_Q, self.node_group)
        x_VD, w_VK, eid_VK = dispatch_rows(
            x_ND.index_select(0, tok_S), w_SK, eid_SK, send1, recv1, self.node_group if Q > 1 else None, self.fp8_block
        )

        # hop 2 (inside the node): one row per (received row, destination rank of the node)
        if P > 1:
            rank_VK = torch.where(eid_VK >= 0, torch.div(eid_VK, L, rounding_mode="floor"), P).long()
            dest_VP = torch.zeros(eid_VK.shape[0], P + 1, dtype=torch.bool, device=x_ND.device)
            dest_VP = dest_VP.scatter_(1, rank_VK, True)[:, :P]
            rank_U, row_U = dest_VP.t().nonzero(as_tuple=True)
            on_UK = rank_VK.index_select(0, row_U) == rank_U.unsqueeze(1)
            eid_UK = torch.where(on_UK, eid_VK.index_select(0, row_U) - (rank_U * L).unsqueeze(1).int(), -1)
            w_UK = w_VK.index_select(0, row_U).masked_fill(~on_UK, 0.0)
            send2_P = torch.bincount(rank_U, minlength=P)
            send2, recv2 = send2_P.tolist(), _exchange_counts(send2_P, self.local_group)
            x_JD, w_JK, eid_JK = dispatch_rows(
                x_VD.index_select(0, row_U), w_UK, eid_UK, send2, recv2, self.local_group, self.fp8_block
            )
        else:
            x_JD, w_JK, eid_JK = x_VD, w_VK, eid_VK

        # the local experts on the (row, slot) pairs, sorted by local expert
        row_R, k_R = (eid_JK >= 0).nonzero(as_tuple=True)
        expert_R = eid_JK[row_R, k_R].long()
        order_R = torch.argsort(expert_R, stable=True)
        row_R, k_R = row_R.index_select(0, order_R), k_R.index_select(0, order_R)
        load_L = torch.bincount(expert_R, minlength=L)
        x_RD = x_JD.index_select(0, row_R)
        scale_R = w_JK[row_R, k_R]
        out_RD = local_experts(x_RD, load_L, scale_R)
        out_JD = out_RD.new_zeros(x_JD.shape[0], D).index_add(0, row_R, out_RD)

        # combine: the hops backwards, summing each token's partial outputs
        if P > 1:
            out_UD = all_to_all(out_JD, recv2, send2, self.local_group)
            out_VD = out_UD.new_zeros(x_VD.shape[0], D).index_add(0, row_U, out_UD)
        else:
            out_VD = out_JD
        out_SD = all_to_all(out_VD, recv1, send1, self.node_group) if Q > 1 else out_VD
        routed_ND = out_SD.new_zeros(N, D).index_add(0, tok_S, out_SD)

        if self.record:
            elt = x_ND.element_size()
            inter_rows = int(tok_S.shape[0] - int(send1_Q[self.node]))
            act = D * elt if self.fp8_block is None else D + 4 * (D // self.fp8_block)  # E4M3 codes + scales
            self.last = {
                "tokens": N,
                "dest_nodes_N": dest_NQ.sum(1),
                "inter_rows_N": dest_NQ.sum(1) - dest_NQ[:, self.node].long(),
                "row_act_bytes": act,
                "inter_act_bytes": inter_rows * act,
                "inter_meta_bytes": inter_rows * K * (elt + (elt if self.fp8_block is None else 4)),
                "intra_rows": int(row_U.shape[0] - int(send2_P[self.in_node])) if P > 1 else 0,
                "rows_in": int(x_JD.shape[0]),
                "slots_in": int(row_R.shape[0]),
                "elt": elt,
                "dim": D,
            }
        return routed_ND


def _dense_and_sharded(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    dense = [p for p in params if not getattr(p, SHARDED_PARAM, False)]
    sharded = [p for p in params if getattr(p, SHARDED_PARAM, False)]
    return dense, sharded


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (a dense gradient another strategy sharded), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class NodeLimitedExperts(RankLayout):
    """Expert parallelism with node-limited routing (module docstring), plus dense data parallelism when alone."""

    name = "node_limited"
    wrap_order = -10
    #: its checkpoint methods return this rank's whole state (expert shards gathered) on every rank, which a
    #: pipeline composed with it merges over the stages
    composes_checkpoints = True

    def __init__(self, config: NodeLimitedConfig | None = None):
        super().__init__(config if config is not None else NodeLimitedConfig())
        self.mesh: Any = None
        self.owns_dense = True
        #: id(parameter) -> (layer's expert count E, start, stop) for every expert shard of the model
        self._shards: dict[int, tuple[int, int, int]] = {}
        self._devices: set[torch.device] = set()  # where the shards live (collectives run there: NCCL needs CUDA)
        self.dispatchers: list[NodeLimitedDispatcher] = []

    # -- process layout ----------------------------------------------------------------------------------------
    def setup(self, run: Any) -> None:
        """Build the DeviceMesh (module docstring) on the default process group; check ``ep`` and the nodes."""
        cfg = self.config
        key = self.name
        if not self._read_world(run):
            self.ep, self.ranks_per_node = 1, 1
            if (cfg.ep or 1) != 1:
                raise RunSetupError(f"parallel.{key}.ep = {cfg.ep}, but this run has a single process")
        else:
            self.ep = cfg.ep if cfg.ep is not None else self._world
        W, ep, rpn = self._world, self.ep, cfg.ranks_per_node
        if W % ep:
            raise RunSetupError(f"parallel.{key}.ep = {ep} must divide the {W} data-parallel ranks")
        if ep % rpn:
            raise RunSetupError(
                f"parallel.{key}.ranks_per_node = {rpn} must divide the expert-parallel group, ep = {ep}"
            )
        self.ranks_per_node = rpn
        self.n_nodes = ep // rpn
        self.ep_rank = self._rank % ep
        from dsk_parallel.pipeline_config import PipelineConfig

        tables = (run.section("parallel") if run is not None else None) or {}
        # the dense gradients are this strategy's unless a data-parallel table owns them (a pipeline does not)
        others = [
            k for k, s in tables.items() if k != key and not isinstance(getattr(s, "config", None), PipelineConfig)
        ]
        self.owns_dense = not others
        if W == 1:
            return
        from torch.distributed.device_mesh import init_device_mesh

        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        self.mesh = init_device_mesh(
            device_type,
            (self.pp, W // ep, self.n_nodes, rpn),
            mesh_dim_names=("pp", "dp_replicate", "ep_node", "ep_local"),
        )
        self.data_group = self.mesh["dp_replicate", "ep_node", "ep_local"]._flatten("dp").get_group()
        self.ep_group = self.mesh["ep_node", "ep_local"]._flatten("ep").get_group()
        self.node_group = self.mesh["ep_node"].get_group()
        self.local_group = self.mesh["ep_local"].get_group()
        self.replica_group = self.mesh["dp_replicate"].get_group()

    # -- the model ---------------------------------------------------------------------------------------------
    def wrap_model(self, model: nn.Module, run: Any) -> nn.Module:
        """Shard every :class:`dsk.api.ExpertShardable` layer's routed experts over the EP group (in place).

        Raises:
            RunSetupError: the model has no such layer, its experts do not split over ``ep``, or the router's
                groups are not the nodes / its ``topk_groups`` is not ``max_nodes`` (the keys are named).
        """
        key, cfg = self.name, self.config
        layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ExpertShardable)]
        if not layers:
            raise RunSetupError(
                f"parallel.{key}: type = 'node_limited' needs a model with routed experts (model.ffn.type = 'moe')"
            )
        if self._world == 1:
            return model  # one process: every expert is local, nothing is sent, there is no node limit to check
        for _, layer in layers:
            n_groups, topk_groups = layer.expert_groups()
            problems = node_limit_problems(
                key, self.ep, self.ranks_per_node, cfg.max_nodes, n_groups, topk_groups, layer.total_experts
            )
            dim = getattr(getattr(layer, "experts", None), "dim", None)
            if cfg.fp8_dispatch and isinstance(dim, int) and dim % cfg.fp8_block:
                problems.append(("", f"parallel.{key}.fp8_block = {cfg.fp8_block} must divide model.dim = {dim}"))
            if problems:
                raise RunSetupError("; ".join(message for _, message in problems))
        self.max_nodes = cfg.max_nodes if cfg.max_nodes is not None else layers[0][1].expert_groups()[1]
        for _, layer in layers:
            E = layer.total_experts
            start, stop = self.ep_rank * E // self.ep, (self.ep_rank + 1) * E // self.ep
            dispatcher = NodeLimitedDispatcher(
                E,
                self.ep_rank,
                self.ep,
                self.ranks_per_node,
                self.node_group,
                self.local_group,
                self.max_nodes,
                fp8_block=cfg.fp8_block if cfg.fp8_dispatch else None,
                where=f"parallel.{key}",
            )
            layer.shard_experts(start, stop, dispatcher)
            self.dispatchers.append(dispatcher)
            for rel in layer.expert_parameter_names():
                p = layer.get_parameter(rel)
                setattr(p, SHARDED_PARAM, True)
                self._shards[id(p)] = (E, start, stop)
                self._devices.add(p.device)
        if self.owns_dense:  # every rank starts from the same dense weights (they are seeded alike; make sure)
            dense = [p.data for p in model.parameters() if not getattr(p, SHARDED_PARAM, False)]
            if dense:
                flat = torch.cat([t.reshape(-1) for t in dense])
                dist.broadcast(flat, src=dist.get_global_rank(self.data_group, 0), group=self.data_group)
                offset = 0
                for t in dense:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        return model

    # -- gradients ---------------------------------------------------------------------------------------------
    def sync_gradients(self, model: nn.Module) -> None:
        """Dense gradients: mean over the data ranks (when this strategy owns them). Expert shards: summed over
        the shard's replicas (``ep < W``), divided by W (module docstring)."""
        W = self._world
        if W == 1:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        dense, sharded = _dense_and_sharded(params)
        if self.owns_dense and dense:
            self._mean_grads(dense, self.data_group, W)
        if sharded:
            mine = [p for p in sharded if id(p) in self._shards]
            replicas = W // self.ep
            if replicas > 1:
                self._mean_grads(mine, self.replica_group, W)
            else:
                for p in mine:
                    if p.grad is not None:
                        p.grad.div_(W)

    @staticmethod
    def _mean_grads(params: list[torch.Tensor], group: Any, divisor: int) -> None:
        """``p.grad = sum over group / divisor`` for every parameter with a gradient on any rank (one flat
        all-reduce; a rank without a gradient for one contributes zeros)."""
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        dist.all_reduce(present, group=group)
        params = [p for p, n in zip(params, present.tolist(), strict=True) if n > 0]
        if not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        offset = 0
        for p in params:
            g = flat[offset : offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
            offset += p.numel()

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float, foreach: bool | None = None) -> torch.Tensor:
        """Clip by the whole model's gradient norm: the dense part once, the expert shards summed over the EP group."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros(())
        dense, sharded = _dense_and_sharded([p for p in params if p.grad is not None])
        # the norm in FP32, or in FP64 for FP64 gradients (a float64 run compares with one process to 1e-10)
        dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
        sq = torch.zeros((), dtype=dtype, device=grads[0].device)
        if dense:
            dense_norm = _local(torch.nn.utils.get_total_norm([p.grad for p in dense], 2.0, foreach=foreach))
            sq = sq + dense_norm.to(dtype) ** 2
        if sharded:
            esq = torch.nn.utils.get_total_norm([p.grad for p in sharded], 2.0, foreach=foreach).to(dtype) ** 2
            if self._world > 1:
                dist.all_reduce(esq, group=self.ep_group)
            sq = sq + esq
        total = sq.sqrt()
        # apart: torch's foreach kernels refuse a list mixing FSDP's DTensor gradients with the slices' tensors
        for part in (dense, sharded):
            if part:
                torch.nn.utils.clip_grads_with_norm_(part, max_norm, total, foreach=foreach)
        return total

    # -- reductions --------------------------------------------------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self._world == 1:
            return tensor
        if op not in ("sum", "max", "mean"):
            raise ValueError(f"all_reduce op {op!r}: use 'sum', 'max' or 'mean'")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=self.data_group)
        if op == "mean":
            tensor.div_(self._world)
        return tensor

    def reduce_step_statistics(self, tensors: list[torch.Tensor]) -> None:
        """The router loads summed over the data ranks in one flat all-reduce: every rank gets the same counts,
        hence the same bias update."""
        if self._world == 1 or not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, group=self.data_group)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def teardown(self) -> None:
        self.mesh = None  # the subgroups go with the default group, which the core destroys

    # -- checkpoints: the one-process format (full [E, ...] expert tensors) --------------------------------------
    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """An expert shard's full tensor: the EP group's shards concatenated along dim 0 (collective)."""
        parts = [torch.empty_like(t) for _ in range(self.ep)]
        dist.all_gather(parts, t.contiguous(), group=self.ep_group)
        return torch.cat(parts).cpu()

    def expert_shards(self, model: nn.Module) -> dict[str, tuple[int, int, int]]:
        """``{parameter name: (E, start, stop)}`` of every expert shard of ``model`` (names as the model gives them)."""
        return {
            name: self._shards[id(p)]
            for name, p in model.named_parameters(remove_duplicate=False)
            if id(p) in self._shards
        }

    def gather_expert_tensors(
        self, tensors: dict[str, torch.Tensor], shards: dict[str, tuple[int, int, int]]
    ) -> dict[str, torch.Tensor]:
        """``tensors`` with every entry named ``<shard name>`` or ``<shard name>/<key>`` whose first dim is the local
        expert count replaced by its full ``[E, ...]`` tensor (collective over the EP group; every rank calls it
        with the same keys). For another strategy that composes with this one: it gathers its own shards first."""
        out = dict(tensors)
        device = next(iter(self._devices), torch.device("cpu"))
        for key in sorted(out):
            shard = shards.get(key) or shards.get(key.rpartition("/")[0])
            t = out[key]
            if shard is not None and t.dim() > 0 and t.shape[0] == shard[2] - shard[1]:
                out[key] = self._gather(t.detach().to(device))
        return out

    def slice_expert_tensors(
        self, tensors: dict[str, torch.Tensor], shards: dict[str, tuple[int, int, int]], where: str
    ) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`gather_expert_tensors`: this rank's slice ``start:stop`` of every full expert tensor.

        Raises:
            RunSetupError: an expert tensor does not hold the layer's E experts (a shard-sized one would otherwise
                load as if it were this rank's slice); the message names ``where`` and the tensor.
        """
        out = dict(tensors)
        for key, t in tensors.items():
            shard = shards.get(key) or shards.get(key.rpartition("/")[0])
            if shard is None or t.dim() == 0:
                continue
            E, start, stop = shard
            if t.shape[0] != E:
                raise RunSetupError(
                    f"{where}: {key} holds {t.shape[0]} experts, the model's layer has {E}; was the model changed "
                    "since the checkpoint was written?"
                )
            out[key] = t[start:stop]
        return out

    def gather_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Another strategy's checkpoint state (model or optimizer tensors, made on every rank) with this strategy's
        expert shards gathered along dim 0 (:meth:`gather_expert_tensors`): what a composed run saves."""
        if not self._shards:
            return tensors
        return self.gather_expert_tensors(tensors, self.expert_shards(model))

    def shard_tensors(self, tensors: dict[str, torch.Tensor], model: nn.Module, where: str) -> dict[str, torch.Tensor]:
        """This rank's slice of every full expert tensor of a state (:meth:`slice_expert_tensors`), before another
        strategy loads it."""
        if not self._shards:
            return tensors
        return self.slice_expert_tensors(tensors, self.expert_shards(model), where)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state with each expert shard gathered into its layer's full ``[E, ...]`` tensor."""
        if not self._shards:
            return None  # nothing sharded (one process): the core saves the model as it is
        return self.gather_expert_tensors(model_state_for_saving(model), self.expert_shards(model))

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor], where: str) -> bool:
        """Load a whole-model state, keeping this rank's slice of each expert tensor."""
        if not self._shards:
            return False
        state = self.slice_expert_tensors(state, self.expert_shards(model), where)
        try:
            load_model_weights(model, state, where)
        except CheckpointLoadError as exc:
            raise RunSetupError(str(exc)) from None
        return True

    def _optimizer_shards(self, optimizer: torch.optim.Optimizer) -> dict[str, tuple[int, int, int]]:
        """The expert shards under the names the optimizer's groups give them."""
        out = {}
        for group in optimizer.param_groups:
            for name, p in zip(group.get("names", []), group["params"], strict=False):
                if id(p) in self._shards:
                    out[name] = self._shards[id(p)]
        return out

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, model: nn.Module
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The optimizer state with every per-expert tensor of a shard (``exp_avg``, ...) gathered along dim 0."""
        if not self._shards:
            return None
        tensors, meta = optimizer_state_to_tensors(optimizer)
        return self.gather_expert_tensors(tensors, self._optimizer_shards(optimizer)), meta

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        tensors: dict[str, torch.Tensor],
        meta: dict[str, Any],
        where: str,
    ) -> bool:
        """Load a whole optimizer state, keeping this rank's slice of each per-expert tensor."""
        if not self._shards:
            return False
        tensors = self.slice_expert_tensors(tensors, self._optimizer_shards(optimizer), where)
        load_optimizer_state(optimizer, tensors, meta, where)
        return True

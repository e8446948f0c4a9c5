"""Config model of node-limited expert parallelism (torch-free).

::

    [parallel.expert]
    type = "node_limited"
    ep = 64                # expert-parallel group size (default: every data-parallel rank)
    ranks_per_node = 8     # ranks of one node (default 1: every rank stands for a node)
    max_nodes = 4          # nodes a token may be sent to (default: the router's topk_groups)
    fp8_dispatch = false   # send the dispatched rows as FP8 with 1 x fp8_block scales (V3 does)

The nodes of the expert-parallel group are the router's expert groups: ``ep / ranks_per_node`` must equal
``model.ffn.router.n_groups`` and ``max_nodes`` must equal ``model.ffn.router.topk_groups`` (DeepSeek-V3: 64 ranks
on 8 nodes, n_groups 8, topk_groups 4), so the router's group-limited selection is the node limit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from dsk.api import BaseConfig

if TYPE_CHECKING:  # pragma: no cover
    from dsk.api import RunEstimate


class NodeLimitedConfig(BaseConfig):
    """``[parallel.<key>] type = "node_limited"``: routed experts sharded over ranks, node-limited all-to-all."""

    ep: int | None = Field(
        None,
        ge=1,
        description="expert-parallel group size: the routed experts are spread over this many consecutive "
        "data-parallel ranks (must divide them; default: all of them; V3: 64)",
    )
    ranks_per_node: int = Field(
        1,
        ge=1,
        description="ranks of one node (must divide ep); one machine can stand for several nodes (V3: 8)",
    )
    max_nodes: int | None = Field(
        None,
        ge=1,
        description="nodes a token may be sent to; must equal model.ffn.router.topk_groups (the default; V3: 4)",
    )

    fp8_dispatch: bool = Field(
        False,
        description="send the dispatched activations as FP8 E4M3 with one float32 scale per 1 x fp8_block tile "
        "(DeepSeek-V3's dispatch; the combine and every backward stay in the activations' dtype)",
    )
    fp8_block: int = Field(128, ge=1, description="tile width of the FP8 dispatch's scales (must divide model.dim)")

    @model_validator(mode="after")
    def _layout_is_consistent(self) -> NodeLimitedConfig:
        if self.ep is not None:
            if self.ep % self.ranks_per_node:
                raise ValueError(f"ranks_per_node = {self.ranks_per_node} must divide ep = {self.ep}")
            nodes = self.ep // self.ranks_per_node
            if self.max_nodes is not None and self.max_nodes > nodes:
                raise ValueError(
                    f"max_nodes = {self.max_nodes}: must be <= the nodes of the expert-parallel group, "
                    f"ep / ranks_per_node = {self.ep} / {self.ranks_per_node} = {nodes}"
                )
        return self

    def share_cost(self, estimate: RunEstimate, resolved: dict[str, Any]) -> None:
        """The routed experts spread over ``ep`` ranks, and the all-to-all bytes per token with and without the
        node limit (:func:`all_to_all_share`; :class:`dsk.api.SharesCost`)."""
        ffn = getattr(getattr(resolved.get("model"), "ffn", None), "config", None)
        router = getattr(getattr(ffn, "router", None), "config", None)
        n_experts, top_k = getattr(ffn, "n_routed_experts", None), getattr(router, "top_k", None)
        if n_experts is None or top_k is None:
            return
        ep = self.ep if self.ep is not None else estimate.data_ranks
        estimate.expert_shards = ep
        n_groups = int(getattr(router, "n_groups", 1))
        limit = self.max_nodes if self.max_nodes is not None else int(getattr(router, "topk_groups", 1))
        nodes = max(1, ep // self.ranks_per_node)
        if n_groups <= 1 and self.max_nodes is None:
            limit = nodes  # a router without groups: no node limit
        all_to_all_share(estimate, n_experts, top_k, nodes, min(limit, nodes), self.fp8_dispatch, self.fp8_block)
        estimate.notes["expert"] = f"node_limited: routed experts / {ep} ranks on {nodes} nodes, tokens to <= {limit}"


def expected_nodes(n_experts: int, n_nodes: int, top_k: int, nodes_allowed: int | None = None) -> float:
    """The expected distinct nodes among ``top_k`` distinct experts drawn uniformly from the experts of
    ``nodes_allowed`` of the ``n_nodes`` nodes (all of them by default), each node holding ``n_experts / n_nodes``.

    A node is missed when every pick falls elsewhere: with ``e = n_experts / n_nodes`` and ``m = nodes_allowed``,
    ``E[nodes] = m * (1 - C(m e - e, top_k) / C(m e, top_k))``.
    """
    m = n_nodes if nodes_allowed is None else nodes_allowed
    per_node = n_experts // n_nodes
    pool = m * per_node
    k = min(top_k, pool)
    return m * (1.0 - math.comb(pool - per_node, k) / math.comb(pool, k))


def all_to_all_share(
    estimate: RunEstimate, n_experts: int, top_k: int, n_nodes: int, max_nodes: int, fp8: bool, fp8_block: int
) -> None:
    """The all-to-all bytes per token of one MoE layer's forward, and of a training step's every MoE layer.

    A token is sent once to each node it reaches (its own included: an upper bound of the cross-node traffic) and
    each copy comes back: dispatch ``copies * dim * (1 + 4 / fp8_block)`` bytes with the FP8 dispatch (E4M3 values
    and a float32 scale per tile) or ``copies * dim * act_bytes``; combine ``copies * dim * act_bytes``. The
    backward moves the same copies both ways in the activations' dtype. Copies: with the node limit at most
    ``max_nodes`` (the figure; the expected count within the allowed nodes is in ``details``); without it the
    expected distinct nodes of ``top_k`` experts chosen uniformly (:func:`expected_nodes`), and ``min(top_k,
    nodes)`` at most.
    """
    dim, ab = estimate.dim, estimate.act_bytes
    dispatch_bytes = (1.0 + 4.0 / fp8_block) if fp8 else ab
    unlimited = expected_nodes(n_experts, n_nodes, top_k)
    copies = {
        "node_limited": float(max_nodes),
        "node_limited_expected": expected_nodes(n_experts, n_nodes, top_k, max_nodes),
        "without_node_limit": unlimited,
        "without_node_limit_bound": float(min(top_k, n_nodes)),
    }

    def forward(c: float) -> float:
        return c * dim * (dispatch_bytes + ab)

    def training(c: float) -> float:
        return estimate.moe_layers * (forward(c) + 2.0 * c * dim * ab)

    comm = estimate.comm_bytes_per_token
    comm["all_to_all_per_moe_layer"] = forward(copies["node_limited"])
    comm["all_to_all_per_moe_layer_without_node_limit"] = forward(unlimited)
    comm["all_to_all_per_moe_layer_without_node_limit_bound"] = forward(copies["without_node_limit_bound"])
    comm["all_to_all_training"] = training(copies["node_limited"])
    comm["all_to_all_training_without_node_limit"] = training(unlimited)
    estimate.details["all_to_all"] = {
        "copies": copies,
        "nodes": n_nodes,
        "max_nodes": max_nodes,
        "top_k": top_k,
        "moe_layers": estimate.moe_layers,
        "dispatch_bytes_per_value": dispatch_bytes,
        "combine_bytes_per_value": ab,
        "formula": "per MoE layer forward: copies x dim x (dispatch + combine bytes per value); training adds the "
        "backward's 2 x copies x dim x act_bytes; copies without the limit: m (1 - C(m e - e, k) / C(m e, k))",
    }


def node_limit_problems(
    key: str, ep: int, ranks_per_node: int, max_nodes: int | None, n_groups: int, topk_groups: int, n_experts: int
) -> list[tuple[str, str]]:
    """The mismatches between the expert-parallel layout and the router, as ``(dotted key, message)`` pairs.

    The rule: the router's groups are the nodes (``n_groups == n_nodes``) and its ``topk_groups`` is the node
    limit (``== max_nodes``, which defaults to it). A router without groups (``(1, 1)``) fits one node, or any
    number of nodes when ``max_nodes`` allows them all (no limit to enforce). The experts must split evenly.

    Args:
        key: the ``[parallel.<key>]`` table's key.
        ep, ranks_per_node: the expert-parallel group size and the ranks of a node (``ep / ranks_per_node`` nodes).
        max_nodes: ``parallel.<key>.max_nodes`` (None: the router's topk_groups).
        n_groups, topk_groups: the router's group limit.
        n_experts: routed experts of the layer.
    """
    out: list[tuple[str, str]] = []
    n_nodes = ep // ranks_per_node
    where = f"parallel.{key}"
    if n_experts % ep:
        out.append((f"{where}.ep", f"{where}: ep = {ep} ranks must divide model.ffn.n_routed_experts = {n_experts}"))
    limit = topk_groups if max_nodes is None else max_nodes
    if n_groups == 1 and topk_groups == 1 and limit >= n_nodes:
        return out  # no group limit and none asked for: every token may reach every node
    if n_groups != n_nodes:
        fixes = [f"{where}.ep = {n_groups * ranks_per_node}"]
        if ep % n_groups == 0:
            fixes.insert(0, f"{where}.ranks_per_node = {ep // n_groups}")
        out.append(
            (
                "model.ffn.router.n_groups",
                f"model.ffn.router.n_groups = {n_groups} must equal the nodes of {where}: ep / ranks_per_node = "
                f"{ep} / {ranks_per_node} = {n_nodes} (the router's groups are the nodes experts are "
                f"spread over); set {' or '.join(fixes)}, or change the router's n_groups",
            )
        )
    if max_nodes is not None and max_nodes != topk_groups:
        out.append(
            (
                f"{where}.max_nodes",
                f"{where}.max_nodes = {max_nodes} must equal model.ffn.router.topk_groups = {topk_groups} "
                "(the router's group-limited top-k is what keeps each token within max_nodes nodes)",
            )
        )
    return out

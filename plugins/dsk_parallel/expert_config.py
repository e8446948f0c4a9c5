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

from pydantic import Field, model_validator

from dsk.api import BaseConfig


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

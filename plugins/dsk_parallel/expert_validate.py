"""Recipe check of node-limited expert parallelism (torch-free): the router's groups must be the nodes.

Registered by ``dsk_parallel.plugin`` (``from dsk_parallel.expert_validate import validate_node_limited``). What the
recipe alone shows is reported here, with key paths; what needs the world size (``ep`` left to its default, every
data-parallel rank) is checked again when the run is built (:meth:`dsk_parallel.expert.NodeLimitedExperts.wrap_model`).
"""

from __future__ import annotations

from typing import Any

from dsk import hookimpl
from dsk_parallel.expert_config import NodeLimitedConfig, node_limit_problems


def node_limited_problems(resolved: dict[str, Any]) -> list[Any]:
    """The :class:`dsk.api.Problem` list of every ``[parallel.<key>] type = "node_limited"`` table of a recipe."""
    from dsk.api import Problem

    problems = []
    model = resolved.get("model")
    ffn = getattr(getattr(model, "ffn", None), "config", None)
    for key, slot in (resolved.get("parallel") or {}).items():
        if getattr(slot, "name", None) != "node_limited" or not isinstance(slot.config, NodeLimitedConfig):
            continue
        cfg = slot.config
        n_experts = getattr(ffn, "n_routed_experts", None)
        if model is None or n_experts is None:
            problems.append(
                Problem(
                    "model.ffn.type",
                    f"parallel.{key}: type = 'node_limited' shards routed experts, but model.ffn has none",
                    "use model.ffn.type = 'moe', or remove the table",
                )
            )
            continue
        router = getattr(getattr(ffn, "router", None), "config", None)
        n_groups = int(getattr(router, "n_groups", 1))
        topk_groups = int(getattr(router, "topk_groups", 1)) if n_groups > 1 else 1
        if cfg.ep is not None:
            found = node_limit_problems(
                key, cfg.ep, cfg.ranks_per_node, cfg.max_nodes, n_groups, topk_groups, n_experts
            )
        elif cfg.max_nodes is not None and n_groups > 1 and cfg.max_nodes != topk_groups:
            # the world size is not known yet, but max_nodes must be the router's topk_groups whatever it is
            found = node_limit_problems(
                key, n_groups * cfg.ranks_per_node, cfg.ranks_per_node, cfg.max_nodes, n_groups, topk_groups, n_experts
            )
            found = [p for p in found if p[0].endswith(".max_nodes")]
        else:
            found = []
        dim = getattr(model, "dim", None)
        if cfg.fp8_dispatch and isinstance(dim, int) and dim % cfg.fp8_block:
            problems.append(
                Problem(
                    f"parallel.{key}.fp8_block",
                    f"parallel.{key}.fp8_block = {cfg.fp8_block} must divide model.dim = {dim} (one scale per 1 x "
                    "fp8_block tile of each dispatched row)",
                    "use the [features.fp8] block_size, which divides every K of the model",
                )
            )
        hint = (
            f"the router's n_groups are the nodes (ep / ranks_per_node) and its topk_groups is max_nodes; "
            f"with model.ffn.router.n_groups = {n_groups} run ep = {n_groups} x ranks_per_node ranks"
        )
        problems.extend(Problem(path, message, hint) for path, message in found)
    return problems


@hookimpl(specname="validate_recipe")
def validate_node_limited(resolved):
    """``[parallel.*] type = "node_limited"``: the router's groups and topk_groups must be the nodes and max_nodes."""
    return node_limited_problems(resolved)

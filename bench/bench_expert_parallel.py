"""Expert-parallel all-to-all on gloo ranks: dispatch + combine time per token against the expert compute.

One MoE layer (noaux_tc router, group-limited, E = 16 experts of hidden 128, top_k = 4, dim 256, float32, CPU)
with its routed experts sharded over 2 or 4 ranks by ``[parallel.expert] type = "node_limited"``; each rank holds
``tokens`` tokens and runs one thread. Per rank and round (interleaved, after warm-up, ranks aligned by a barrier
before each timed call), forward + backward of:

* ``dsk``: the node-limited dispatcher's dispatch and combine (``dsk_parallel.expert.NodeLimitedDispatcher``: a
  token goes once to each destination node, then is forwarded inside the node), with a trivial expert function
  (``x * weight``) so the time is the two all-to-all hops and their bookkeeping;
* ``peer``: the usual GShard-style dispatch, one row per (token, expert) slot sent straight to the expert's rank,
  same trivial experts (what the node-limited dispatch replaces);
* ``experts``: the rank's real experts (the MoE layer's CPU kernel path) on the rows the dispatch delivered.

Times are the slowest rank's median (a collective step waits for it). ``ratio = peer / dsk`` (higher: the node
dispatch is faster); ``a2a_over_expert`` is dsk's dispatch + combine time over the expert time, the compute to
communication ratio V3 overlaps (about 1:1 on its cluster). ``inter_bytes_per_token``: bytes a token sends to other
nodes, activations plus routing weights and expert ids (dsk) against the peer's; ``max_nodes x dim x 4`` bounds dsk's
activation share. "without the node limit" is ``topk_groups = max_nodes = nodes``: a token may use every node.
``FP8 dispatch``: ``fp8_dispatch = true`` (E4M3 rows with 1 x 128 scales; the bound is then ``max_nodes x (dim +
4 dim / 128)``). On this 2-core machine 4 ranks share 2 cores, so the 4-rank times include the oversubscription.
"""

from __future__ import annotations

import statistics
import time

import torch

DIM, HIDDEN, E, TOP_K = 256, 128, 16, 4


class PerSlotDispatcher:
    """The peer: each (token, expert) slot is one row sent to the rank owning the expert, and its output back."""

    def __init__(self, n_experts: int, ep_size: int, group):
        self.per_rank = n_experts // ep_size
        self.ep_size, self.group = ep_size, group
        self.last: dict = {}

    def __call__(self, x_ND, weights_NK, idx_NK, local_experts):
        import torch.distributed as dist
        from dsk_parallel.expert import all_to_all

        N, D = x_ND.shape
        K = idx_NK.shape[1]
        slot_expert = idx_NK.reshape(-1)
        order = torch.argsort(slot_expert, stable=True)  # slots by expert, hence by destination rank
        tok = order // K
        dest = slot_expert.index_select(0, order) // self.per_rank
        send_t = torch.bincount(dest, minlength=self.ep_size)
        recv_t = torch.empty_like(send_t)
        dist.all_to_all_single(recv_t, send_t, group=self.group)
        send, recv = send_t.tolist(), recv_t.tolist()
        payload = torch.cat((x_ND.index_select(0, tok), weights_NK.reshape(-1, 1).index_select(0, order)), dim=1)
        local_id = (slot_expert.index_select(0, order) % self.per_rank).to(torch.int32)
        rows = all_to_all(payload, send, recv, self.group)
        ids = all_to_all(local_id, send, recv, self.group).long()
        by_expert = torch.argsort(ids, stable=True)
        load = torch.bincount(ids, minlength=self.per_rank)
        out = local_experts(rows[:, :D].index_select(0, by_expert), load, rows[:, D].index_select(0, by_expert))
        out = torch.empty_like(out).index_copy(0, by_expert, out)
        back = all_to_all(out, recv, send, self.group)
        self.last = {"sent_rows": send}
        return back.new_zeros(N, D).index_add(0, tok, back)


def _make_moe(n_groups: int, topk_groups: int):
    from dsk_moe.config import MoEConfig, NoauxTCConfig
    from dsk_moe.moe import MoE
    from dsk_moe.router import NoauxTCRouter

    from dsk.api import ModelContext, ResolvedSlot

    router = NoauxTCConfig(top_k=TOP_K, n_groups=n_groups, topk_groups=topk_groups, route_scale=2.5)
    cfg = MoEConfig(
        n_routed_experts=E,
        n_shared_experts=1,
        expert_hidden_dim=HIDDEN,
        router=ResolvedSlot(kind="router", name="noaux_tc", config=router, impl=NoauxTCRouter),
    )
    torch.manual_seed(0)
    return MoE(cfg, ModelContext(dim=DIM, n_layers=1, vocab_size=1, max_seq_len=4096)).train()


def _rank(rank: int, world: int, cases: list[tuple[int, int]], tokens: int, warmup: int, repeats: int) -> list[dict]:
    """On one rank: each (ranks_per_node, max_nodes) case timed as the module docstring says."""
    return [_case(rank, *case, tokens, warmup, repeats) for case in cases]


def _case(rank: int, ranks_per_node: int, max_nodes: int, fp8: bool, tokens: int, warmup: int, repeats: int) -> dict:
    import torch.distributed as dist
    from dsk_parallel.expert import NodeLimitedExperts
    from dsk_parallel.expert_config import NodeLimitedConfig

    s = NodeLimitedExperts(NodeLimitedConfig(ranks_per_node=ranks_per_node, fp8_dispatch=fp8))
    s.name = "expert"
    s.setup(None)
    moe = _make_moe(s.n_nodes, max_nodes)
    s.wrap_model(moe, None)
    disp = s.dispatchers[0]
    peer = PerSlotDispatcher(E, s.ep, s.ep_group)
    gen = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(tokens, DIM, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, DIM, generator=gen)
    with torch.no_grad():
        weights, idx, _ = moe.gate(x)
    weights = weights.detach().requires_grad_(True)
    captured: dict = {}

    def capture(x_RD, load_E, scale_R):
        captured.update(x=x_RD.detach(), load=load_E, scale=scale_R.detach())
        return moe.local_experts(x_RD, load_E, scale_R)

    def trivial(x_RD, load_E, scale_R):
        return x_RD * scale_R.unsqueeze(-1)

    disp.record = True
    disp(x.detach(), weights.detach(), idx, capture)
    stats = dict(disp.last)
    disp.record = False
    peer(x.detach(), weights.detach(), idx, trivial)
    node_of_rank = [r // ranks_per_node for r in range(s.ep)]
    me = node_of_rank[s.ep_rank]
    peer_inter_rows = sum(n for r, n in enumerate(peer.last["sent_rows"]) if node_of_rank[r] != me)
    xr = captured["x"].clone().requires_grad_(True)
    sr = captured["scale"].clone().requires_grad_(True)
    gr = torch.randn(xr.shape, generator=gen)

    def step_dsk():
        (disp(x, weights, idx, trivial) * g).sum().backward()

    def step_peer():
        (peer(x, weights, idx, trivial) * g).sum().backward()

    def step_experts():
        (moe.local_experts(xr, captured["load"], sr) * gr).sum().backward()

    steps = {"dsk": step_dsk, "peer": step_peer, "experts": step_experts}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    elt = x.element_size()
    dist.barrier()
    return {
        "ranks_per_node": ranks_per_node,
        "nodes": s.n_nodes,
        "max_nodes": max_nodes,
        "t": {k: statistics.median(v) for k, v in times.items()},
        "ratios": [p / d for p, d in zip(times["peer"], times["dsk"], strict=True)],
        "dest_nodes": float(stats["dest_nodes_N"].float().mean()),
        "dsk_bytes": (stats["inter_act_bytes"] + stats["inter_meta_bytes"]) / tokens,
        "dsk_act_bytes_max": int(stats["inter_rows_N"].max()) * stats["row_act_bytes"],
        "fp8": fp8,
        "peer_bytes": peer_inter_rows * (DIM + 1) * elt / tokens + peer_inter_rows * 4 / tokens,
    }


def run(quick: bool = False) -> list[dict]:
    """Rows for 2 ranks (2 nodes) and 4 ranks (4 nodes; 2 nodes x 2 ranks), with and without the node limit."""
    from tests.distributed.harness import run_ranks

    tokens = 512 if quick else 2048
    warmup, repeats = (1, 3) if quick else (2, 7)
    # (ranks_per_node, max_nodes, fp8 dispatch) per world size
    layouts = {
        2: [(1, 1, False), (1, 2, False), (1, 1, True)],
        4: [(1, 2, False), (1, 4, False), (2, 1, False), (2, 2, False)],
    }
    rows = []
    for world, cases in layouts.items():
        per_rank = run_ranks(_rank, world, cases, tokens, warmup, repeats, timeout=600)
        for c in range(len(cases)):
            results = [r[c] for r in per_rank]
            t = {k: max(r["t"][k] for r in results) for k in ("dsk", "peer", "experts")}
            first = results[0]
            limited = first["max_nodes"] < first["nodes"]
            label = (
                f"ranks={world} nodes={first['nodes']} ranks_per_node={first['ranks_per_node']} "
                f"max_nodes={first['max_nodes']} ({'node limit' if limited else 'no node limit'}"
                f"{', FP8 dispatch' if first['fp8'] else ''}) E={E} "
                f"top_k={TOP_K} dim={DIM} expert_hidden={HIDDEN} tokens/rank={tokens} float32 fwd+bwd 1 thread/rank"
            )
            rows.append(
                {
                    "bench": "expert_a2a_vs_per_slot",
                    "case": label,
                    "dsk": t["dsk"] / tokens,
                    "peer": t["peer"] / tokens,
                    "ratio": statistics.median(x for r in results for x in r["ratios"]),
                    "target": "ratio >= 1 where tokens share nodes (top_k > max_nodes)",
                    "unit": "s/token",
                    "expert_s_per_token": t["experts"] / tokens,
                    "a2a_over_expert": t["dsk"] / t["experts"],
                    "dest_nodes_per_token": statistics.mean(r["dest_nodes"] for r in results),
                    "inter_bytes_per_token": statistics.mean(r["dsk_bytes"] for r in results),
                    "peer_inter_bytes_per_token": statistics.mean(r["peer_bytes"] for r in results),
                    "max_token_act_bytes": max(r["dsk_act_bytes_max"] for r in results),
                    "bound_act_bytes": first["max_nodes"] * (DIM + 4 * DIM // 128 if first["fp8"] else DIM * 4),
                }
            )
    return rows


if __name__ == "__main__":
    for row in run(quick=False):
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()})

"""``dsk plan``: size a full-scale run from a recipe without instantiating it.

The model is built on the meta device (DeepSeek-V3 in a few seconds), and the components' analytic costs
(:class:`dsk.api.CostModel`, summed by :func:`dsk.model.cost.model_cost`) give parameters, activated parameters and
FLOPs per token. From those and the GPU count, peak and MFU come the GPU-hours, days and cost of ``--tokens``, or,
given ``--gpu-hours``, the MFU a reported run implies. The recipe's parallel layout is checked against ``--gpus``
with the same ``validate_launch`` hook that ``dsk train --nproc`` runs: a layout the GPUs cannot hold is exit 2
with the reason.

The per-GPU memory, the all-to-all bytes per token and the pipeline bubble come from the run estimate
(:func:`dsk.train.fit.estimate_run`): the model's parts, and the share every feature, optimizer and strategy of the
recipe states on it (:class:`dsk.api.SharesCost`), summed per pipeline rank. ``dsk train`` refuses a run with the
same estimate when it cannot fit the device.
"""

from __future__ import annotations

from typing import Any

import click

from dsk.cli.common import check_launch, echo_json, load_and_validate, recipe_options, stdout_console

#: H800 / H100 SXM dense BF16 peak, TFLOPS (DeepSeek-V3 trained on H800s; its MFU is usually quoted against BF16)
DEFAULT_PEAK_TFLOPS = 989.4
#: USD per GPU-hour, the rental price DeepSeek-V3's report assumes for its cost
DEFAULT_PRICE = 2.0


def plan_numbers(cost: dict[str, Any], gpus: int, peak_tflops: float, mfu: float | None, tokens: float | None,
                 gpu_hours: float | None, price: float) -> dict[str, Any]:  # fmt: skip
    """The plan's numbers from :func:`dsk.model.cost.model_cost`'s ``cost`` (pure arithmetic, no torch).

    Training FLOPs per token are 3x the forward's (the backward costs two forwards). With ``tokens``: the run's
    FLOPs, and at ``mfu`` of ``gpus`` x ``peak_tflops`` its GPU-hours, days and cost; with ``gpu_hours`` too, the MFU
    those hours imply (the number to compare with a reported run).
    """
    per_token = float(cost["training_flops_per_token"])
    out: dict[str, Any] = {
        "gpus": gpus,
        "peak_tflops": peak_tflops,
        "params_total": cost["params_total"],
        "params_without_mtp": cost["params_without_mtp"],
        "params_mtp": cost["params_mtp"],
        "active_params_with_embeddings": cost["active_params_with_embeddings"],
        "active_params_without_embeddings": cost["active_params_without_embeddings"],
        "forward_flops_per_token": cost["flops_per_token"],
        "training_flops_per_token": per_token,
        "kv_bytes_per_token": cost["kv_bytes_per_token"],
        "seq_len": cost["seq_len"],
    }
    if tokens is not None:
        total = per_token * tokens
        out.update({"tokens": tokens, "training_flops": total})
        if gpu_hours is not None:
            out["gpu_hours"] = gpu_hours
            out["implied_mfu"] = total / (gpu_hours * 3600.0 * peak_tflops * 1e12)
        elif mfu is not None:
            out["mfu"] = mfu
            out["gpu_hours"] = total / (mfu * peak_tflops * 1e12) / 3600.0
        if "gpu_hours" in out:
            out["days"] = out["gpu_hours"] / gpus / 24.0
            out["cost_usd"] = out["gpu_hours"] * price
    return out


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--gpus", type=click.IntRange(min=1), required=True, help="GPUs of the run (its world size).")
@click.option("--gpu-peak-tflops", "peak", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_PEAK_TFLOPS,
              show_default=True, help="Peak TFLOPS of one GPU (default: H800 dense BF16).")  # fmt: skip
@click.option("--mfu", type=click.FloatRange(min=0, max=1, min_open=True), default=0.4, show_default=True,
              help="Model FLOP utilisation to assume for the GPU-hours.")  # fmt: skip
@click.option("--tokens", type=click.FloatRange(min=0, min_open=True), help="Training tokens (e.g. 14.8e12).")
@click.option("--gpu-hours", type=click.FloatRange(min=0, min_open=True),
              help="Reported GPU-hours of the run: print the MFU they imply instead of assuming one.")  # fmt: skip
@click.option("--price", type=click.FloatRange(min=0), default=DEFAULT_PRICE, show_default=True,
              help="USD per GPU-hour.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the numbers as one JSON object.")
@recipe_options
@click.pass_context
def plan(ctx, recipe, gpus, peak, mfu, tokens, gpu_hours, price, as_json, configs, sets, unsets) -> None:
    """Estimate a full-scale run of RECIPE on --gpus GPUs without building it: parameters, FLOPs, memory per
    GPU, all-to-all bytes, pipeline bubble, GPU-hours.

    \b
      dsk plan recipes/deepseek-v3-671b.toml --gpus 2048 --tokens 14.8e12
      dsk plan recipes/deepseek-v3-671b.toml --gpus 2048 --tokens 14.8e12 --gpu-hours 2.664e6
    """
    result = load_and_validate(ctx, recipe, configs, sets, unsets, require=("model",))
    check_launch(ctx, result, gpus, f"--gpus {gpus}")
    cost, estimate = _meta_cost(result.resolved, gpus)
    numbers = plan_numbers(cost, gpus, peak, mfu, tokens, gpu_hours, price)
    numbers.update(memory_numbers(estimate))
    if as_json:
        echo_json({"recipe": recipe, **numbers})
        return
    _print(numbers)


def _meta_cost(resolved: dict[str, Any], gpus: int) -> tuple[dict[str, Any], Any]:
    """The model of ``[model]`` built on the meta device (no memory), costed at the trainer's sequence length, and
    the run's estimate on ``gpus`` ranks from the same model."""
    from dsk.model.cost import model_cost
    from dsk.train.fit import estimate_run, meta_model, seq_len_of

    model = meta_model(resolved)
    return model_cost(model, seq_len_of(resolved), act_bytes=2), estimate_run(resolved, gpus, model=model)


def memory_numbers(estimate: Any) -> dict[str, Any]:
    """The plan's memory, communication and bubble keys from a :class:`dsk.api.RunEstimate` (bytes).

    ``memory``: the most loaded pipeline rank under the recipe's choices, with its optimizer state under each
    alternative optimizer the recipe's states (``optimizer_bytes_alternatives``) and its activations without
    recomputation, with every recomputable region recomputed (``selective``) and with full recomputation;
    ``memory_per_pipeline_rank``: every rank under the recipe's choices; ``all_to_all``: the strategies' bytes per
    token and how they were counted; ``bubble``: the schedule's idle fraction (None without a pipeline).
    """
    top = estimate.most_loaded()
    memory = top.as_dict()
    memory.pop("parts")
    memory["recompute"] = estimate.recompute
    memory["optimizer_bytes_alternatives"] = {
        name: estimate.rank_memory(optimizer_bytes_per_param=per)[top.rank].optimizer
        for name, per in estimate.optimizer_alternatives.items()
    }
    for key, mode in (("without_recompute", None), ("selective_recompute", "selective"), ("full_recompute", "full")):
        memory[f"activations_bytes_{key}"] = estimate.rank_memory(recompute=mode, regions=None)[top.rank].activations
    return {
        "memory": memory,
        "memory_per_pipeline_rank": [m.as_dict() for m in estimate.rank_memory()],
        "tokens_per_micro_batch": estimate.tokens_per_micro_batch,
        "chunks": estimate.chunks,
        "tokens_per_chunk": estimate.tokens_per_chunk,
        "act_bytes": estimate.act_bytes,
        "all_to_all": {**estimate.comm_bytes_per_token, **estimate.details.get("all_to_all", {})},
        "bubble": estimate.bubble,
        "estimate_notes": dict(estimate.notes),
    }


def _print(n: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"dsk plan: {n['gpus']} GPUs at {n['peak_tflops']:g} TFLOPS peak", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    rows = [
        ("parameters, without MTP", f"{n['params_without_mtp'] / 1e9:.2f} B"),
        ("parameters, with MTP", f"{n['params_total'] / 1e9:.2f} B"),
        ("activated per token (embedding and head included)", f"{n['active_params_with_embeddings'] / 1e9:.2f} B"),
        ("activated per token (without embedding and head)", f"{n['active_params_without_embeddings'] / 1e9:.2f} B"),
        (f"forward FLOPs per token at {n['seq_len']}", f"{n['forward_flops_per_token'] / 1e9:.1f} G"),
        ("training FLOPs per token (3 x forward)", f"{n['training_flops_per_token'] / 1e9:.1f} G"),
        ("KV cache per token", f"{n['kv_bytes_per_token']:,.0f} B"),
    ]
    if "tokens" in n:
        rows.append(("training tokens", f"{n['tokens']:.4g}"))
        rows.append(("training FLOPs", f"{n['training_flops']:.3e}"))
    if "implied_mfu" in n:
        rows.append(("MFU implied by the GPU-hours", f"{100 * n['implied_mfu']:.1f}%"))
    elif "mfu" in n:
        rows.append(("MFU assumed", f"{100 * n['mfu']:.0f}%"))
    if "gpu_hours" in n:
        rows += [
            ("GPU-hours", f"{n['gpu_hours'] / 1e6:.3f} M"),
            ("days", f"{n['days']:.1f}"),
            ("cost", f"${n['cost_usd'] / 1e6:.2f} M"),
        ]
    rows += _memory_rows(n)
    for what, value in rows:
        table.add_row(what, value)
    console = stdout_console()
    console.print(table)
    for note in n["estimate_notes"].values():
        console.print(f"[dim]{note}[/]")
    console.print(
        "[dim]memory: lower bounds (no allocator rounding, workspaces, collective buffers or CUDA context)[/]"
    )


def _gib(x: float) -> str:
    return f"{x / 1024**3:,.2f} GiB"


def _memory_rows(n: dict[str, Any]) -> list[tuple[str, str]]:
    m = n["memory"]
    ranks = len(n["memory_per_pipeline_rank"])
    who = f"pipeline rank {m['pipeline_rank']} of {ranks}" if ranks > 1 else "each GPU"
    act = f"{n['act_bytes']:g} B"
    rows = [
        (f"memory per GPU ({who}): parameters", _gib(m["params_bytes"])),
        ("  gradients", _gib(m["grads_bytes"])),
        ("  optimizer states", _gib(m["optimizer_bytes"])),
    ]
    rows += [(f"  optimizer states with {name}", _gib(v)) for name, v in m["optimizer_bytes_alternatives"].items()]
    rows += [
        (f"  activations as run ({m['recompute'] or 'no'} recompute, {act} values)", _gib(m["activations_bytes"])),
        ("  activations without recompute", _gib(m["activations_bytes_without_recompute"])),
        ("  activations with selective recompute", _gib(m["activations_bytes_selective_recompute"])),
        ("  activations with full recompute", _gib(m["activations_bytes_full_recompute"])),
        ("  total on the GPU", _gib(m["total_bytes"])),
    ]
    if m["cpu_bytes"]:
        rows.append(("  in CPU memory", _gib(m["cpu_bytes"])))
    rows.append(
        ("tokens per micro-batch / per chunk", f"{n['tokens_per_micro_batch']:,} / {n['tokens_per_chunk']:,.0f}")
    )
    a2a = n["all_to_all"]
    if "all_to_all_per_moe_layer" in a2a:
        c = a2a["copies"]
        rows += [
            (f"all-to-all per token per MoE layer, <= {c['node_limited']:g} nodes",
             f"{a2a['all_to_all_per_moe_layer']:,.0f} B"),
            (f"  without the node limit ({c['without_node_limit']:.2f} nodes expected)",
             f"{a2a['all_to_all_per_moe_layer_without_node_limit']:,.0f} B"),
            (f"  without the node limit, at most ({c['without_node_limit_bound']:g} nodes)",
             f"{a2a['all_to_all_per_moe_layer_without_node_limit_bound']:,.0f} B"),
            (f"  per training token, {a2a['moe_layers']} MoE layers forward + backward",
             f"{a2a['all_to_all_training'] / 1e6:,.1f} MB"),
            ("  per training token, without the node limit",
             f"{a2a['all_to_all_training_without_node_limit'] / 1e6:,.1f} MB"),
        ]  # fmt: skip
    b = n["bubble"]
    if b:
        rows.append((f"pipeline bubble ({b['schedule']}, pp {b['pp']}, {b['chunks']} chunks, {b['formula']})",
                     f"{100 * b['fraction']:.1f}%"))  # fmt: skip
    return rows

"""``dsk generate`` and ``dsk convert``: sample from a checkpoint, convert checkpoints between HF and dsk formats.

Plain click commands (``generate_cmd``, ``convert_cmd``) that the root group imports on first use; torch is
imported inside the command bodies.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import click

from dsk.cli.common import DskUsageError, echo_json, stdout_console


def _load_model(checkpoint: str, dtype: str | None = None, ema: bool = False) -> Any:
    from dsk.model.hf import CheckpointError, load_pretrained
    from dsk.train.checkpoint import CheckpointLoadError, load_feature_weights

    try:
        model = load_pretrained(checkpoint, dtype=_torch_dtype(dtype))
        if ema:  # the EMA's FP32 values, rounded to --dtype by the copy
            load_feature_weights(model, checkpoint, "ema")
        return model
    except (CheckpointError, CheckpointLoadError) as exc:
        raise DskUsageError(str(exc)) from None


def _torch_dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[name]


def _load_tokenizer(checkpoint: str, spec: str | None) -> Any:
    """``--tokenizer`` if given, else the ``tokenizer`` entry of a dsk config.json, else ``tokenizer.json``."""
    import json

    from dsk.data.tokenizers import load_tokenizer

    directory = Path(checkpoint)
    if spec is None:
        try:
            meta = json.loads((directory / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            meta = {}
        if isinstance(meta, dict) and meta.get("tokenizer") is not None:
            spec = meta["tokenizer"]
        elif (directory / "tokenizer.json").exists():
            spec = str(directory / "tokenizer.json")
        else:
            raise DskUsageError(
                f"{directory}: no tokenizer (no 'tokenizer' entry in config.json, no tokenizer.json); "
                "pass --tokenizer char|byte|PATH"
            )
    try:
        return load_tokenizer(spec)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise DskUsageError(f"cannot load the tokenizer for {directory}: {exc}") from None


@click.command("generate")
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text (repeat for a batch).")
@click.option(
    "--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=0), help="Most tokens per prompt."
)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="Sampling temperature; 0 = greedy.",
)
@click.option(
    "--top-p",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Nucleus sampling: keep the most likely tokens up to this mass (1 = off).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the sampling generator.")
@click.option(
    "--speculative",
    metavar="DRAFTER",
    default=None,
    help="Speculative decoding: the drafter a model component offers under this name proposes tokens for every "
    "prompt, the model verifies them (greedy output is plain greedy decoding's; sampling keeps its distribution).",
)
@click.option("--tokenizer", "tokenizer_spec", default=None, help="char, byte, a tokenizer.json or dsk tokenizer JSON.")
@click.option("--bos/--no-bos", default=True, show_default=True, help="Prepend the tokenizer's BOS token.")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16"]), default=None, help="[default: float32]")
@click.option("--ema", is_flag=True, help="Sample from the EMA weights of a training checkpoint ([features.ema]).")
@click.option(
    "--repeat",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Time this many runs of the whole batch (each from the same seed, so with the same output) and report the "
    "median: one short generation's time varies from run to run.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
def generate_cmd(
    checkpoint, prompts, max_new_tokens, temperature, top_p, seed, speculative, tokenizer_spec, bos, dtype, ema,
    repeat, as_json,
) -> None:  # fmt: skip
    """Sample continuations of prompts from a checkpoint (HF DeepSeek-V3 or dsk directory), with a KV cache.

    \b
    Examples:
      dsk generate path/to/checkpoint --prompt "12+7=" --temperature 0
      dsk generate ckpt --prompt "a" --prompt "b" --top-p 0.9 --json
      dsk generate ckpt --prompt "12+7=" --prompt "3+4=" --temperature 0 --speculative mtp
      dsk generate runs/fp8/checkpoints/step-300 --prompt "12+7=" --ema
      dsk generate ckpt --prompt "12+7=" --temperature 0 --speculative mtp --repeat 9 --json
    """
    tok = _load_tokenizer(checkpoint, tokenizer_spec)
    model = _load_model(checkpoint, dtype, ema)
    if tok.vocab_size > model.vocab_size:
        raise DskUsageError(
            f"{checkpoint}: the tokenizer has {tok.vocab_size} ids but the model only {model.vocab_size}"
        )
    if speculative:
        from dsk.model.generate import drafter_names

        offered = drafter_names(model)
        if speculative not in offered:
            raise DskUsageError(
                f"{checkpoint}: no component of the model offers a drafter named {speculative!r} "
                f"(offered: {', '.join(offered) or 'none'})"
            )
    encoded = [tok.encode(p, add_bos=bos and tok.bos_id is not None) for p in prompts]
    if any(not ids for ids in encoded):
        raise DskUsageError("a prompt encodes to no tokens; give some text or use --bos")

    import torch

    from dsk.model.generate import generate, speculative_generate

    _warm_up(model, encoded[0], tok, speculative, temperature, top_p)
    stats: dict[str, Any] | None = None
    runs: list[float] = []
    for _ in range(repeat):
        gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
        options = {"temperature": temperature, "top_p": top_p, "generator": gen, "pad_id": tok.pad_id}
        start = time.perf_counter()
        try:  # the whole batch in one call either way, so that the two are timed alike
            if speculative:
                res = speculative_generate(model, encoded, max_new_tokens, tok.eos_id, drafter=speculative, **options)
            else:
                res = generate(model, encoded, max_new_tokens, eos_id=tok.eos_id, **options)
        except ValueError as exc:  # prompt too long for max_seq_len and similar input problems
            raise DskUsageError(str(exc)) from None
        runs.append(time.perf_counter() - start)
    elapsed = statistics.median(runs)
    rows: list[dict[str, Any]] = [
        {"tokens": t, "finished": f, "truncated": tr}
        for t, f, tr in zip(res.tokens, res.finished, res.truncated, strict=True)
    ]
    if speculative:
        for row, drafted, accepted in zip(rows, res.drafted, res.accepted, strict=True):
            row.update(drafted=drafted, accepted=accepted)
        stats = {
            "drafted": sum(res.drafted),
            "accepted": sum(res.accepted),
            "acceptance_rate": res.acceptance_rate,
            "verify_steps": res.verify_steps,
            "tokens_per_step": round(res.tokens_per_step, 4),
        }
    n_tokens = sum(len(r["tokens"]) for r in rows)
    for prompt, row in zip(prompts, rows, strict=True):
        row["prompt"] = prompt
        row["text"] = tok.decode(row["tokens"])
    if as_json:
        echo_json(
            {
                "checkpoint": checkpoint,
                "temperature": temperature,
                "top_p": top_p,
                "seed": seed,
                "speculative": speculative,
                "completions": rows,
                "speculation": stats,
                "tokens": n_tokens,
                "seconds": round(elapsed, 4),
                "tokens_per_s": round(n_tokens / elapsed, 2) if elapsed > 0 else None,
                "repeat": repeat,
                "seconds_runs": [round(t, 4) for t in runs],
            }
        )
        return
    console = stdout_console()
    from rich.markup import escape

    for row in rows:
        console.print(f"[bold]{escape(row['prompt'])}[/]{escape(row['text'])}")
    median = f", the median of {repeat} runs" if repeat > 1 else ""
    summary = f"{n_tokens} tokens in {elapsed:.3f}s{median} ({n_tokens / max(elapsed, 1e-9):.1f} tokens/s)"
    if stats:
        summary += (
            f"; {speculative} draft acceptance {stats['acceptance_rate']:.1%} ({stats['accepted']}/{stats['drafted']}),"
            f" {stats['tokens_per_step']:.2f} tokens per row and forward"
        )
    console.print(f"[dim]{summary}[/]")


def _warm_up(model: Any, prompt: list[int], tok: Any, speculative: str | None, temperature: float, top_p: float):
    """Run the first prompt for a few tokens, untimed and with its own generator, so that the timed call measures
    decoding rather than one-time costs (the C++ kernels' loading, the first allocations of the caches, the thread
    pool's start), which are a large share of a short generation and vary from process to process."""
    import torch

    from dsk.extension import load_declared
    from dsk.model.generate import generate, speculative_generate

    load_declared()
    if model.config.max_seq_len <= len(prompt) + 1:
        return  # too long for any continuation: the timed call reports it
    device = model.embed_tokens.weight.device
    options = {"temperature": temperature, "top_p": top_p, "generator": torch.Generator(device=device).manual_seed(0)}
    options["pad_id"] = tok.pad_id
    if speculative:
        speculative_generate(model, [prompt], 4, tok.eos_id, drafter=speculative, **options)
    else:
        generate(model, [prompt], 4, eos_id=tok.eos_id, **options)


@click.command("convert")
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--to", "to", type=click.Choice(["hf", "dsk"]), required=True, help="Target format.")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def convert_cmd(src, dst, to, force, as_json) -> None:
    """Convert a checkpoint directory between the HF DeepSeek-V3 and dsk formats (tensors kept bit for bit).

    \b
    Examples:
      dsk convert path/to/hf-model ckpt-dsk --to dsk
      dsk convert path/to/dsk-checkpoint hf-out --to hf
    """
    from dsk.model.hf import CheckpointError, convert

    if Path(dst).exists() and not force:
        raise DskUsageError(f"{dst} exists; pass --force to replace it")
    try:
        out = convert(src, dst, to=to)
    except CheckpointError as exc:
        raise DskUsageError(str(exc)) from None
    if as_json:
        echo_json({"src": src, "dst": str(out), "to": to})
    else:
        stdout_console().print(f"wrote {to} checkpoint to {out}")

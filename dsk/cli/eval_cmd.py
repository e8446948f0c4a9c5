"""``dsk eval``: greedy accuracy (and pass@k) of a checkpoint on a task's test split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dsk.cli.common import DskUsageError, echo_json, escape, stdout_console


def _checkpoint_dir(path: Path) -> Path:
    """A ``step-N`` directory as given, or the checkpoint a run directory's summary names, or its latest one."""
    from dsk.train.checkpoint import latest_checkpoint

    if (path / "state.json").is_file() or (path / "config.json").is_file():
        return path
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        summary = {}
    named = summary.get("checkpoint") if isinstance(summary, dict) else None
    if named and Path(named).is_dir():
        return Path(named)
    latest = latest_checkpoint(path)
    if latest is None:
        raise DskUsageError(f"{path}: not a checkpoint (no config.json) and no checkpoints/step-N/ inside")
    return latest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _task_table(ckpt: Path, task_type: str | None, sets: tuple[str, ...]) -> dict[str, Any]:
    """The task of the checkpoint (``state.json`` / ``config.json``), with ``--task`` and ``--set`` applied."""
    from dsk.recipe.load import parse_key_path, parse_value

    stored = _read_json(ckpt / "state.json").get("task") or _read_json(ckpt / "config.json").get("task")
    if task_type is not None:
        table: dict[str, Any] = {"type": task_type}
        if isinstance(stored, dict) and stored.get("type") == task_type:
            table = dict(stored)
    elif isinstance(stored, dict):
        table = dict(stored)
    else:
        raise DskUsageError(f"{ckpt}: the checkpoint names no task; pass --task TYPE (see `dsk components`)")
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise DskUsageError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip()
        for prefix in ("task.", "data."):
            key = key.removeprefix(prefix)
        try:
            path = parse_key_path(key)
        except ValueError as exc:
            raise DskUsageError(f"--set {item!r}: {exc}") from None
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = parse_value(value.strip())
    return table


@click.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "task_type", default=None, help="Task type to evaluate on [default: the checkpoint's task].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a task option (repeatable).")
@click.option("--samples", default=200, show_default=True, type=click.IntRange(min=1), help="Distinct test problems.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--pass-k", default=0, show_default=True, type=click.IntRange(min=0), help="Also report pass@k (0: off).")
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Sampling temperature of the pass@k samples.")  # fmt: skip
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--ema", is_flag=True, help="Evaluate the EMA weights of the checkpoint ([features.ema]) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def eval_cmd(
    ctx, checkpoint, task_type, sets, samples, max_new_tokens, pass_k, temperature, device, ema, as_json
) -> None:
    """Greedy accuracy of a checkpoint on a task's held-out test split.

    CHECKPOINT is a checkpoints/step-N directory or a run directory (its final checkpoint).

    \b
    Examples:
      dsk eval runs/quickstart
      dsk eval runs/quickstart/checkpoints/step-600 --samples 500 --json
      dsk eval runs/quickstart --set max_digits=3 --pass-k 4
      dsk eval runs/fp8 --ema
    """
    from dsk.recipe.validate import validate_slot

    ckpt = _checkpoint_dir(Path(checkpoint))
    table = _task_table(ckpt, task_type, sets)
    app = ctx.find_root().obj
    registry = app.registry()
    slot, problems = validate_slot(registry, "task", table, "task")
    if slot is None:
        n = len(problems)
        raise DskUsageError(f"the task of {ckpt} has {n} problem{'s' if n != 1 else ''}", problems)

    import torch

    from dsk.data.tokenizers import load_tokenizer
    from dsk.model.hf import CheckpointError, load_pretrained
    from dsk.train.checkpoint import CheckpointLoadError, load_feature_weights
    from dsk.train.evaluate import evaluate_task, test_records

    spec = _read_json(ckpt / "config.json").get("tokenizer")
    if spec is None:
        raise DskUsageError(f"{ckpt / 'config.json'}: no 'tokenizer' entry; was it written by `dsk train`?")
    try:
        tokenizer = load_tokenizer(spec)
        model = load_pretrained(ckpt, registry=registry)
    except (CheckpointError, ValueError) as exc:
        raise DskUsageError(f"cannot load {ckpt}: {exc}") from None
    if ema:
        try:
            load_feature_weights(model, ckpt, "ema")
        except CheckpointLoadError as exc:
            raise DskUsageError(str(exc)) from None
    model = model.to(torch.device(device))
    task = slot.build()
    records = test_records(task, samples)
    if not records:
        raise DskUsageError(f"task {slot.name!r} has no test split to evaluate on")
    try:
        result = evaluate_task(
            model, tokenizer, task, records, max_new_tokens=max_new_tokens, pass_k=pass_k, temperature=temperature,
            seed=0, examples=5,
        )  # fmt: skip
    except ValueError as exc:
        raise DskUsageError(str(exc)) from None
    examples = result.pop("examples", [])
    weights = "ema" if ema else "trained"
    payload = {"checkpoint": str(ckpt), "weights": weights, "task": table, **result, "examples": examples}
    if as_json:
        echo_json(payload)
        return
    from rich.table import Table

    console = stdout_console()
    out = Table(title=f"dsk eval {escape(str(ckpt))}", title_justify="left")
    out.add_column("task")
    out.add_column("problems", justify="right")
    out.add_column("greedy accuracy", justify="right")
    if pass_k:
        out.add_column(f"pass@{pass_k}", justify="right")
    row = [slot.name, str(result["eval/samples"]), f"{100 * result['eval/accuracy']:.1f}%"]
    if pass_k:
        row.append(f"{100 * result[f'eval/pass@{pass_k}']:.1f}%")
    out.add_row(*row)
    console.print(out)
    for ex in examples:
        mark = "[green]✓[/]" if ex["correct"] else "[red]✗[/]"
        console.print(f"  {mark} {escape(ex['prompt'])}{escape(ex['completion'])}")

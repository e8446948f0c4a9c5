"""``dsk eval``: greedy accuracy of a checkpoint on a task's test split, the means of reward components on the same
completions, and with ``--pass-k K`` pass@k and the same figures over K sampled completions per problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dsk.cli.common import DskUsageError, echo_json, escape, stderr_console, stdout_console


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


def _reward_slots(registry: Any, task: Any, task_name: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The rewards to score: the ``--reward`` names, else those the task declares (``task.eval_rewards``).

    A task declares ``{name: options}`` (or a list of names): each a reward table whose ``type`` defaults to its
    name. An unknown ``--reward`` name is bad input (exit 2); a declared reward that no loaded plugin provides is
    left out with a notice, so a task never stops ``dsk eval`` from measuring accuracy.
    """
    from dsk.recipe.validate import validate_slot

    slots: dict[str, Any] = {}
    if names:
        problems = []
        for name in names:
            slot, probs = validate_slot(registry, "reward", {}, f"--reward {name}", default_type=name)
            problems += probs
            if slot is not None:
                slots[slot.name] = slot
        if problems:
            raise DskUsageError(
                f"--reward: {len(problems)} unknown reward{'s' if len(problems) != 1 else ''}", problems
            )
        return slots
    declared = getattr(task, "eval_rewards", None) or {}
    if not isinstance(declared, dict):
        declared = {str(name): {} for name in declared}
    for name, options in declared.items():
        table = {"type": name, **(options or {})}
        slot, probs = validate_slot(registry, "reward", table, f"task {task_name!r} eval_rewards.{name}")
        if slot is None:
            stderr_console().print(
                f"[yellow]note:[/] task {escape(task_name)!r} names reward {escape(name)!r}, which cannot be used "
                f"({escape(probs[0].message if probs else 'unknown')}); left out"
            )
            continue
        slots[name] = slot
    return slots


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command("eval")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.option("--task", "task_type", default=None, help="Task type to evaluate on [default: the checkpoint's task].")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a task option (repeatable).")
@click.option("--samples", default=200, show_default=True, type=click.IntRange(min=1), help="Distinct test problems.")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--pass-k", default=0, show_default=True, type=click.IntRange(min=0),
              help="Sample K completions per problem: pass@K and the sampled_* means (0: off).")  # fmt: skip
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Sampling temperature of the K samples.")  # fmt: skip
@click.option(
    "--reward",
    "reward_names",
    multiple=True,
    metavar="NAME",
    help="Score this reward on every completion (repeatable) [default: the rewards the task declares].",
)
@click.option("--device", default="cpu", show_default=True, help="torch device.")
@click.option("--ema", is_flag=True, help="Evaluate the EMA weights of the checkpoint ([features.ema]) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def eval_cmd(
    ctx, checkpoint, task_type, sets, samples, max_new_tokens, pass_k, temperature, reward_names, device, ema, as_json
) -> None:
    """Greedy accuracy of a checkpoint on a task's held-out test split, and its rewards' means.

    CHECKPOINT is a checkpoints/step-N directory or a run directory (its final checkpoint). Every greedy
    completion is also scored by the task's rewards (the built-in tasks: format and language_consistency) or
    those named by --reward; with --pass-k K the same figures are reported over K samples per problem
    (sampled_accuracy, sampled_<reward>), next to pass@K.

    \b
    Examples:
      dsk eval runs/quickstart
      dsk eval runs/quickstart/checkpoints/step-600 --samples 500 --json
      dsk eval runs/quickstart --set max_digits=3 --pass-k 4
      dsk eval runs/r1-zero --pass-k 4 --temperature 1 --json
      dsk eval runs/quickstart --reward format --reward steps
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
    rewards = _reward_slots(registry, task, slot.name, reward_names)
    records = test_records(task, samples)
    if not records:
        raise DskUsageError(f"task {slot.name!r} has no test split to evaluate on")
    try:
        result = evaluate_task(
            model, tokenizer, task, records, max_new_tokens=max_new_tokens, pass_k=pass_k, temperature=temperature,
            seed=0, examples=5, rewards=rewards, registry=registry,
        )  # fmt: skip
    except ValueError as exc:
        raise DskUsageError(str(exc)) from None
    examples = result.pop("examples", [])
    weights = "ema" if ema else "trained"
    sampling = {"pass_k": pass_k, "temperature": temperature} if pass_k else {}
    payload = {
        "checkpoint": str(ckpt), "weights": weights, "task": table, "rewards": list(rewards), **sampling, **result,
        "examples": examples,
    }  # fmt: skip
    if as_json:
        echo_json(payload)
        return
    from dsk.train.progress import FittedTable

    names = [n for n in rewards if n != "accuracy" and f"eval/{n}" in result]  # the checker gives accuracy
    columns = ["task", "problems", "greedy accuracy", *names]
    row = [slot.name, str(result["eval/samples"]), _pct(result["eval/accuracy"])]
    row += [_num(result[f"eval/{n}"]) for n in names]
    if pass_k:
        columns += [f"pass@{pass_k}", "sampled accuracy", *(f"sampled {n}" for n in names)]
        row += [_pct(result[f"eval/pass@{pass_k}"]), _pct(result["eval/sampled_accuracy"])]
        row += [_num(result.get(f"eval/sampled_{n}")) for n in names]
    console = stdout_console()
    console.print(FittedTable(f"dsk eval {ckpt}", columns, [row], left=("task",)), soft_wrap=False)
    if pass_k:
        console.print(f"sampled: {pass_k} per problem at temperature {temperature:g}", highlight=False)
    for ex in examples:
        mark = "[green]✓[/]" if ex["correct"] else "[red]✗[/]"
        console.print(f"  {mark} {escape(ex['prompt'])}{escape(ex['completion'])}")

"""Contract suites of the data-side kinds: ``task``, ``reward``, ``tokenizer`` and ``optimizer``.

A plugin's own tests call these with its component (``check_task(MyTask(MyConfig()))``); each check raises
``AssertionError`` with a message that names the component, says what is wrong and what to fix. The checks run the
component for real on a few inputs (tens of records, a handful of optimizer steps on a small model), so they take
well under a second each. The contracts are the ones of docs/plugins.md ("Component kinds and their contracts")
and docs/tasks.md.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["check_optimizer", "check_reward", "check_task", "check_tokenizer"]


def _fail(what: str, message: str) -> None:
    raise AssertionError(f"{what}: {message}")


# ---- task -----------------------------------------------------------------------------------------------------------


def _problem(record: dict[str, Any]) -> Any:
    """What identifies a record's problem: its canonical ``key``, else its prompt, else its text."""
    for field in ("key", "prompt", "text"):
        if field in record:
            return record[field]
    return None


def _wrong_completion(record: dict[str, Any]) -> str:
    # the reference answer with a digit appended: still well formed, and wrong for an integer (10x+1 != x), an
    # expression (a number that was not given) or a text answer alike
    return f"<answer>{str(record['answer']).strip()}1</answer>"


def check_task(
    task: Any,
    *,
    n: int = 200,
    wrong: Callable[[dict[str, Any]], str] | None = None,
) -> None:
    """Check a task (kind ``task``) against its contract on the first ``n`` records of each split.

    - ``sample(split, i)`` returns a JSON-serialisable dict with a ``prompt`` (verifiable and SFT tasks) or a
      ``text`` (pre-training tasks); a ``split`` field, when present, names the split it came from;
    - records are a pure function of ``(config, split, index)``: asked again, asked in another order, or asked of a
      second task built from the same config, they are equal; ``records("train", k)`` is ``sample("train", 0..k-1)``;
    - the splits are disjoint: no problem (``key``, else ``prompt``, else ``text``) and no prompt is in both;
    - a task with ``check``: every record with an ``answer`` passes with its own ``completion`` (or
      ``<answer>answer</answer>`` when it has none) and fails with a wrong one (``wrong(record)``; default: the answer
      with a digit appended); ``check`` never raises on malformed text.
    """
    what = f"task {getattr(task, 'name', type(task).__name__)!r}"
    for attr in ("sample", "records"):
        if not callable(getattr(task, attr, None)):
            _fail(what, f"has no method {attr}(); a task implements sample(split, index) and records(split, n)")
    splits: dict[str, list[dict[str, Any]]] = {}
    for split in ("train", "test"):
        records = [task.sample(split, i) for i in range(n)]
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                _fail(what, f"sample({split!r}, {i}) returned {type(record).__name__}; it must return a dict")
            if "prompt" not in record and "text" not in record:
                _fail(what, f"sample({split!r}, {i}) has neither 'prompt' nor 'text' (keys {sorted(record)})")
            if record.get("split", split) != split:
                _fail(what, f"sample({split!r}, {i}) says split={record['split']!r}; it must be {split!r}")
            try:
                again = json.loads(json.dumps(record))
            except (TypeError, ValueError) as exc:
                _fail(what, f"sample({split!r}, {i}) is not JSON-serialisable ({exc}); keep records plain data")
            if again != record:
                _fail(what, f"sample({split!r}, {i}) changes through JSON (tuples? non-str keys?); use lists, str keys")
        splits[split] = records
        backwards = [task.sample(split, i) for i in reversed(range(n))][::-1]
        if backwards != records:
            i = next(i for i, (a, b) in enumerate(zip(records, backwards, strict=True)) if a != b)
            _fail(
                what,
                f"sample({split!r}, {i}) differs when asked again or in another order; a record must be a pure "
                "function of (config, split, index): seed a generator from them, keep no state between calls",
            )
    if type(task)(task.config).sample("train", n - 1) != splits["train"][n - 1]:
        _fail(
            what,
            f"a second task built from the same config gives another sample('train', {n - 1}); derive the "
            "records from the config's seed alone (no global random state, no per-process hash())",
        )
    k = min(n, 20)
    if task.records("train", k) != splits["train"][:k]:
        _fail(what, f"records('train', {k}) is not [sample('train', i) for i in range({k})]")
    for field, label in ((_problem, "problem"), (lambda r: r.get("prompt"), "prompt")):
        train = {field(r) for r in splits["train"]} - {None}
        shared = train & {field(r) for r in splits["test"]}
        if shared:
            example = sorted(map(str, shared))[0]
            _fail(
                what,
                f"the train and test splits share {len(shared)} {label}(s) over their first {n} records (e.g. "
                f"{example!r}); decide a problem's split from a hash of its canonical key alone, and skip the other "
                "split's problems when drawing",
            )
    if callable(getattr(task, "check", None)):
        _check_checker(what, task, splits, wrong or _wrong_completion)


def _check_checker(what: str, task: Any, splits: dict[str, list[dict[str, Any]]], wrong: Callable) -> None:
    checked = 0
    for split, records in splits.items():
        for record in records[:50]:
            if record.get("answer") is None:
                continue
            checked += 1
            right = record.get("completion") or f"<answer>{record['answer']}</answer>"
            if task.check(record, right) is not True:
                _fail(
                    what,
                    f"check() rejects the reference completion {right!r} of {split} record {record.get('index')} "
                    f"(answer {record['answer']!r}); the record's own completion must pass its checker",
                )
            bad = wrong(record)
            if task.check(record, bad) is not False:
                _fail(
                    what,
                    f"check() accepts the wrong completion {bad!r} of {split} record {record.get('index')} "
                    f"(answer {record['answer']!r}); it must compare the extracted answer with the reference",
                )
            for text in ("", "<answer>", "</answer><answer>", "<think>\x00</think>", "<answer>" + "(" * 500):
                try:
                    result = task.check(record, text)
                except Exception as exc:  # noqa: BLE001 - any exception breaks the contract
                    _fail(what, f"check() raised {type(exc).__name__} on {text[:30]!r}; it must return False")
                if result is not False:
                    _fail(what, f"check() returned {result!r} on malformed text {text[:30]!r}; it must be False")
    if checked == 0:
        _fail(what, "has check() but none of its records has an 'answer' to check; records must carry 'answer'")


# ---- reward ---------------------------------------------------------------------------------------------------------


def _snapshot(prompts: Sequence[str], completions: Sequence[str], columns: dict[str, Any]) -> Any:
    """A copy of the data a reward is given (objects such as a ``checker`` or a ``registry`` are left out)."""
    data = (list, tuple, dict, str, int, float, bool, type(None))
    return copy.deepcopy((list(prompts), list(completions), {k: v for k, v in columns.items() if isinstance(v, data)}))


def _column_slice(columns: dict[str, Any], n: int, index: int) -> dict[str, Any]:
    """Columns of one completion: a per-completion list is cut to its ``index``-th item, scalars pass as they are."""
    return {k: [v[index]] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in columns.items()}


def check_reward(
    fn: Callable[..., Any],
    config: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    judged: Sequence[bool] | None = None,
    per_completion: bool = True,
    **columns: Any,
) -> None:
    """Check a reward (kind ``reward``), called as ``fn(config, prompts, completions, **columns)``.

    - it returns a ``list`` with one value per completion; each value is ``None`` or a finite real number (an
      ``int`` or ``float``, never a ``bool``);
    - ``None`` means "cannot judge" (no reference answer, nothing to score) and is allowed only there: where
      ``judged[i]`` is true the value must be a number; without ``judged``, at least one completion of the batch
      must get a number (a reward that judges nothing is broken);
    - it is deterministic (a second call gives the same values) and leaves its inputs unchanged;
    - with ``per_completion`` (the built-ins), a completion's value does not depend on the rest of the batch: the
      value of completion ``i`` called alone (its items of the per-completion columns, the scalars as they are)
      is the same;
    - an empty batch gives ``[]``.
    """
    what = f"reward {getattr(fn, '__name__', repr(fn))!r}"
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"check_reward: {len(prompts)} prompts for {n} completions; pass one prompt per completion")
    inputs = _snapshot(prompts, completions, columns)
    out = fn(config, list(prompts), list(completions), **columns)
    if not isinstance(out, list):
        _fail(what, f"returned {type(out).__name__}; it must return a list (one value per completion)")
    if len(out) != n:
        _fail(what, f"returned {len(out)} values for {n} completions; return exactly one value per completion")
    for i, value in enumerate(out):
        if value is None:
            if judged is not None and judged[i]:
                _fail(
                    what,
                    f"returned None for completion {i} ({completions[i][:40]!r}), which it can judge; None is only "
                    "for a completion it cannot score (no reference answer, nothing to score)",
                )
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(what, f"value {i} is {value!r} ({type(value).__name__}); each value must be a float or None")
        if not math.isfinite(value):
            _fail(what, f"value {i} is {value!r}; rewards must be finite (return None where it cannot judge)")
    if judged is None and n and all(v is None for v in out):
        _fail(what, f"returned None for all {n} completions; None is only for completions it cannot judge")
    if _snapshot(prompts, completions, columns) != inputs:
        _fail(what, "changed its inputs (prompts, completions or a column); copy what it needs to modify")
    again = fn(config, list(prompts), list(completions), **columns)
    if again != out:
        _fail(what, f"is not deterministic: a second call returned {again!r} instead of {out!r}")
    if per_completion:
        for i in range(n):
            alone = fn(config, [prompts[i]], [completions[i]], **_column_slice(columns, n, i))
            if alone != [out[i]]:
                _fail(
                    what,
                    f"completion {i} scores {alone!r} alone but {out[i]!r} in the batch; a completion's reward must "
                    "not depend on the others (pass per_completion=False for a deliberately batch-relative reward)",
                )
    empty = fn(config, [], [], **{k: v for k, v in columns.items() if not isinstance(v, (list, tuple))})
    if empty != []:
        _fail(what, f"returned {empty!r} for an empty batch; it must return []")


# ---- tokenizer ------------------------------------------------------------------------------------------------------


def check_tokenizer(tok: Any, samples: Sequence[str]) -> None:
    """Check a tokenizer (kind ``tokenizer``) on ``samples`` (texts it must cover, markup tags included).

    - ``vocab_size`` is a positive int; ``pad_id`` an int and ``bos_id``/``eos_id`` ints or None, all in
      ``[0, vocab_size)``; bos and eos differ, and pad differs from both except that pad may fall back to eos;
    - for each sample, ``encode`` gives ints in ``[0, vocab_size)``, the same ones when asked again, and
      ``decode(encode(s)) == s``; ``add_bos``/``add_eos`` put bos first and eos last around the same ids, and
      ``decode`` (``skip_special=True``) drops them and any padding.
    """
    what = f"tokenizer {type(tok).__name__}"
    vocab = getattr(tok, "vocab_size", None)
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab <= 0:
        _fail(what, f"vocab_size is {vocab!r}; it must be a positive int (the embedding rows the model needs)")
    specials = {name: getattr(tok, name, None) for name in ("pad_id", "bos_id", "eos_id")}
    for name, value in specials.items():
        if value is None and name != "pad_id":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
            _fail(what, f"{name} is {value!r}; it must be an int in [0, {vocab})")
    pad, bos, eos = specials["pad_id"], specials["bos_id"], specials["eos_id"]
    if bos is not None and bos == eos:
        _fail(what, f"bos_id and eos_id are both {bos}; give BOS and EOS their own ids")
    if bos is not None and pad == bos:
        _fail(what, f"pad_id and bos_id are both {pad}; padding must not read as the start of a sequence")
    if not samples:
        raise ValueError("check_tokenizer: pass at least one sample text")
    for s in samples:
        ids = tok.encode(s)
        if not isinstance(ids, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
            _fail(what, f"encode({s[:40]!r}) returned {ids!r:.80}; it must return a list of int")
        out_of_range = [i for i in ids if not 0 <= i < vocab]
        if out_of_range:
            _fail(what, f"encode({s[:40]!r}) gives ids {out_of_range[:5]} outside [0, {vocab}); raise vocab_size")
        if tok.encode(s) != ids:
            _fail(what, f"encode({s[:40]!r}) is not deterministic")
        text = tok.decode(ids)
        if text != s:
            _fail(
                what,
                f"decode(encode(s)) != s for s = {s!r:.80}: got {text!r:.80}; every character of the text must "
                "survive the round trip (cover the alphabet, or map unknown symbols explicitly)",
            )
        framed = tok.encode(s, add_bos=bos is not None, add_eos=eos is not None)
        expected = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
        if framed != expected:
            _fail(what, f"encode({s[:40]!r}, add_bos, add_eos) is {framed!r:.80}; expected bos + ids + eos")
        padded = framed + [pad, pad]
        if tok.decode(padded) != s:
            _fail(what, f"decode(skip_special=True) keeps the control tokens of {s[:40]!r}; drop pad, bos and eos")


# ---- optimizer ------------------------------------------------------------------------------------------------------


def check_optimizer(
    build: Callable[[Any], Any],
    model_factory: Callable[[], Any],
    *,
    steps: int = 3,
) -> None:
    """Check an optimizer (kind ``optimizer``): ``build(model)`` returns a ``torch.optim.Optimizer`` for the model
    ``model_factory()`` makes (called under ``torch.manual_seed(0)``; it needs two or more trainable parameters).

    Gradients are seeded random tensors set on every trainable parameter but the last, which stays without one.

    - every param group carries ``"names"``: one name per parameter, the parameter's name in the model; together
      the groups hold each trainable parameter once;
    - a step changes every parameter that has a gradient and leaves the one without it bit-equal;
    - ``state_dict()`` round trips: a copy built from a fresh model holding the same weights, after
      ``load_state_dict``, holds its state tensors in the original's dtypes (a BF16 moment stays BF16) and takes
      the next step bit-equal to the original, parameters and state;
    - the same run twice gives bit-equal parameters.
    """
    import torch

    from dsk.train.optim import named_unique_parameters

    def fresh() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = model_factory()
        return model, build(model)

    model, opt = fresh()
    what = f"optimizer {type(opt).__name__}"
    if not isinstance(opt, torch.optim.Optimizer):
        _fail(what, "build(model) must return a torch.optim.Optimizer")
    named = named_unique_parameters(model)
    if len(named) < 2:
        raise ValueError("check_optimizer: the model needs two or more trainable parameters")
    name_of = {id(p): n for n, p in named}
    seen: list[str] = []
    for g, group in enumerate(opt.param_groups):
        names = group.get("names")
        if not isinstance(names, list) or len(names) != len(group["params"]):
            _fail(
                what,
                f"param group {g} has names={names!r:.60} for {len(group['params'])} parameters; every group must "
                "carry 'names', one per parameter (dsk saves the state by name)",
            )
        for name, p in zip(names, group["params"], strict=True):
            if name_of.get(id(p)) != name:
                _fail(what, f"group {g} names a parameter {name!r}, but it is {name_of.get(id(p))!r} in the model")
            seen.append(name)
    missing = sorted(set(name_of.values()) - set(seen))
    if missing or len(seen) != len(set(seen)):
        _fail(what, f"the groups must hold each trainable parameter once; missing {missing}, seen {sorted(seen)}")

    def grads(step: int) -> list[Any]:
        gen = torch.Generator().manual_seed(1000 + step)
        return [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) for _, p in named[:-1]]

    def take_step(model: Any, opt: Any, step: int) -> None:
        params = [p for _, p in named_unique_parameters(model)]
        for p, g in zip(params[:-1], grads(step), strict=True):
            p.grad = g.to(p.device)
        params[-1].grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in named}
    take_step(model, opt, 0)
    for n, p in named[:-1]:
        if torch.equal(p.detach(), before[n]):
            _fail(what, f"a step left {n!r} unchanged although it has a gradient")
    last = named[-1][0]
    if not torch.equal(named[-1][1].detach(), before[last]):
        _fail(what, f"a step changed {last!r}, which has no gradient; skip parameters whose .grad is None")
    for step in range(1, steps - 1):
        take_step(model, opt, step)

    state = copy.deepcopy(opt.state_dict())
    copy_model, copy_opt = fresh()
    copy_model.load_state_dict(model.state_dict())
    copy_opt.load_state_dict(state)
    for (n, p), (_, q) in zip(named, named_unique_parameters(copy_model), strict=True):
        for key, value in opt.state.get(p, {}).items():
            loaded = copy_opt.state.get(q, {}).get(key)
            if isinstance(value, torch.Tensor) and (
                not isinstance(loaded, torch.Tensor) or loaded.dtype != value.dtype
            ):
                got = loaded.dtype if isinstance(loaded, torch.Tensor) else type(loaded).__name__
                _fail(
                    what,
                    f"state {key!r} of {n!r} is {value.dtype} but {got} after load_state_dict; keep the state in its "
                    "own dtypes when loading (override load_state_dict and cast back)",
                )
    take_step(model, opt, steps - 1)
    take_step(copy_model, copy_opt, steps - 1)
    for (n, p), (_, q) in zip(named, named_unique_parameters(copy_model), strict=True):
        if not torch.equal(p.detach(), q.detach()):
            _fail(
                what,
                f"after state_dict() / load_state_dict() the copy's next step differs from the original's on {n!r}; "
                "every value a step reads (moments, step counts, buffers) must be in state_dict()",
            )
    again, again_opt = fresh()
    for step in range(steps):
        take_step(again, again_opt, step)
    for (n, p), (_, q) in zip(named, named_unique_parameters(again), strict=True):
        if not torch.equal(p.detach(), q.detach()):
            _fail(
                what, f"the same {steps} steps from the same start give another {n!r}; the update must be deterministic"
            )

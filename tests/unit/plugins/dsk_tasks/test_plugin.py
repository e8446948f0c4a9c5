"""The plugin registers every task and tokenizer by lazy name, without importing torch or the implementations."""

import importlib
import subprocess
import sys

from dsk_tasks import plugin


def registrations():
    calls = []

    def register(kind, name, impl, *, config=None, summary=None, aliases=()):
        calls.append((kind, name, impl, config, summary))

    plugin.register_tasks(register)
    return calls


def test_registers_four_tasks_and_three_tokenizers():
    names = {(kind, name) for kind, name, *_ in registrations()}
    assert names == {
        ("task", "arithmetic"),
        ("task", "countdown"),
        ("task", "modular"),
        ("task", "jsonl"),
        ("task", "markov"),
        ("tokenizer", "char"),
        ("tokenizer", "byte"),
        ("tokenizer", "hf"),
    }


def test_every_impl_string_resolves_and_builds_from_its_default_config():
    for kind, name, impl, config, summary in registrations():
        module, attr = impl.split(":")
        target = getattr(importlib.import_module(module), attr)
        assert summary
        if kind == "task" and name != "jsonl":  # jsonl needs a path; see test_jsonl_task.py
            task = target(config())
            assert task.name == name
            if name == "markov":  # pre-training text, nothing to check: see test_markov.py
                assert task.sample("train", 0)["text"]
                continue
            assert task.check(task.sample("train", 0), task.sample("train", 0)["completion"])


def test_importing_the_plugin_imports_neither_torch_nor_the_tasks():
    code = (
        "import sys, dsk_tasks.plugin; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dsk_tasks.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": ":".join(sys.path)}
    )
    assert out.stdout.strip() == "['dsk_tasks.config', 'dsk_tasks.plugin']"

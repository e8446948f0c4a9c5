"""The runtime half of the public API: what plugin *implementations* (trainers, components) use at run time.

``dsk.api`` holds what a plugin module needs to register itself (config models, slots, contracts) and never
imports torch. This module is for the implementation modules a plugin names by ``"module:attr"``: the training
loop base, run context, checkpoints, batching, tokenizers, generation, the build path and the kernel helper.
Names are loaded on first use, so importing this module is cheap too; plugins import nothing else from dsk.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the core module that defines it
_LAZY: dict[str, str] = {
    "BatchIterator": "dsk.data.batching",
    "Block": "dsk.model.transformer",
    "BuiltRun": "dsk.train.build",
    "CheckpointError": "dsk.model.hf",
    "CheckpointLoadError": "dsk.train.checkpoint",
    "CppExtension": "dsk.extension",
    "DSKModel": "dsk.model.transformer",
    "DataError": "dsk.data.jsonl",
    "ExampleStream": "dsk.data.batching",
    "IGNORE_INDEX": "dsk.data.batching",
    "InputError": "dsk.errors",
    "JsonlSource": "dsk.data.jsonl",
    "LANGUAGES": "dsk.data.languages",
    "LinearImpl": "dsk.model.linear",
    "LinearSite": "dsk.model.linear",
    "LossOutput": "dsk.model.loss",
    "ModelOutput": "dsk.model.transformer",
    "PLAIN_LINEAR": "dsk.model.linear",
    "RMSNorm": "dsk.model.norm",
    "RunContext": "dsk.train.context",
    "RunFailed": "dsk.train.context",
    "RunInterrupted": "dsk.train.context",
    "RunSetupError": "dsk.train.context",
    "SPELLED_LANGUAGES": "dsk.data.languages",
    "SYMBOLIC": "dsk.data.languages",
    "SideChannels": "dsk.model.loss",
    "SpeculativeBatchResult": "dsk.model.generate",
    "SpeculativeResult": "dsk.model.generate",
    "Step": "dsk.data.languages",
    "StepUpdate": "dsk.train.build",
    "TokenizerFileError": "dsk.data.tokenizers",
    "TrainerRun": "dsk.train.loop",
    "build_run": "dsk.train.build",
    "collect_side_channels": "dsk.model.loss",
    "cpu_kernel_supports": "dsk.extension",
    "cross_entropy": "dsk.model.loss",
    "current_regions": "dsk.model.regions",
    "document_causal_mask": "dsk.data.batching",
    "done_across_ranks": "dsk.model.generate",
    "encode_example": "dsk.data.batching",
    "encode_record": "dsk.data.batching",
    "evaluate_loss": "dsk.train.evaluate",
    "evaluate_task": "dsk.train.evaluate",
    "extract_answer": "dsk.data.completions",
    "extract_think": "dsk.data.completions",
    "find_drafter": "dsk.model.generate",
    "generate": "dsk.model.generate",
    "iter_jsonl": "dsk.data.jsonl",
    "language_consistency": "dsk.data.languages",
    "latest_checkpoint": "dsk.train.checkpoint",
    "list_checkpoints": "dsk.train.checkpoint",
    "lm_loss": "dsk.model.loss",
    "load_checkpoint": "dsk.train.checkpoint",
    "load_model_weights": "dsk.train.checkpoint",
    "load_optimizer_state": "dsk.train.optim",
    "load_pretrained": "dsk.model.hf",
    "load_tokenizer": "dsk.data.tokenizers",
    "loss_from_output": "dsk.model.loss",
    "lr_at": "dsk.train.schedule",
    "model_state_for_saving": "dsk.train.checkpoint",
    "named_unique_parameters": "dsk.train.optim",
    "optimizer_state_to_tensors": "dsk.train.optim",
    "read_jsonl": "dsk.data.jsonl",
    "recomputable": "dsk.model.regions",
    "recompute_scope": "dsk.model.regions",
    "recomputing": "dsk.model.regions",
    "region": "dsk.model.regions",
    "profile_part": "dsk.model.regions",
    "region_handler": "dsk.model.regions",
    "remove_stale_temporaries": "dsk.train.checkpoint",
    "render_steps": "dsk.data.languages",
    "save_checkpoint": "dsk.train.checkpoint",
    "score_rewards": "dsk.train.evaluate",
    "speculative_generate": "dsk.model.generate",
    "split_layers": "dsk.model.transformer",
    "test_records": "dsk.train.evaluate",
    "test_text_records": "dsk.train.evaluate",
    "tokens_per_s": "dsk.train.loop",
    "training_loss": "dsk.model.loss",
}

#: public names defined under another name in their module
_ALIASES: dict[str, str] = {"PLAIN_LINEAR": "PLAIN"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dsk.api.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _ALIASES.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

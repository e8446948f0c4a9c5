"""Training checkpoints: ``<run>/checkpoints/step-N/``, written atomically and read without unpickling.

A step directory holds:

=====================  ==============================================================================================
``config.json``        the dsk model format of ``dsk/model/CHECKPOINT.md`` (``format = "dsk-model"``, the ``model``
                       table, ``vocab_size``) plus ``tokenizer`` (its ``to_json`` object), so
                       ``dsk.load_pretrained(step_dir)``, ``dsk generate`` and ``dsk eval`` read the directory alone
``model.safetensors``  ``model.state_dict()`` (tied head left out), persistent buffers included (router biases)
``optimizer.safetensors`` / ``optimizer.json``  optimizer state tensors by parameter name / its JSON skeleton
``state.json``         step, RNG states, data-iterator position, non-finite counters, trainer, task and tokenizer
=====================  ==============================================================================================

Atomicity: everything is written into a hidden sibling ``.tmp-step-N-<random>`` and renamed into place with one
``os.replace``; ``state.json`` is written last, and a directory without it is never listed as a checkpoint. A
process killed at any moment leaves either the previous checkpoints alone or the new one complete; leftover
temporary directories are removed by the next run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsk.errors import InputError

__all__ = [
    "CHECKPOINTS_DIR",
    "CheckpointData",
    "list_checkpoints",
    "latest_checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "load_feature_weights",
    "load_model_weights",
    "model_state_for_saving",
    "rng_state",
    "set_rng_state",
    "remove_stale_temporaries",
]

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "state.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
OPTIM_WEIGHTS = "optimizer.safetensors"
OPTIM_META = "optimizer.json"
FEATURE_WEIGHTS = "features.safetensors"
STATE_FORMAT = "dsk-train-state"
STATE_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_TMP_PREFIX = ".tmp-step-"


class CheckpointLoadError(InputError):
    """A checkpoint directory is missing a file, or a file is malformed (the message names it)."""


# ---------------------------------------------------------------------------------------------------------------
# RNG state as JSON
# ---------------------------------------------------------------------------------------------------------------
def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.cpu().tolist())).decode("ascii")  # no numpy: it is not a core dependency


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, torch CPU (and CUDA, numpy when in use) RNG states as JSON-ready values (torch states base64)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss], "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    np = sys.modules.get("numpy")  # only when something imported it: dsk itself never draws from numpy
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (entries for a library not in use are ignored)."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])
    np = sys.modules.get("numpy")
    if "numpy" in state and np is not None:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------------------------
# listing
# ---------------------------------------------------------------------------------------------------------------
def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run directory (those with ``state.json``), oldest first, as (step, path)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_NAME).is_file():
            found.append((int(m[1]), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete temporary directories left by a save that was killed; returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) or child.name.startswith(".old-step-"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


# ---------------------------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------------------------
def model_state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as contiguous CPU copies, the tied output head left out (safetensors refuses shared
    storage, and the loader re-ties it)."""
    state = dict(model.state_dict())
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def model_config_json(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` in the dsk model format of CHECKPOINT.md (the same keys ``save_dsk`` writes)."""
    from dsk.model.hf import DSK_FORMAT, DSK_FORMAT_VERSION, config_to_table

    return {
        **(extra or {}),
        "format": DSK_FORMAT,
        "format_version": DSK_FORMAT_VERSION,
        "vocab_size": model.vocab_size,
        "dtype": str(model.embed_tokens.weight.dtype).removeprefix("torch."),
        "model": config_to_table(model.config),
    }


def _write_json(path: Path, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    config_extra: dict[str, Any] | None = None,
    keep: int | None = None,
    save_delay: float = 0.0,
    feature_state: dict[str, dict[str, Any]] | None = None,
    write: bool = True,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
) -> Path:
    """Write ``<run_dir>/checkpoints/step-<step>/`` atomically and keep the newest ``keep`` checkpoints.

    Args:
        run_dir: the run (or stage) directory.
        step: optimizer steps done.
        model: the model (a :class:`dsk.model.DSKModel`).
        optimizer: its optimizer (groups carry parameter names: an ``[optimizer]`` component), or None for weights only.
        state: JSON-ready training state (step, data position, counters...); RNG states are added here.
        config_extra: extra keys of ``config.json`` (e.g. ``tokenizer``).
        keep: how many checkpoints to keep (None: all).
        save_delay: seconds to wait between writing the files and the rename. A test hook: it holds the process
            inside the save so a test can kill it there; 0 in real runs.
        feature_state: each feature's ``state_dict()`` by feature name: tensors go to ``features.safetensors``
            (``"<feature>/<key>"``), other values to ``state.json`` under ``features``.
        write: False on the ranks that do not write the run directory: nothing is written, the path is returned.
        model_state: the weights to save, when the caller gathered them (a sharded model); default: ``model``'s.
        optimizer_state: ``(tensors, meta)`` of the optimizer, when the caller gathered them; default: ``optimizer``'s.

    Returns:
        The checkpoint directory.
    """
    from safetensors.torch import save_file

    from dsk.train.optim import optimizer_state_to_tensors

    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step-{step}"
    if not write:
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=root))
    try:
        weights = model_state if model_state is not None else model_state_for_saving(model)
        save_file(weights, str(tmp / MODEL_WEIGHTS), metadata={"format": "pt"})
        _fsync_file(tmp / MODEL_WEIGHTS)
        _write_json(tmp / MODEL_CONFIG, model_config_json(model, config_extra))
        if optimizer_state is not None or optimizer is not None:
            tensors, meta = optimizer_state if optimizer_state is not None else optimizer_state_to_tensors(optimizer)
            save_file(tensors, str(tmp / OPTIM_WEIGHTS), metadata={"format": "pt"})
            _fsync_file(tmp / OPTIM_WEIGHTS)
            _write_json(tmp / OPTIM_META, meta)
        feature_json: dict[str, dict[str, Any]] = {}
        if feature_state:
            feature_tensors: dict[str, torch.Tensor] = {}
            for name, fstate in feature_state.items():
                feature_json[name] = {}
                for key, value in fstate.items():
                    if isinstance(value, torch.Tensor):
                        feature_tensors[f"{name}/{key}"] = value.detach().to("cpu").contiguous().clone()
                    else:
                        feature_json[name][key] = value
            if feature_tensors:
                save_file(feature_tensors, str(tmp / FEATURE_WEIGHTS), metadata={"format": "pt"})
                _fsync_file(tmp / FEATURE_WEIGHTS)
        full_state = {
            "format": STATE_FORMAT,
            "format_version": STATE_FORMAT_VERSION,
            **state,
            **({"features": feature_json} if feature_state else {}),
            "step": step,
            "rng": rng_state(),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        _write_json(tmp / STATE_NAME, full_state)  # last: its presence marks a complete checkpoint
        if save_delay > 0:
            time.sleep(save_delay)
        if final.exists():
            # Saving the same step again (an interrupt right after a periodic save): swap, never delete first.
            old = root / f".old-step-{step}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        for _, old_dir in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old_dir, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CheckpointData:
    """A checkpoint read into memory: JSON files parsed, tensors loaded with safetensors (no pickle anywhere)."""

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor] | None
    optimizer_meta: dict[str, Any] | None
    feature_tensors: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        """Optimizer steps done when the checkpoint was taken."""
        return int(self.state["step"])

    @property
    def feature_state(self) -> dict[str, dict[str, Any]]:
        """Each feature's saved state (JSON values and tensors), by feature name."""
        out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (self.state.get("features") or {}).items()}
        for key, tensor in (self.feature_tensors or {}).items():
            name, _, sub = key.partition("/")
            out.setdefault(name, {})[sub] = tensor
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointLoadError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointLoadError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointLoadError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointLoadError(f"{path}: not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointLoadError(f"{path}: cannot read safetensors ({exc})") from None


def load_checkpoint(path: str | Path, *, with_optimizer: bool = True) -> CheckpointData:
    """Read a ``step-N`` directory (or a run directory: its latest checkpoint).

    Raises:
        CheckpointLoadError: no checkpoint there, or a file is missing or malformed.
    """
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointLoadError(f"{path}: no checkpoint here (no {STATE_NAME}, no {CHECKPOINTS_DIR}/step-N/)")
        path = latest
    state = _read_json(path / STATE_NAME)
    if state.get("format") != STATE_FORMAT:
        raise CheckpointLoadError(f"{path / STATE_NAME}: not a dsk training state (format {state.get('format')!r})")
    if int(state.get("format_version", 0)) > STATE_FORMAT_VERSION:
        raise CheckpointLoadError(f"{path / STATE_NAME}: format_version {state['format_version']} is too new")
    config = _read_json(path / MODEL_CONFIG)
    model_state = _read_tensors(path / MODEL_WEIGHTS)
    opt_tensors = opt_meta = None
    if with_optimizer and (path / OPTIM_META).is_file():
        opt_meta = _read_json(path / OPTIM_META)
        opt_tensors = _read_tensors(path / OPTIM_WEIGHTS)
    feature_tensors = _read_tensors(path / FEATURE_WEIGHTS) if (path / FEATURE_WEIGHTS).is_file() else None
    return CheckpointData(path, state, config, model_state, opt_tensors, opt_meta, feature_tensors)


def load_model_weights(model: nn.Module, model_state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Load saved weights into ``model`` strictly (names and shapes must match; a tied head is re-tied).

    Raises:
        CheckpointLoadError: missing, unexpected or mis-shaped tensors (named).
    """
    state = dict(model_state)
    config = getattr(model, "config", None)
    if getattr(config, "tie_embeddings", False) and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        raise CheckpointLoadError(
            f"{where}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shape {shapes[:3]}); was the model changed since the checkpoint was written?"
        )
    model.load_state_dict(state, strict=True)


def load_feature_weights(model: nn.Module, path: str | Path, label: str = "ema") -> Path:
    """Overwrite ``model``'s parameters with the copy a feature saved in a checkpoint (the EMA weights).

    A feature that keeps another set of the model's weights marks its JSON state with ``"model_weights": label``
    and saves them as ``weights/<parameter name>`` tensors (``dsk_memory``'s ``ema`` does). Parameters it does not
    hold (frozen ones) and buffers keep the checkpoint's trained values.

    Args:
        model: a model loaded from the same checkpoint (its trained weights).
        path: a ``step-N`` directory or a run directory (its latest checkpoint).
        label: which weights (``"ema"``).

    Returns:
        The checkpoint directory read.

    Raises:
        CheckpointLoadError: no training checkpoint there, no feature state with these weights, or names and
            shapes that do not match the model.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_NAME).is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointLoadError(
                f"{path}: not a training checkpoint (no {STATE_NAME}), so it holds no {label} weights"
            )
        path = latest
    features = _read_json(path / STATE_NAME).get("features") or {}
    owners = [name for name, st in features.items() if isinstance(st, dict) and st.get("model_weights") == label]
    if not owners or not (path / FEATURE_WEIGHTS).is_file():
        raise CheckpointLoadError(
            f"{path}: holds no {label} weights (the run trained without [features.{label}]); drop --{label}"
        )
    prefix = f"{owners[0]}/weights/"
    try:
        saved = {k[len(prefix) :]: v for k, v in load_file(str(path / FEATURE_WEIGHTS)).items() if k.startswith(prefix)}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise CheckpointLoadError(f"{path / FEATURE_WEIGHTS}: cannot read safetensors ({exc})") from None
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    shapes = [k for k, v in saved.items() if k in params and tuple(v.shape) != tuple(params[k].shape)]
    if not saved or unknown or shapes:
        raise CheckpointLoadError(
            f"{path}: the {label} weights do not match the model (unexpected {unknown[:3]}, other shape {shapes[:3]})"
        )
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return path

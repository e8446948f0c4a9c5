"""Training throughput of the quickstart model against ``transformers``, and the router ablation table.

Rows:
* ``train tokens/s``: optimizer steps of the ``recipes/quickstart.toml`` model on quickstart batches (2-digit
  addition with traces, batch 64, float32, CPU). ``dsk`` = the ``pretrain`` trainer's own step (LM + MTP + balance
  loss, gradient clipping, AdamW, router bias update, metrics); ``peer`` = ``transformers.DeepseekV3ForCausalLM``
  built from the same config (``dsk.model.hf.model_config_to_hf``) with the same weights, trained with its own step
  (``loss = model(input_ids, attention_mask, labels).loss``, backward, clipping, AdamW) on the same batches. HF's
  DeepSeek-V3 has no MTP module in training, so a second row times dsk without its MTP head (the like-for-like
  model). Tokens are the non-padding tokens of a batch; medians of interleaved steps; ``ratio = dsk / peer``.
* ``ablation ...``: ``bench/ablation.py`` (three routers, same model and data): final MaxVio and LM loss per router,
  and noaux_tc against aux_loss (targets: MaxVio at most 1/4, loss no worse). Quick mode trains 150 steps.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.lm_run import lm_run

ROOT = Path(__file__).resolve().parents[1]


def _quickstart_run(tmp: Path, without_mtp: bool):
    """A set-up ``pretrain`` run of the quickstart recipe (``dsk_trainers.lm._Run``) writing into ``tmp``."""
    overrides = [("unset", "model.mtp")] if without_mtp else []
    run = lm_run("quickstart.toml", tmp, overrides)
    return run


def _interleaved(fns: dict[str, Callable[[int], Any]], steps: int, warmup: int) -> dict[str, float]:
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup, warmup + steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def _throughput_row(quick: bool, without_mtp: bool) -> dict[str, Any]:
    import transformers

    from dsk.model.hf import model_config_to_hf

    steps, warmup = (4, 2) if quick else (20, 3)
    with tempfile.TemporaryDirectory() as tmp:
        run = _quickstart_run(Path(tmp), without_mtp)
        cfg = run.cfg
        model = run.model
        hf_cfg = model_config_to_hf(model.config, model.vocab_size, torch.float32)
        peer = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_cfg)).train()
        # Same weights: the HF names are dsk's with a "model." prefix and per-expert matrices (CHECKPOINT.md).
        peer.save_pretrained(tmp + "/hf")
        from dsk.model.hf import load_hf

        same = load_hf(tmp + "/hf").state_dict()
        model.load_state_dict({**model.state_dict(), **same})
        batches = [next(run.batches) for _ in range(steps + warmup)]
        run.batches = iter(copy.copy(batches))  # the trainer's step reads the same batches as the peer
        ocfg = run.built.optimizer_config
        opt = torch.optim.AdamW(
            peer.parameters(), lr=ocfg.lr, betas=ocfg.betas, eps=ocfg.eps, weight_decay=ocfg.weight_decay
        )

        def dsk_step(i: int) -> None:
            run.train_step()

        def peer_step(i: int) -> None:
            b = batches[i]
            out = peer(input_ids=b["input_ids"], attention_mask=(b["doc_ids"] >= 0).long(), labels=b["labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(peer.parameters(), ocfg.grad_clip)
            opt.step()

        t = _interleaved({"dsk": dsk_step, "peer": peer_step}, steps, warmup)
        tokens = statistics.median(int((b["doc_ids"] >= 0).sum()) for b in batches)
        shape = f"B{cfg.batch_size}x{batches[0]['input_ids'].shape[1]}"
    what = "without MTP (like-for-like)" if without_mtp else "quickstart recipe (dsk adds MTP)"
    return {
        "bench": "train",
        "case": f"train tokens/s {what}, {shape} fp32 AdamW",
        "dsk": tokens / t["dsk"],
        "peer": tokens / t["peer"],
        "ratio": t["peer"] / t["dsk"],
        "target": ">= 1 vs transformers DeepseekV3ForCausalLM",
        "unit": "tokens/s",
    }


def run(quick: bool) -> list[dict[str, Any]]:
    """Rows of ``python -m bench train`` (see the module docstring)."""
    from bench.ablation import rows_for_bench, run_ablation

    rows = [_throughput_row(quick, without_mtp=False), _throughput_row(quick, without_mtp=True)]
    with tempfile.TemporaryDirectory() as tmp:
        rows += rows_for_bench(run_ablation(steps=150 if quick else None, out_dir=Path(tmp)))
    return rows


if __name__ == "__main__":
    for row in run(quick=True):
        print(row)

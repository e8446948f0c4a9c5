"""Template of a ``trainer`` plugin: a plain next-token pre-training loop on dsk's runtime."""

SUMMARY = "plain next-token pre-training loop on dsk's shared build path and update"
MODULE = "trainer"
TABLE = "[trainer]"
IMPL_NAME = "{Class}"
CONTRACT = "`dsk.testing.contracts.run.check_trainer`"

CONFIG = '''\
"""Options of the $comp trainer: the [trainer] table. Torch-free; every field defaulted.

The optimizer, its learning-rate schedule and clipping are the [optimizer] table's (dsk.api.OptimizerConfig).
"""

from dsk.api import BaseConfig
from pydantic import Field


class $Config(BaseConfig):
    """Next-token pre-training on the [data] task's training records."""

    steps: int = Field(100, ge=1, description="optimizer steps of this run")
    batch_size: int = Field(16, ge=1, description="rows per optimizer step on each data rank")
    seq_len: int = Field(64, ge=2, description="most tokens per row, BOS and EOS included (longer rows are cut)")
    eval_samples: int = Field(50, ge=0, description="test problems whose greedy accuracy is measured (0: none)")
    eval_max_new_tokens: int = Field(32, ge=1, description="most tokens generated per test prompt")
    max_nonfinite: int = Field(5, ge=1, description="stop after this many steps in a row with a non-finite loss")
'''

IMPL = '''\
"""The $comp trainer: plain next-token pre-training on dsk's runtime.

Contract (docs/plugins.md, "trainer"): built as `$Class(config)`; `run(ctx)` runs one stage. It builds its run
with `dsk.api.runtime.build_run(ctx)` (tokenizer, task, model, features, parallel strategy, optimizer: the one
build path every trainer shares), and the shared loop of `dsk.api.runtime.TrainerRun` calls `train_step` once per
optimizer step, writes the metrics rows, evaluates, saves checkpoints and resumes exactly (`--resume`).

One step here: a batch of the task's training records (each rank keeps its rows), the model's loss (LM, MTP and
auxiliary terms) backward through `BuiltRun.forward_backward`, then `BuiltRun.update` (clipping, the finite check,
the features' step hooks, `optimizer.step()`, the router updates). Change `train_step` (the loss, the data) to make
it yours.
"""

from pathlib import Path

from dsk.api.runtime import (
    IGNORE_INDEX,
    BatchIterator,
    ExampleStream,
    SideChannels,
    TrainerRun,
    build_run,
    encode_example,
    evaluate_task,
    loss_from_output,
    test_records,
)

from .config import $Config


class $Class:
    """Kind `trainer`: `$Class(config).run(ctx)` trains for `config.steps` steps and returns the summary."""

    name = "$comp"

    def __init__(self, config: $Config):
        self.config = config

    def run(self, ctx) -> dict:
        return _Run(self, ctx).run()


class _Run(TrainerRun):
    """One run of the trainer; the loop, checkpoints and resume are TrainerRun's."""

    def setup(self) -> None:
        built = self.use(build_run(self.ctx))
        self.tokenizer, self.task = built.tokenizer, built.task

        def encode(record):  # every token a target but BOS; prompt and completion encoded as evaluation does
            ids, _ = encode_example(self.tokenizer, record["prompt"], record["completion"])
            return ids, [0] + [1] * (len(ids) - 1)

        # every data rank reads the same global batch and keeps its own rows (built.local_rows)
        self.batches = BatchIterator(
            ExampleStream(lambda i: self.task.sample("train", i)),
            self.tokenizer,
            batch_size=self.cfg.batch_size * built.parallel.data_world_size,
            max_len=self.cfg.seq_len,
            encode=encode,
        )
        self.eval_records = test_records(self.task, self.cfg.eval_samples)
        if self.ctx.resume_from is not None:
            self._resume(self.ctx.resume_from)

    def restore(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])

    def train_step(self) -> dict:
        built, step = self.built, self.step + 1
        lr = built.set_lr(step, self.cfg.steps)
        batch = built.local_rows(next(self.batches))
        batch = {
            "input_ids": batch["input_ids"].to(self.device),
            "labels": batch["labels"].to(self.device),
            "mask": None,
        }
        targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total = max(1.0, built.global_sum([targets])[0])  # the step's targets on all data ranks
        weight = targets * built.parallel.data_world_size / total  # the mean over all of them, as one process

        def loss_fn(out, b):
            parts = loss_from_output(built.base_model, out, b["labels"], side=SideChannels())
            loss = parts.lm_loss if parts.mtp_loss is None else parts.lm_loss + parts.mtp_loss
            return loss * weight, {"lm_loss": parts.lm_loss.detach().float() * weight}

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        parts = built.mean_over_ranks(built.forward_backward([batch], loss_fn, aux_weight=1.0))
        update = built.update(parts["loss"], step)
        self.step = step
        self.in_a_row = 0 if update.finite else self.in_a_row + 1
        self.skipped += 0 if update.finite else 1
        self.tokens_seen += int(built.global_sum([int((batch["input_ids"] != self.tokenizer.pad_id).sum())])[0])
        row = {
            "kind": "train",
            "step": step,
            "lr": lr,
            "grad_norm": float(update.grad_norm),
            "skipped": not update.finite,
        }
        row.update({k: float(v) for k, v in parts.items()})
        if not update.finite:
            row["loss"] = float("nan")
        return row

    def evaluate(self, examples: int = 0) -> dict:
        """Greedy accuracy on the task's test problems (on every rank; the writer writes the row)."""
        if not self.eval_records:
            return {}
        with self.built.evaluation_model() as (model, parallel):
            result = None
            if model is not None:
                result = evaluate_task(
                    model, self.tokenizer, self.task, self.eval_records,
                    max_new_tokens=self.cfg.eval_max_new_tokens, examples=examples, parallel=parallel,
                )  # fmt: skip
        if parallel is not self.built.parallel:
            result = self.built.parallel.broadcast_object(result)
        result.pop("examples", None)
        row = {"kind": "eval", "step": self.step, **result}
        self.ctx.metrics.write(row)
        self.ctx.reporter.update(self.step, row)
        return row

    def save(self, reason: str) -> Path:
        return self.write_checkpoint(reason, {"data": self.batches.state_dict()}, tokenizer=self.tokenizer)

    def nonfinite_message(self, path: Path) -> str:
        return f"the loss was non-finite for {self.in_a_row} steps in a row; stopped ({path} holds the last good step)"

    def summary_metrics(self, train: list, timed: list) -> dict:
        losses = [r["loss"] for r in train[-max(1, len(train) // 10) :] if r.get("loss") == r.get("loss")]
        return {
            "final_loss": sum(losses) / len(losses) if losses else None,
            "last_loss": train[-1]["loss"] if train else None,
        }
'''

TEST = '''\
"""$comp against dsk's trainer contract suite (a tiny run completes, finite metrics, seeded, a summary)."""

from dsk.testing.contracts.model import check_config_round_trip, check_registration
from dsk.testing.contracts.run import check_trainer

from $pkg import plugin
from $pkg.config import $Config
from $pkg.trainer import $Class


def test_meets_the_trainer_contract():
    check_trainer($Class, $Config, name="$comp", table={"batch_size": 4, "seq_len": 32, "eval_samples": 2})


def test_config_round_trip():
    check_config_round_trip($Config, {"steps": 10, "batch_size": 4})


def test_registered_as_trainer():
    check_registration(plugin, "trainer", "$comp")
'''

RECIPE = {
    "trainer": 'type = "$comp"\nsteps = 6\nbatch_size = 8\nseq_len = 48\neval_samples = 8\neval_max_new_tokens = 32',
}

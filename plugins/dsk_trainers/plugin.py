"""Hook implementations of dsk_trainers: registers the ``pretrain`` and ``sft`` trainers (torch-free, lazy)."""

from dsk import hookimpl
from dsk_trainers.config import PretrainConfig, SFTConfig


@hookimpl
def register_trainers(register):
    """Register the next-token trainers (kind ``trainer``)."""
    register(
        "trainer",
        "pretrain",
        "dsk_trainers.lm:PretrainTrainer",
        config=PretrainConfig,
        summary="next-token pre-training (LM + MTP + aux losses), AdamW, warm-up + cosine, eval on the task",
    )
    register(
        "trainer",
        "sft",
        "dsk_trainers.lm:SFTTrainer",
        config=SFTConfig,
        summary="supervised fine-tuning: prompt tokens masked out of the loss, optional packing",
    )


@hookimpl
def validate_recipe(resolved):
    """Cross-section checks of the next-token trainers: a data source, and rows that fit the model."""
    from dsk.api import Problem

    trainer = resolved.get("trainer")
    if trainer is None or trainer.name not in ("pretrain", "sft"):
        return None
    problems = []
    model = resolved.get("model")
    seq_len = trainer.config.seq_len
    if model is not None and seq_len > model.max_seq_len:
        problems.append(
            Problem(
                "trainer.seq_len",
                f"trainer.seq_len = {seq_len} is larger than model.max_seq_len = {model.max_seq_len}",
                "lower trainer.seq_len or raise model.max_seq_len",
            )
        )
    if resolved.get("data") is None:
        problems.append(
            Problem("data", f"trainer '{trainer.name}' needs a [data] section", 'e.g. [data] type = "arithmetic"')
        )
    return problems

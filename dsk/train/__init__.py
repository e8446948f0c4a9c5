"""The training runtime shared by trainer plugins: run context, LR schedule, optimizer, checkpoints, metrics,
evaluation and the runner behind ``dsk train``.

Modules (import the one you need; only ``schedule``, ``metrics`` and ``context`` are torch-free):

- :mod:`dsk.train.context`: :class:`RunContext`, handed to ``trainer.run(ctx)``, and the run's exceptions;
- :mod:`dsk.train.schedule`: warm-up + cosine learning rate;
- :mod:`dsk.train.optim`: AdamW with decay / no-decay groups, optimizer state as safetensors + JSON;
- :mod:`dsk.train.checkpoint`: atomic checkpoints (``checkpoints/step-N/``), RNG state, loading without pickle;
- :mod:`dsk.train.metrics`: ``metrics.jsonl`` writer;
- :mod:`dsk.train.evaluate`: greedy accuracy and pass@k on a task's test split;
- :mod:`dsk.train.progress`: the rich progress bar and summary table;
- :mod:`dsk.train.loop`: the step loop, resume and summary the trainers share, and the skip-on-non-finite update;
- :mod:`dsk.train.runner`: run directory, ``[[stages]]`` chaining, resume, signals.
"""

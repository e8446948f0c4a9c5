"""dsk_precision: BF16 mixed-precision training (feature ``bf16``) and torch.compile per block (feature ``compile``).

See docs/precision.md. ``plugin.py`` and ``config.py`` are torch-free; ``bf16.py`` and ``compile.py`` hold the
implementations the registry names lazily.
"""

"""dsk_rl: DeepSeek-R1 post-training trainers: GRPO, rejection sampling + SFT, and distillation.

Importing this package imports neither torch nor the trainers; ``plugin.py`` registers them by name.
"""

__version__ = "0.1.0"

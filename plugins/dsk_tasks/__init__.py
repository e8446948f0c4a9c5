"""dsk_tasks: the built-in verifiable tasks (arithmetic, countdown, modular) and the tokenizer registrations.

Importing this package imports neither torch nor the task modules; ``plugin.py`` registers them by name.
"""

__version__ = "0.1.0"

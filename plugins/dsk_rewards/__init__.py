"""dsk_rewards: rule-based rewards for GRPO and rejection sampling (accuracy, format, language consistency, overlong).

Importing this package imports neither torch nor the reward functions; ``plugin.py`` registers them by name.
"""

__version__ = "0.1.0"

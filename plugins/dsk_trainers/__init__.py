"""Built-in trainers of dsk: pre-training and supervised fine-tuning."""

__version__ = "0.1.0"

"""The version of dsk (kept apart so that the plugin loader reads it without importing the package root)."""

__version__ = "0.1.0"

"""dsk: DeepSeek-V3 pre-training and R1 post-training techniques as plugins behind one command line.

Importing ``dsk`` never imports torch; ``load_pretrained`` imports it when called.
"""

from dsk._markers import hookimpl
from dsk._version import __version__

__all__ = ["__version__", "hookimpl", "load_pretrained"]


def load_pretrained(path, **kwargs):
    """Load an HF-format DeepSeek-V3 directory or a dsk checkpoint; returns a dsk model.

    See :func:`dsk.model.hf.load_pretrained` for the arguments.
    """
    from dsk.model.hf import load_pretrained as _load

    return _load(path, **kwargs)

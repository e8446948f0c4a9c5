"""Measurements of a training step that ``dsk profile`` and the benchmarks share (torch imported only by the modules).

* :mod:`dsk.profile.activations`: the bytes of the tensors a forward leaves alive for its backward.
"""

"""Measurements of a training step that ``dsk profile`` and the benchmarks share (torch imported only by the modules).

* :mod:`dsk.profile.activations`: the bytes of the tensors a forward leaves alive for its backward.
* :mod:`dsk.profile.attribution`: time by component from ``torch.profiler`` events (the profile parts the
  components open, the backward by sequence number), with the profiler's cost per op taken out.
* :mod:`dsk.profile.session`: one recipe's measurement in phases, watching a normal run through the run-time hooks.
* :mod:`dsk.profile.peak`: the machine's dense matmul peak (what model FLOP utilisation is measured against).
* :mod:`dsk.profile.plots`: the PNGs (matplotlib, the optional extra ``dsk[profile]``).
"""

"""Benchmarks: dsk against a peer on the same inputs, in the same run; `make bench` prints one table of ratios."""

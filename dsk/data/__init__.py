"""Data for dsk: tokenizers, JSONL sources and batching.

``dsk.data.tokenizers`` and ``dsk.data.jsonl`` never import torch; ``dsk.data.batching`` imports it inside the
functions that build tensors, so importing any module of this package stays cheap.
"""

"""dsk_fp8: FP8 (E4M3) training GEMMs with DeepSeek-V3's fine-grained scaling, as the feature ``fp8``.

``quant`` (tiles, scales, E4M3), ``gemm`` (the three GEMMs of a linear layer and their back ends, one autograd
Function for dense and grouped layers), ``linear`` (the LinearImpl each component gets), ``feature`` (the
feature: installs the impls, checks the shapes, reports the per-step GEMM counts). See docs/fp8.md.
"""

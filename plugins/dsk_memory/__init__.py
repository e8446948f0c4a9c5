"""dsk_memory: memory features of dsk: ``ema`` (a CPU EMA of the weights), ``offload`` (optimizer state in CPU
memory) and the optimizer ``adamw_bf16`` (AdamW with BF16 moments). See docs/memory.md."""

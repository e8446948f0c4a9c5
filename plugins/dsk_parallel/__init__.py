"""dsk_parallel: parallel strategies on torch.distributed: data parallelism (replicate, fsdp, zero1) and node-limited
expert parallelism (all-to-all dispatch and combine)."""

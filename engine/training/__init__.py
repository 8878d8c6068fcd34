"""The training side: run config, data, process group, parallelism (FSDP2, activation checkpointing), the SFT
loop, checkpoints with exact resume, metrics, and the built-in default job."""

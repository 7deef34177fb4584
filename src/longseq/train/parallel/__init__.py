"""Training on several processes (GPUs, or CPU processes with gloo) with PyTorch's own distributed stack.

env.py            who this process is (torchrun's RANK / WORLD_SIZE), the dp × sp grid, a few collectives
launch.py         `longseq train --nproc N`: re-launch under torchrun
data_parallel.py  DDP or FSDP2 (`fully_shard`, optional CPU offload) around the training step
ulysses.py        Ulysses sequence parallelism: all-to-all between sequence shards and head shards
dcp.py            DCP checkpoints (train/checkpoint.py's multi-process format), resumable on any number of processes
"""

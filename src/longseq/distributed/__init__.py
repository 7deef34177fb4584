"""Several processes (GPUs, or CPU processes with gloo) on PyTorch's own distributed stack.

env.py            who this process is (torchrun's RANK / WORLD_SIZE), the dp × sp grid, a few collectives
launch.py         `longseq train --nproc N`: re-launch under torchrun
data_parallel.py  DDP or FSDP2 (`fully_shard`, optional CPU offload) around the training step
ulysses.py        Ulysses sequence parallelism: all-to-all between sequence shards and head shards
checkpoint.py     DCP checkpoints, written atomically, resumable on any number of processes
tensor_parallel.py  inference weights split over N processes (Megatron column / row / vocabulary parallel)
tp_engine.py      the serving engine over tensor-parallel processes: rank 0 schedules, the others follow
"""

"""Training on several processes (GPUs, or CPU processes with gloo) with PyTorch's own distributed stack.

env.py             who this process is (torchrun's RANK / WORLD_SIZE), the pp × dp × cp × sp × tp grid, a few
                   collectives
launch.py          `longseq train --nproc N`: re-launch under torchrun
data_parallel.py   DDP or FSDP2 (`fully_shard`, optional CPU offload) around the training step
meta_loading.py    FSDP2 runs: the model built on meta, each rank reading only its shards of the safetensors
tensor_parallel.py Megatron tensor parallelism with sequence parallelism, through DTensor (LoRA layers too)
ulysses.py         Ulysses sequence parallelism: all-to-all between sequence shards and head shards
ring_attention.py  context parallelism: ring attention over load-balanced chunks (inside Ulysses: 2D)
experts.py         expert parallelism (--ep): experts split inside data parallelism, their gradients averaged over
                   the ranks that hold the same ones, their checkpoints as full stacks
pipeline.py        pipeline stages and schedules (GPipe, 1F1B, interleaved 1F1B) with torch.distributed.pipelining
dcp.py             DCP checkpoints (train/checkpoint.py's multi-process format), resumable on any number of
                   processes and layout
"""

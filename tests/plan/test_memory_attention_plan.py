"""The planner's memory-attention footprint (plan/memory_attention.py) against what MemoryKVCache allocates for a
tiny model fed a prompt and then decoding, on the GPU placement and the host one; and `longseq plan serve
--attention memory`."""

import json
from dataclasses import replace

import pytest
import torch

from longseq.cli import main
from longseq.config import AttentionConfig
from longseq.generation.memory_cache import MemoryKVCache
from longseq.plan.memory_attention import longest_context, plan_memory_attention
from longseq.plan.models import ModelSpec
from tiny_models import random_model

MEMORY = AttentionConfig("memory", sink_tokens=2, local_window=12, block_size=4, retrieved_blocks=2)


@pytest.mark.parametrize("placement", ["gpu", "host"])
@pytest.mark.parametrize("prompt, decoded", [(60, 20), (9, 3), (2100, 1)])
@torch.no_grad()
def test_footprint_follows_the_cache(placement, prompt, decoded):
    spec = replace(MEMORY, memory_placement=placement)
    model = random_model(0, max_seq_len=32, attention=spec)
    cache = MemoryKVCache(model.config, 1, "cpu", torch.float32, model.rotary.inv_freq)
    tokens = torch.randint(0, 97, (1, prompt + decoded), generator=torch.Generator().manual_seed(0))
    sizes = [min(cache.prefill_chunk(), prompt - a) for a in range(0, prompt, cache.prefill_chunk())] + [1] * decoded
    start = 0
    for size in sizes:
        model(tokens[:, start : start + size], positions=cache.prepare(size), cache=cache)
        cache.advance(size)
        start += size
    plan = plan_memory_attention(ModelSpec("tiny", model.config), spec, prompt + decoded, kv_bytes=4)
    layers = cache.layers

    def nbytes(tensors) -> int:  # tensors(layer): the tensors of one layer to count
        return sum(t.numel() * t.element_size() for layer in layers for t in tensors(layer))

    assert plan.blocks == layers[0].memory.num_blocks
    assert plan.gpu_parts["sinks"] == nbytes(lambda m: (m.sink_k, m.sink_v))
    assert plan.gpu_parts["representative keys"] == nbytes(lambda m: (m.memory.reprs,))
    blocks = nbytes(lambda m: (m.memory.k, m.memory.v))
    assert (plan.gpu_parts.get("memory blocks", 0), plan.host_bytes) == ((blocks, 0) if placement == "gpu"
                                                                          else (0, blocks))
    recent = nbytes(lambda m: (m.recent_k, m.recent_v))
    per_token = 2 * model.config.num_layers * model.config.num_kv_heads * model.config.head_dim * 4
    # an upper bound (as if the whole context were the prompt), within a few tokens of it and the decoded ones
    assert recent <= plan.gpu_parts["recent tokens"] <= recent + (8 + decoded) * per_token
    assert plan.keys_per_token <= prompt + decoded


def test_host_placement_keeps_the_gpu_footprint_small_at_long_contexts():
    attn = replace(MEMORY, block_size=16)  # a float32 representative key per 16 tokens of 16-bit K and V
    spec = ModelSpec("tiny", random_model(0, max_seq_len=32, attention=attn).config)
    gpu = plan_memory_attention(spec, attn, 1 << 20)
    host = plan_memory_attention(spec, replace(attn, memory_placement="host"), 1 << 20)
    assert host.host_bytes == gpu.gpu_parts["memory blocks"] > 10 * host.gpu_bytes
    assert gpu.keys_per_token == host.keys_per_token == 2 + 2 * 16 + 15 + 12  # sinks, retrieved, remainder, window
    budget = 100 * 2**20
    n = longest_context(spec, attn, budget)
    assert plan_memory_attention(spec, attn, n).gpu_bytes <= budget < plan_memory_attention(spec, attn,
                                                                                           n + 1).gpu_bytes


def test_plan_serve_reports_memory_attention(capsys):
    assert main(["plan", "serve", "--model", "llama-3-8b", "--gpu", "H200", "--context", "1048576", "--batch", "1",
                 "--attention", "memory", "--memory-placement", "host", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory_attention"]
    assert memory["placement"] == "host" and memory["host_bytes"] > 100 * 2**30 > memory["gpu_bytes"]
    assert memory["longest_context"] > 1 << 24
    assert main(["plan", "serve", "--model", "llama-3-8b", "--attention", "memory", "--window", "9000"]) == 2
    assert "must fit the model's context" in capsys.readouterr().err

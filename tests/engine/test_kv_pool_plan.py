"""`--kv-pool plan`: the engine sizes its KV pool from the planner (weights + the largest step's peak) instead of
measuring that step. The GPU path runs here on CPU with torch.cuda's memory queries replaced."""

import pytest
import torch

from longseq.cli import main
from longseq.config import EngineConfig, ModelConfig
from longseq.engine import model_runner
from longseq.engine.model_runner import ModelRunner, kv_bytes_per_block, planned_reserve
from longseq.errors import LongseqError
from longseq.models.llama import CausalLM

GIB = 2**30
TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2)


def _gpu_runner(monkeypatch, cfg: EngineConfig, dtype=torch.bfloat16, total=GIB, free=GIB // 2,
                reserved=GIB // 4) -> ModelRunner:
    """A runner that believes it is on a `total`-byte GPU with `free` bytes free, `reserved` of them its own."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    runner = object.__new__(ModelRunner)  # only the sizing: no KV pool, no graphs
    runner.model, runner.cfg = CausalLM(TINY).to(dtype), cfg
    runner.device, runner.block_size = torch.device("cuda"), cfg.kv_block_size
    return runner


def test_planned_block_count_equals_hand_computation(monkeypatch):
    cfg = EngineConfig(kv_pool="plan", gpu_memory_fraction=0.5, max_num_batched_tokens=2048, max_num_seqs=256)
    monkeypatch.setattr(ModelRunner, "_measured_peak", lambda self: pytest.fail("plan must not run a step"))
    runner = _gpu_runner(monkeypatch, cfg)
    # Weights, bf16: embedding + LM head 2·97·64; per layer q, o 64·64, k, v 64·32, gate, up, down 64·96, two norms;
    # the final norm.
    params = 2 * 97 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64) + 64
    assert params == sum(p.numel() for p in runner.model.parameters())
    # Largest step: 2048 tokens × bf16 (residual, normed copy: 2·64; gate, up, silu, product: 4·96), then logits of
    # 256 rows in bf16 and fp32 (plan/serving.py engine_activation_bytes).
    step = 2048 * 2 * (2 * 64 + 4 * 96) + 256 * 97 * (2 + 4)
    assert planned_reserve(runner.model, cfg) == 2 * params + step
    others = GIB - GIB // 2 - GIB // 4  # used, not by this process's allocator: other processes, CUDA context
    per_block = 2 * 2 * 16 * 2 * 16 * 2  # K and V · layers · block tokens · KV heads · head_dim · bf16
    assert kv_bytes_per_block(runner.model, 16) == per_block
    assert runner._blocks_from_memory() == (GIB * 0.5 - others - 2 * params - step) // per_block == 64951


def test_measure_stays_the_default_and_plan_is_honoured(monkeypatch):
    monkeypatch.setattr(ModelRunner, "_measured_peak", lambda self: 100 * 2**20)
    measured = _gpu_runner(monkeypatch, EngineConfig())
    assert measured.cfg.kv_pool == "measure"
    per_block = kv_bytes_per_block(measured.model, 16)
    assert measured._blocks_from_memory() == (GIB * 0.9 - GIB // 4 - 100 * 2**20) // per_block
    monkeypatch.setattr(model_runner, "planned_reserve", lambda model, cfg: 200 * 2**20)
    planned = _gpu_runner(monkeypatch, EngineConfig(kv_pool="plan"))
    assert planned._blocks_from_memory() == (GIB * 0.9 - GIB // 4 - 200 * 2**20) // per_block


def test_plan_on_cpu_keeps_kv_cache_gib():
    runner = ModelRunner(CausalLM(TINY).to(torch.bfloat16), EngineConfig(kv_pool="plan", kv_cache_gib=0.01))
    assert runner.num_blocks == int(0.01 * GIB) // kv_bytes_per_block(runner.model, 16)


def test_bad_values_are_one_line_errors(monkeypatch, capsys):
    with pytest.raises(LongseqError, match="kv_pool must be one of measure, plan, got 'guess'"):
        EngineConfig(kv_pool="guess")
    assert main(["serve", "--kv-pool", "guess"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "longseq: error: kv_pool must be one of measure, plan, got 'guess'"
    runner = _gpu_runner(monkeypatch, EngineConfig(kv_pool="plan"), dtype=torch.float64)
    with pytest.raises(LongseqError, match="no weight format for torch.float64") as e:
        runner._blocks_from_memory()
    assert "\n" not in str(e.value)
    # 0.25 of the GPU is what other processes already use: nothing is left beside the weights
    tight = _gpu_runner(monkeypatch, EngineConfig(kv_pool="plan", gpu_memory_fraction=0.25))
    with pytest.raises(LongseqError, match="no GPU memory left for the KV cache"):
        tight._blocks_from_memory()

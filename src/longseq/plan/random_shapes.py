"""Model shapes with random weights that the benchmarks measure beside the presets (benchmarks/plan_validation.py,
benchmarks/multi_gpu.py), so that their results can be planned again (tests/plan/test_validation_h100.py)."""

from __future__ import annotations

from longseq.config import ModelConfig
from longseq.plan.models import ModelSpec, get_model

RANDOM_SHAPES = {
    "random-d1024": dict(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_layers=8, num_heads=8,
                         num_kv_heads=2, max_seq_len=32768),
    "random-tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                        num_kv_heads=2, max_seq_len=1024),
}


def spec_for(name: str) -> ModelSpec:
    """A benchmark row's model: one of RANDOM_SHAPES, else a preset (or config) as `get_model` finds it."""
    if name in RANDOM_SHAPES:
        return ModelSpec(name, ModelConfig(**RANDOM_SHAPES[name]))
    return get_model(name)

"""Typed configuration, torch-free: the one source of truth for the model and for every command's options.

model.py      the model schema: ModelConfig, RopeConfig, AttentionConfig
hf.py         HF `config.json` <-> ModelConfig
gguf.py       GGUF metadata -> ModelConfig
overrides.py  ModelOverrides: attention variant and RoPE scaling applied to a loaded model
train.py      TrainConfig: `longseq train` (holds the model overrides)
engine.py     EngineConfig: `longseq serve` and the offline LLM
policy.py     accepted option values and the rules derived from them at run time
flags.py      dataclass fields <-> CLI flags and YAML keys
"""

from longseq.config.engine import EngineConfig
from longseq.config.model import AttentionConfig, ModelConfig, RopeConfig
from longseq.config.overrides import ModelOverrides
from longseq.config.train import TrainConfig

__all__ = ["AttentionConfig", "EngineConfig", "ModelConfig", "ModelOverrides", "RopeConfig", "TrainConfig"]

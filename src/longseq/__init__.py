"""longseq: plan, train, serve and evaluate long-context LLMs on the GPUs you have."""

from longseq.config import ModelConfig, RopeConfig
from longseq.errors import LongseqError

__version__ = "0.1.0"

__all__ = ["LongseqError", "ModelConfig", "RopeConfig", "__version__"]

"""The serving engine: paged KV cache, continuous batching, prefix caching."""

from longseq.engine.llm import LLM
from longseq.engine.llm_engine import LLMEngine
from longseq.engine.outputs import RequestOutput, TokenLogprob
from longseq.generation.sampling import SamplingParams

__all__ = ["LLM", "LLMEngine", "RequestOutput", "SamplingParams", "TokenLogprob"]

from longseq.generation.generate import GenerationResult, generate, generate_tokens, render_prompt
from longseq.generation.kv_cache import KVCache
from longseq.generation.sampling import SamplingParams, sample

__all__ = ["GenerationResult", "KVCache", "SamplingParams", "generate", "generate_tokens", "render_prompt", "sample"]

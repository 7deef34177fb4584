"""Generation speed of one sequence: time to first token (prefill), per-token decode latency, tokens/s."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from longseq.config.model import UNBOUNDED_VARIANTS
from longseq.errors import LongseqError
from longseq.eval.passkey import FILLER
from longseq.generation import SamplingParams, generate_tokens


@dataclass
class ThroughputResult:
    prompt_tokens: int
    new_tokens: int
    runs: int
    time_to_first_token_s: float  # mean over runs: prefill + the first sampled token
    per_token_ms: float  # mean decode latency per generated token after the first
    per_token_p50_ms: float
    per_token_p90_ms: float
    decode_tokens_per_s: float  # (new_tokens - 1) / decode time
    total_tokens_per_s: float  # (prompt + new tokens) / wall time

    def to_json(self) -> dict[str, Any]:
        return {"task": "throughput", **asdict(self)}


def synthetic_prompt(tokenizer: Any, num_tokens: int) -> list[int]:
    """Exactly `num_tokens` ids of filler text (the content does not change the speed of a dense model)."""
    unit = list(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    return (unit * (num_tokens // len(unit) + 1))[:num_tokens]


def run_throughput(lm: Any, prompt_tokens: int = 512, new_tokens: int = 128, runs: int = 3, warmup: int = 1
                   ) -> ThroughputResult:
    if prompt_tokens <= 0 or new_tokens < 2 or runs <= 0 or warmup < 0:
        raise LongseqError("throughput needs prompt tokens > 0, new tokens >= 2, runs > 0, warmup >= 0")
    if lm.config.attention.variant not in UNBOUNDED_VARIANTS and prompt_tokens + new_tokens > lm.config.max_seq_len:
        raise LongseqError(f"{prompt_tokens} + {new_tokens} tokens exceed the model's context "
                           f"({lm.config.max_seq_len})")
    ids = synthetic_prompt(lm.tokenizer, prompt_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    ttfts, gaps, walls, decode_rates = [], [], [], []
    for run in range(warmup + runs):
        sync()
        start = time.perf_counter()
        stamps = []
        for _ in generate_tokens(lm.model, ids, params):  # each yield follows a host sync on the sampled token
            stamps.append(time.perf_counter())
        if run < warmup:
            continue
        ttfts.append(stamps[0] - start)
        gaps.extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
        walls.append(stamps[-1] - start)
        decode_rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    q = statistics.quantiles(gaps, n=10) if len(gaps) > 1 else [gaps[0]] * 9
    return ThroughputResult(
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs,
        time_to_first_token_s=statistics.mean(ttfts), per_token_ms=1e3 * statistics.mean(gaps),
        per_token_p50_ms=1e3 * statistics.median(gaps), per_token_p90_ms=1e3 * q[8],
        decode_tokens_per_s=statistics.mean(decode_rates),
        total_tokens_per_s=(prompt_tokens + new_tokens) / statistics.mean(walls),
    )

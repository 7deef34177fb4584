"""What the engine hands back per request: a snapshot after every step that produced tokens."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, text, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str  # the whole output so far (stop strings cut off)
    token_ids: list[int]  # the whole output so far
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", "abort", "error"
    logprobs: list[TokenLogprob] | None = None  # one per token in token_ids, when requested
    new_text: str = ""  # what this snapshot added to text (for streaming)
    metrics: dict[str, float] = field(default_factory=dict)  # arrival, first_token, finished (time.monotonic())
    error: Exception | None = None  # with finish_reason "error": what failed this request (engine/isolation.py)

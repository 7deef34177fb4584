"""A step whose work is queued on the device and whose sampled tokens the host has not read yet.

The engine launches a decode step, then launches the next one from the first one's samples still on the device,
and only then waits for the first one's tokens: the host's output processing and scheduling overlap the GPU's next
step instead of leaving it idle (async scheduling, as in vLLM v1 and SGLang's overlap scheduler).
"""

from __future__ import annotations

import torch

from longseq.engine.sequence import Sequence, Status


class InflightStep:
    def __init__(self, scheduled: list[tuple[Sequence, int]], to_sample: list[Sequence],
                 tokens: torch.Tensor | None, logprobs: torch.Tensor | None):
        self.scheduled, self.to_sample = scheduled, to_sample
        self.tokens, self.logprobs = tokens, logprobs  # (M,) on the device; (M, V) or None
        self._host, self._ready = tokens, None
        if tokens is not None and tokens.is_cuda:
            # Into pinned memory without waiting: the host reads it once the event says the copy is done.
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def token_ids(self) -> list[int]:
        """The sampled tokens, one per sequence in `to_sample` (blocks until the device has them)."""
        if self._host is None:
            return []
        if self._ready is not None:
            self._ready.synchronize()
        return self._host.tolist()

    @property
    def stale(self) -> bool:
        """Every sequence of the step has finished since it was launched (stopped or aborted): nothing to read."""
        return all(seq.status == Status.FINISHED for seq, _ in self.scheduled)

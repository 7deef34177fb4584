"""A step whose work is queued on the device and whose sampled tokens the host has not read yet.

The engine launches a decode step, then launches the next one from the first one's samples still on the device,
and only then waits for the first one's tokens: the host's output processing and scheduling overlap the GPU's next
step instead of leaving it idle (async scheduling, as in vLLM v1 and SGLang's overlap scheduler).
"""

from __future__ import annotations

import torch

from longseq.engine.sampler import SamplerOutput
from longseq.engine.sequence import Sequence, Status

# One row's logprobs on the host: the sampled token's, and the top (token id, logprob) pairs, best first.
RowLogprobs = tuple[float, list[tuple[int, float]]]


class InflightStep:
    def __init__(self, scheduled: list[tuple[Sequence, int]], to_sample: list[Sequence],
                 sampled: SamplerOutput | None):
        self.scheduled, self.to_sample = scheduled, to_sample
        self.tokens = sampled.tokens if sampled is not None else None  # (M,) on the device
        self._logprobs = sampled.logprobs if sampled is not None else None
        device = [] if self.tokens is None else [self.tokens]
        if self._logprobs is not None:
            lp = self._logprobs
            device += [lp.chosen, lp.top_values, lp.top_ids]
        self._host, self._ready = device, None
        if self.tokens is not None and self.tokens.is_cuda:
            # Into pinned memory without waiting, the logprobs with the tokens: the host reads them once the
            # event says the copies are done.
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in device]
            for host, t in zip(self._host, device, strict=True):
                host.copy_(t, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> tuple[list[int], list[RowLogprobs | None] | None]:
        """The sampled tokens, one per sequence in `to_sample`, and where any asked, each one's logprobs (None for
        the rows that did not ask). Blocks until the device has them."""
        if self.tokens is None:
            return [], None
        if self._ready is not None:
            self._ready.synchronize()
        tokens = self._host[0].tolist()
        if self._logprobs is None:
            return tokens, None
        chosen, values, ids = (t.tolist() for t in self._host[1:])
        rows: list[RowLogprobs | None] = [None] * len(tokens)
        for r, row in enumerate(self._logprobs.rows):
            rows[row] = (chosen[r], list(zip(ids[r], values[r], strict=True)))
        return tokens, rows

    @property
    def stale(self) -> bool:
        """Every sequence of the step has finished since it was launched (stopped or aborted): nothing to read."""
        return all(seq.status == Status.FINISHED for seq, _ in self.scheduled)

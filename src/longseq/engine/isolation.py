"""Fault isolation: when a step raises, find the request that made it fail and fail that request alone.

A step runs every scheduled sequence as one batch, so its exception does not say which row caused it. The engine
then resets every running sequence (its KV is recomputed later, as after a preemption, which changes no token: the
sampling noise is keyed by request and output position) and runs the suspects again in halves, each half alone
(bisection). A half whose every member samples a token is cleared; a half that fails again is split further; a
sequence that fails alone is the culprit and is retired with the error. Everyone else, new requests included, waits
meanwhile and then goes on. A failure that does not recur (out of memory in the full batch) clears everyone; one
that fails every batch fails each request alone, about 2N steps for N suspects.

Requests are validated before they reach the engine, so this is the last line, not the first: a bug in one row's
path must not fail every request in flight.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from longseq.engine.outputs import RequestOutput
from longseq.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from longseq.engine.llm_engine import LLMEngine


class Isolation:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.trials: deque[list[Sequence]] = deque()  # suspect groups still to run alone, next first
        self.trial: list[Sequence] = []  # the group running alone now; the scheduler holds nobody else
        self.marks: dict[int, int] = {}  # seq_id -> its length when its trial began
        self.held: list[Sequence] = []  # everyone else (cleared, new, never suspected): out of the scheduler

    @property
    def active(self) -> bool:
        """A failure is being isolated: steps run one trial group alone, and nothing is launched ahead."""
        return bool(self.trial or self.trials or self.held)

    @property
    def num_held(self) -> int:
        return len(self.held) + sum(map(len, self.trials))

    def hold(self, seq: Sequence) -> None:
        """A new request while active: it joins the others once the trials are over."""
        self.held.append(seq)

    def advance(self) -> None:
        """Before each step: end a trial whose members have all sampled (or finished), start the next one, or
        hand everyone back to the scheduler, in arrival order, once none is left."""
        if not self.active:
            return
        if self.trial:
            if any(s.status != Status.FINISHED and len(s) <= self.marks[s.seq_id] for s in self.trial):
                return
            for s in self.trial:  # cleared; they wait for the other trials with their KV recomputed later
                if s.status != Status.FINISHED:
                    self._reset(s)
                    self.held.append(s)
            self.trial = []
        while self.trials:
            group = [s for s in self.trials.popleft() if s.status != Status.FINISHED]
            if group:
                self.trial = group
                self.marks = {s.seq_id: len(s) for s in group}
                self.engine.scheduler.waiting.extend(group)
                return
        waiting = sorted((s for s in self.held if s.status != Status.FINISHED), key=lambda s: s.seq_id)
        self.held = []
        self.engine.scheduler.waiting.extend(waiting)

    def failed(self, error: Exception) -> list[RequestOutput]:
        """The step raised: reset the suspects and queue them for trials; a suspect that failed alone is retired
        with the error (its output is returned). Re-raises where no sequence ran, as nothing can be blamed."""
        engine, scheduler = self.engine, self.engine.scheduler
        if self.trial:
            suspects = [s for s in self.trial if s.status != Status.FINISHED]
        else:
            suspects = list(scheduler.running)
        if not suspects:
            raise error
        engine.inflight = None  # its tokens are dropped: the reset sequences sample them again
        if not self.trial:  # the first failure: everyone not in the step waits until the suspects are cleared
            self.held.extend(scheduler.waiting)
            scheduler.waiting.clear()
        for s in suspects:
            self._reset(s)
        self.trial = []
        engine.sampler.reset()
        if len(suspects) == 1:
            return [engine.fail(suspects[0], error)]
        half = len(suspects) // 2
        self.trials.extendleft([suspects[half:], suspects[:half]])  # depth first: the culprit is found sooner
        return []

    def _reset(self, seq: Sequence) -> None:
        # As a preemption, out of the scheduler's queues; its penalty counts may hold a token of the failed step,
        # so they are dropped too and rebuilt from its tokens when it runs again.
        scheduler = self.engine.scheduler
        if seq in scheduler.running:
            scheduler.running.remove(seq)
        elif seq in scheduler.waiting:
            scheduler.waiting.remove(seq)
        scheduler.free(seq)
        self.engine.sampler.release(seq)
        seq.status = Status.WAITING

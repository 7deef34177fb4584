"""Continuous batching with a per-step token budget, chunked prefill and preemption by recompute (FCFS)."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from longseq.engine.block_manager import BlockManager
from longseq.engine.sequence import Sequence, Status

if TYPE_CHECKING:
    from longseq.engine.lora import LoRAPool


class Scheduler:
    """Each step: every running sequence first (one decode token, or the next chunk of its prompt), then new
    sequences in arrival order while the token budget, the sequence cap and free KV blocks allow.

    Decodes go first so a long prompt never stalls running generations: it is prefilled a budget-sized chunk per
    step (Sarathi, Agrawal et al. 2023). When blocks run out, the newest running sequence is preempted: its blocks
    are freed and it waits at the head of the queue to be recomputed.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 loras: LoRAPool | None = None, chunk_align: int = 1):
        """`loras`: the adapter slots (LoRA serving); a sequence with an adapter runs only while it pins a slot, and
        one whose adapter finds no slot (every slot pinned) lets those behind it go first. `chunk_align`: a prompt
        chunk that does not finish its prompt ends on a multiple of this many positions, where the budget reaches
        one (memory attention's query blocks)."""
        self.chunk_align = chunk_align
        self.blocks = block_manager
        self.loras = loras
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preempted = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of its tokens to compute this step), at most max_num_batched_tokens in all."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status != Status.RUNNING:  # preempted earlier in this loop
                continue
            n = self._chunk(seq, budget)
            if n <= 0:
                continue
            while not self.blocks.ensure(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status == Status.RUNNING:
                scheduled.append((seq, n))
                budget -= n
        no_slot: list[Sequence] = []  # waiting sequences whose adapter has no slot now: they keep their places
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._acquire_lora(seq):
                no_slot.append(self.waiting.popleft())
                continue
            seq.num_computed_tokens = self.blocks.allocate_prefix(seq)
            n = self._chunk(seq, budget)
            if n == 0 or not self.blocks.ensure(seq, seq.num_computed_tokens + n):
                # FCFS: nobody overtakes the head of the queue. It gives back its prefix hits: a waiting sequence
                # holding blocks could starve a preempted one queued ahead of it, and the engine would stall.
                self.free(seq)
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(no_slot))
        return scheduled

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """The tokens of seq to compute within `budget`: all it has left, or a chunk ending on a multiple of
        chunk_align; 0 (wait for the next step) where the budget left reaches none, unless no budget ever would."""
        left = len(seq) - seq.num_computed_tokens
        n = min(left, budget)
        if n < left and self.chunk_align > 1 and self.max_num_batched_tokens >= self.chunk_align:
            end = (seq.num_computed_tokens + n) // self.chunk_align * self.chunk_align
            n = max(0, end - seq.num_computed_tokens)
        return n

    def _acquire_lora(self, seq: Sequence) -> bool:
        """Pin a slot holding seq's adapter (loading it if need be); False where every slot is pinned."""
        if seq.lora is None or seq.lora_slot >= 0:
            return True
        if not self.loras.can_acquire(seq.lora):
            return False
        seq.lora_slot = self.loras.acquire(seq.lora)
        return True

    def free(self, seq: Sequence) -> None:
        """Give back what a sequence holds: its KV blocks and its adapter's slot."""
        self.blocks.free_seq(seq)
        if seq.lora_slot >= 0:
            self.loras.release(seq.lora_slot)
            seq.lora_slot = -1

    def schedule_ahead(self, scheduled: list[tuple[Sequence, int]],
                       sampled: list[Sequence]) -> tuple[list[tuple[Sequence, int]], list[int]] | None:
        """The next decode step, told before `sampled` (the sequences of the step `scheduled` that sample) have
        their new tokens: each decodes one more, but those whose new token is their last by length. Returns that
        batch, with its blocks allocated now, and the rows of `sampled` it decodes. schedule() would decode the
        same sequences first; a prompt it would admit after them into a slot freed by a finished sequence waits
        for the step after. None where the step is not knowable yet: it may admit or preempt."""
        running = self.running
        if (len(sampled) != len(scheduled) or len(sampled) != len(running)
                or any(s.status != Status.RUNNING for s in sampled)):
            return None  # some sequence is mid-prompt, waits outside this batch, or was aborted
        if self.waiting and len(running) < self.max_num_seqs:
            return None  # the next step admits a waiting prompt
        # A sequence whose token in flight is its last by length stays out: it finishes before the next step.
        rows = [i for i, s in enumerate(sampled) if len(s.output_ids) + 1 < s.max_output_tokens]
        ahead = [sampled[i] for i in rows]
        if not ahead or len(ahead) > self.max_num_batched_tokens:
            return None
        if sum(self.blocks.blocks_needed(s, s.num_computed_tokens + 1) for s in ahead) > self.blocks.num_free_blocks:
            return None  # schedule() would preempt
        for s in ahead:
            self.blocks.ensure(s, s.num_computed_tokens + 1)
        return [(s, 1) for s in ahead], rows

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preempted += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (done or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

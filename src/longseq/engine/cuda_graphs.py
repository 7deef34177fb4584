"""CUDA graphs for the decode step: one captured graph per (batch bucket, key-length bucket), replayed with the
step's inputs copied into static buffers. A decode step of an 8B model is ~1,200 kernel launches whose host cost
exceeds their GPU time; a replay is one launch (the idea of nano-vllm's and vLLM's decode graphs)."""

from __future__ import annotations

import torch

from longseq.attention.paged import PagedBatch, decode_slots

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
MIN_KEYS = 64  # key-length buckets are powers of two from here


def bucket(n: int, sizes) -> int | None:
    return next((s for s in sizes if s >= n), None)


def key_bucket(n: int) -> int:
    return max(MIN_KEYS, 1 << (n - 1).bit_length())


class DecodeGraph:
    """Static inputs for `batch_size` sequences attending over at most `num_keys` keys, and the captured graph."""

    def __init__(self, runner, batch_size: int, num_keys: int, pool):
        dev = runner.device
        self.runner, self.B, self.T = runner, batch_size, num_keys
        self.ids = torch.zeros(1, batch_size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, batch_size, dtype=torch.long, device=dev)
        self.batch = PagedBatch(
            slot_mapping=torch.zeros(batch_size, dtype=torch.long, device=dev), query_lens=[1] * batch_size,
            context_lens=[1] * batch_size, block_tables=torch.zeros(batch_size, 1, dtype=torch.long),
            block_size=runner.block_size, device=dev,
            decode_slots=torch.zeros(batch_size, num_keys, dtype=torch.long, device=dev),
            decode_mask=torch.zeros(batch_size, num_keys, dtype=torch.bool, device=dev),
        )
        self._fill_padding(0)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits, autotuning
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._forward()

    def _forward(self) -> torch.Tensor:
        runner = self.runner
        runner.cache.batch = self.batch
        hidden = runner.model.hidden(self.ids, self.positions, cache=runner.cache)  # (1, B, d)
        return runner.model.lm_head(hidden[0])  # (B, V)

    def _fill_padding(self, start: int) -> None:
        # Rows past the real batch write and read only the scratch slot, which no sequence owns.
        scratch = self.runner.scratch_slot
        self.ids[0, start:] = 0
        self.positions[0, start:] = 0
        self.batch.slot_mapping[start:] = scratch
        self.batch.decode_slots[start:] = scratch
        self.batch.decode_mask[start:] = False
        self.batch.decode_mask[start:, 0] = True

    def replay(self, ids: list[int], positions: list[int], tables: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        n = len(ids)
        slots, mask, slot_mapping = decode_slots(tables, ctx, self.T, self.runner.block_size)
        dev = self.runner.device
        self.ids[0, :n] = torch.tensor(ids).to(dev, non_blocking=True)
        self.positions[0, :n] = torch.tensor(positions).to(dev, non_blocking=True)
        self.batch.slot_mapping[:n] = slot_mapping.to(dev, non_blocking=True)
        self.batch.decode_slots[:n] = slots.to(dev, non_blocking=True)
        self.batch.decode_mask[:n] = mask.to(dev, non_blocking=True)
        self._fill_padding(n)
        self.graph.replay()
        return self.logits[:n]

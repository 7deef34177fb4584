"""CUDA graphs for the decode step: one captured graph per (batch bucket, key-length bucket), replayed with the
step's inputs copied into static buffers. A decode step of an 8B model is ~1,200 kernel launches whose host cost
exceeds their GPU time; a replay is one launch (the idea of nano-vllm's and vLLM's decode graphs)."""

from __future__ import annotations

import torch

from longseq.attention.paged import PagedBatch, decode_splits, last_slots, pad_tables
from longseq.models.lora_batched import LoRABatch

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
MIN_KEYS = 64  # key-length buckets are powers of two from here


def bucket(n: int, sizes) -> int | None:
    return next((s for s in sizes if s >= n), None)


def key_bucket(n: int) -> int:
    return max(MIN_KEYS, 1 << (n - 1).bit_length())


class DecodeGraph:
    """Static inputs for `batch_size` sequences attending over at most `num_keys` keys, and the captured graph of
    the model up to its final hidden states. `splits`: the decode kernel's key splits (None: as decode_splits
    picks them for this shape)."""

    def __init__(self, runner, batch_size: int, num_keys: int, pool, splits: int | None = None, lora: bool = False):
        """`lora`: the graph adds each row's adapter delta, by the slots in `lora_slots` (-1: the base)."""
        dev = runner.device
        self.runner, self.B, self.T = runner, batch_size, num_keys
        self.width = -(-num_keys // runner.block_size)  # block-table columns
        self.ids = torch.zeros(1, batch_size, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, batch_size, dtype=torch.long, device=dev)
        self.lora_slots = torch.full((batch_size,), -1, dtype=torch.long, device=dev) if lora else None
        self.batch = PagedBatch(
            slot_mapping=torch.zeros(batch_size, dtype=torch.long, device=dev), query_lens=[1] * batch_size,
            context_lens=[1] * batch_size, block_tables=torch.zeros(batch_size, 1, dtype=torch.long),
            block_size=runner.block_size, device=dev,
            decode_tables=torch.zeros(batch_size, self.width, dtype=torch.int32, device=dev),
            decode_lens=torch.ones(batch_size, dtype=torch.int32, device=dev),
            splits=splits or decode_splits(batch_size, runner.cache.num_kv_heads, num_keys, dev),
        )
        self._fill_padding(0)
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # warm-up outside the graph: lazy inits, Triton compilation, autotuning
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.hidden = self._forward()

    def _forward(self) -> torch.Tensor:
        runner = self.runner
        runner.cache.batch = self.batch
        if self.lora_slots is None:
            return runner.model.hidden(self.ids, self.positions, cache=runner.cache)[0]  # (B, d)
        # The rows' grouping by slot is built inside the graph, from the persistent slot tensor replays fill.
        runner.lora.state.batch = LoRABatch.build(self.lora_slots, runner.lora.num_slots)
        try:
            return runner.model.hidden(self.ids, self.positions, cache=runner.cache)[0]
        finally:
            runner.lora.state.batch = None

    def _fill_padding(self, start: int) -> None:
        # Rows past the real batch write and read only the scratch slot (block num_blocks), which no sequence owns.
        scratch = self.runner.scratch_slot
        self.ids[0, start:] = 0
        self.positions[0, start:] = 0
        self.batch.slot_mapping[start:] = scratch
        self.batch.decode_tables[start:] = scratch // self.runner.block_size
        self.batch.decode_lens[start:] = 1
        if self.lora_slots is not None:
            self.lora_slots[start:] = -1

    def replay(self, ids: list[int], positions: list[int], block_tables: list[list[int]], context_lens: list[int],
               device_ids: torch.Tensor | None = None, lora_slots: list[int] | None = None) -> torch.Tensor:
        """`device_ids` (n,), if given, replace `ids`: the previous step's samples, still on the GPU. `lora_slots`:
        each row's adapter slot (a graph captured with adapters)."""
        n, dev = len(ids), self.runner.device
        # Only the batch's own widest table is copied: the graph's table is max_model_len / block_size wide, and
        # columns past a row's context (stale from earlier steps) are never read, by the kernel or the gather path.
        width = min(self.width, max(len(t) for t in block_tables))
        tables, ctx = pad_tables(block_tables, width), torch.tensor(context_lens)
        # One host tensor, one copy: four small copies cost more host time than the rest of the replay. Pinned, so
        # the copy is queued behind the step in flight instead of waiting for it (pageable memory may sync).
        lora = [torch.tensor(lora_slots)] if self.lora_slots is not None else []
        host = torch.cat([torch.tensor(ids), torch.tensor(positions), last_slots(tables, ctx, self.runner.block_size),
                          ctx, *lora, tables.flatten()]).pin_memory().to(dev, non_blocking=True)
        self.ids[0, :n] = host[:n] if device_ids is None else device_ids
        self.positions[0, :n] = host[n : 2 * n]
        self.batch.slot_mapping[:n] = host[2 * n : 3 * n]
        self.batch.decode_lens[:n] = host[3 * n : 4 * n]
        if lora:
            self.lora_slots[:n] = host[4 * n : 5 * n]
        self.batch.decode_tables[:n, :width] = host[(4 + len(lora)) * n :].view(n, width)
        self._fill_padding(n)
        self.graph.replay()
        return self.hidden[:n]

"""Runs the shared model on the scheduler's flat batches over a paged KV pool sized from measured memory."""

from __future__ import annotations

import torch

from longseq.attention.paged import PagedBatch, PagedKVCache
from longseq.config import EngineConfig
from longseq.engine.cuda_graphs import BATCH_BUCKETS, DecodeGraph, bucket, key_bucket
from longseq.engine.sequence import Sequence
from longseq.errors import LongseqError
from longseq.models.llama import CausalLM


def kv_bytes_per_block(model: CausalLM, block_size: int) -> int:
    # K and V, every layer: 2 * L * block_size * H_kv * head_dim * bytes (GQA/MQA shrink H_kv).
    cfg, dtype = model.config, model.lm_head.weight.dtype
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: CausalLM, cfg: EngineConfig):
        self.model, self.cfg = model, cfg
        self.device, self.dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        self.block_size = cfg.kv_block_size
        self.num_blocks = cfg.num_kv_blocks or self._blocks_from_memory()
        mc = model.config
        # One block more than the block manager hands out: the scratch slot that padded graph rows write to.
        self.scratch_slot = self.num_blocks * self.block_size
        self.cache = PagedKVCache(mc.num_layers, (self.num_blocks + 1) * self.block_size, mc.num_kv_heads,
                                  mc.head_dim, self.dtype, self.device)
        # Dynamic NTK reads the longest position on the host every step, which a graph cannot do.
        self.use_graphs = cfg.cuda_graphs and self.device.type == "cuda" and mc.rope.type != "dynamic"
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None

    def _blocks_from_memory(self) -> int:
        per_block = kv_bytes_per_block(self.model, self.block_size)
        if self.device.type != "cuda":
            return max(1, int(self.cfg.kv_cache_gib * 2**30) // per_block)
        # Measure, do not guess: run the largest step the scheduler can issue, then give the KV pool what is left
        # of gpu_memory_fraction after weights and that step's peak activations.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.zeros(1, self.cfg.max_num_batched_tokens, dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model.lm_head(self.model.hidden(ids)[:, -self.cfg.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        others = total - free - torch.cuda.memory_reserved(self.device)  # other processes on this GPU
        budget = total * self.cfg.gpu_memory_fraction - others - peak
        if budget < per_block:
            raise LongseqError(
                f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB): raise --gpu-memory-fraction "
                "or lower --max-num-batched-tokens"
            )
        return int(budget // per_block)

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the scheduled tokens; return float32 logits (M, V) for the M sequences whose last token was
        computed (they sample next), with those sequences."""
        if self.use_graphs and all(n == 1 and s.num_computed_tokens + 1 == len(s) for s, n in scheduled):
            graph = self._graph_run(scheduled)
            if graph is not None:
                return graph
        ids, positions, to_sample, last = [], [], [], []
        for seq, n in scheduled:
            start = seq.num_computed_tokens
            ids.extend(seq.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if start + n == len(seq):
                to_sample.append(seq)
                last.append(len(ids) - 1)
        self.cache.batch = PagedBatch.build(
            [s.block_table for s, _ in scheduled], [n for _, n in scheduled],
            [s.num_computed_tokens + n for s, n in scheduled], self.block_size, self.device,
        )
        ids_t = torch.tensor([ids], device=self.device)  # (1, N)
        pos_t = torch.tensor([positions], device=self.device)
        hidden = self.model.hidden(ids_t, pos_t, cache=self.cache)  # (1, N, d)
        if not to_sample:
            return hidden.new_zeros(0, self.model.config.vocab_size, dtype=torch.float32), []
        logits = self.model.lm_head(hidden[0, torch.tensor(last, device=self.device)])  # (M, V)
        return logits.float(), to_sample

    def _graph_run(self, scheduled: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, list[Sequence]] | None:
        seqs = [s for s, _ in scheduled]
        size = bucket(len(seqs), BATCH_BUCKETS)
        longest = max(s.num_computed_tokens + 1 for s in seqs)
        if size is None:
            return None
        keys = key_bucket(longest)
        graph = self.graphs.get((size, keys))
        if graph is None:
            graph = self.graphs[(size, keys)] = DecodeGraph(self, size, keys, self.graph_pool)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int64)
        ctx = torch.tensor([s.num_computed_tokens + 1 for s in seqs])
        logits = graph.replay([s.token_ids[-1] for s in seqs], [s.num_computed_tokens for s in seqs], tables, ctx)
        return logits.float(), seqs

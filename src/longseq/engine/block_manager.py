"""Fixed-size KV blocks: a free list, reference counts, and prefix caching by chained block hash (PagedAttention,
Kwon et al. 2023, arXiv 2309.06180; prefix reuse as in vLLM's automatic prefix caching)."""

from __future__ import annotations

from collections import OrderedDict

from longseq.engine.sequence import Sequence


def block_hash(prefix_hash: int, tokens: list[int]) -> int:
    # Chained: a block's hash covers every token before it, so equal hashes mean equal prefixes (token ids are
    # also compared on a hit, in case of a 64-bit collision). Tuples of ints hash the same in every process.
    return hash((prefix_hash, tuple(tokens)))


class BlockManager:
    """Invariants: a block is in `free` iff its ref count is 0; `cached` maps the hash of a block whose K/V is fully
    computed to that block (free or in use) until the block is reallocated for other tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, prefix_align: int = 1):
        """`prefix_align`: a prefix hit is a whole number of this many blocks (memory attention's query blocks)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_align = prefix_align
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self.cached: dict[int, int] = {}  # hash -> block id
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # block id -> tokens, for cached blocks
        self.block_of_hash: dict[int, int] = {}  # block id -> its hash in `cached`

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_of_hash.pop(block, None)  # its old contents are about to be overwritten
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
            self.block_tokens.pop(block, None)
        self.ref_counts[block] = 1
        return block

    def allocate_prefix(self, seq: Sequence) -> int:
        """Reuse cached blocks for the longest cached prefix of a new sequence's prompt; returns the tokens reused.

        The block holding the last prompt token is never reused: its logits are needed, so it is recomputed.
        """
        assert not seq.block_table
        if not self.enable_prefix_caching:
            return 0
        bs, h = self.block_size, seq.cache_salt  # chains of different adapters never meet
        hits: list[tuple[int, int]] = []  # (block, hash) of the cached prefix
        for i in range((seq.num_prompt_tokens - 1) // bs):
            tokens = seq.prompt_ids[i * bs : (i + 1) * bs]
            h = block_hash(h, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens.get(block) != tuple(tokens):
                break
            hits.append((block, h))
        for block, h in hits[: len(hits) // self.prefix_align * self.prefix_align]:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        seq.num_cached_tokens = len(seq.block_table) * bs
        return seq.num_cached_tokens

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` blocks for `num_tokens` tokens in all; False (and nothing allocated) if too few are free."""
        need = self.blocks_needed(seq, num_tokens)
        if need > len(self.free):
            return False
        seq.block_table.extend(self._take_free() for _ in range(need))
        return True

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full of computed K/V, so later prompts can reuse them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, len(seq)) // bs
        for i in range(len(seq.block_hashes), full):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt, tokens)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_tokens[block] = tuple(tokens)
                self.block_of_hash[block] = h

    def free_seq(self, seq: Sequence) -> None:
        """Release a sequence's blocks, last first: its tail is then evicted before its head, the likelier shared."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free[block] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed_tokens = seq.num_cached_tokens = 0

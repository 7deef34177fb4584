"""BlockManager on pure Python: allocation, ref counts, freeing, prefix caching, and random-workload invariants."""

import random

import pytest

from longseq.engine import block_manager as bm_module
from longseq.engine.block_manager import BlockManager
from longseq.engine.sequence import Sequence
from longseq.generation.sampling import SamplingParams

BS = 4


def seq(prompt, max_out=16) -> Sequence:
    return Sequence("r", list(prompt), SamplingParams(max_new_tokens=max_out), None, max_out)


def computed(bm: BlockManager, s: Sequence, n: int | None = None) -> Sequence:
    """Allocate for and mark the first n tokens (default all) as computed, then publish full blocks."""
    n = len(s) if n is None else n
    assert bm.ensure(s, n)
    s.num_computed_tokens = n
    bm.commit(s)
    return s


def test_allocation_counts():
    bm = BlockManager(10, BS)
    s = seq(range(10))
    assert bm.blocks_needed(s, 10) == 3
    assert bm.ensure(s, 10) and len(s.block_table) == 3 and bm.num_free_blocks == 7
    assert bm.blocks_needed(s, 12) == 0
    assert bm.ensure(s, 12) and len(s.block_table) == 3  # the third block still has room
    assert bm.ensure(s, 13) and len(s.block_table) == 4 and bm.num_free_blocks == 6
    assert bm.ensure(s, 1) and len(s.block_table) == 4  # never shrinks
    assert len(set(s.block_table)) == 4
    assert all(bm.ref_counts[b] == 1 for b in s.block_table)
    assert bm.usage == pytest.approx(0.4)


def test_ensure_is_all_or_nothing():
    bm = BlockManager(4, BS)
    a = seq(range(8))
    assert bm.ensure(a, 8)  # 2 blocks
    b = seq(range(100, 112))
    assert not bm.ensure(b, 12)  # needs 3, 2 free
    assert b.block_table == [] and bm.num_free_blocks == 2
    assert sum(bm.ref_counts) == 2
    assert bm.ensure(b, 8) and bm.num_free_blocks == 0
    assert not bm.ensure(a, 9)
    assert len(a.block_table) == 2


def test_free_returns_every_block():
    bm = BlockManager(8, BS)
    seqs = [seq(range(i * 10, i * 10 + 5)) for i in range(3)]
    for s in seqs:
        computed(bm, s)
    assert bm.num_free_blocks == 2
    for s in seqs:
        bm.free_seq(s)
        assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    assert all(r == 0 for r in bm.ref_counts)


def test_prefix_hit_only_after_commit():
    bm = BlockManager(16, BS)
    prompt = list(range(9))  # two full blocks and one token
    a = seq(prompt)
    assert bm.ensure(a, 9)
    assert bm.allocate_prefix(seq(prompt)) == 0  # allocated, but no K/V computed yet
    a.num_computed_tokens = 5
    bm.commit(a)  # only the first block is full of computed K/V
    b = seq(prompt)
    assert bm.allocate_prefix(b) == 4 and b.block_table == a.block_table[:1]
    a.num_computed_tokens = 9
    bm.commit(a)
    c = seq(prompt)
    assert bm.allocate_prefix(c) == 8 and c.block_table == a.block_table[:2]
    assert c.num_cached_tokens == 8
    assert [bm.ref_counts[x] for x in a.block_table] == [3, 2, 1]


def test_prefix_caching_disabled():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    prompt = list(range(9))
    computed(bm, seq(prompt))
    assert bm.allocate_prefix(seq(prompt)) == 0 and not bm.cached


def test_hits_only_for_leading_full_blocks():
    bm = BlockManager(32, BS)
    prompt = list(range(13))
    a = computed(bm, seq(prompt))
    assert bm.allocate_prefix(seq([99] + prompt[1:])) == 0  # first block differs: nothing after it counts
    b = seq(prompt[:4] + [99] + prompt[5:])
    assert bm.allocate_prefix(b) == 4 and b.block_table == a.block_table[:1]
    c = seq(prompt[:10])  # 2 full blocks + 2 tokens of a block A filled with other tokens
    assert bm.allocate_prefix(c) == 8 and c.block_table == a.block_table[:2]
    d = seq(prompt + [50, 51, 52, 53, 54])  # longer than A: hits A's 3 full blocks, not more
    assert bm.allocate_prefix(d) == 12 and d.block_table == a.block_table[:3]


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(32, BS)
    a = computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    b = computed(bm, seq([0, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert a.block_hashes[1] != b.block_hashes[1]  # same tokens in block 1, different history


@pytest.mark.parametrize("length, reused", [(4, 0), (5, 4), (8, 4), (9, 8), (12, 8), (13, 12)])
def test_never_reuses_the_block_of_the_last_prompt_token(length, reused):
    bm = BlockManager(32, BS)
    prompt = list(range(length))
    computed(bm, seq(prompt + [77, 78, 79, 80]))  # every block of `prompt` is full and committed
    b = seq(prompt)
    assert bm.allocate_prefix(b) == reused
    assert reused < length  # the last prompt token is always recomputed: its logits are needed


def test_shared_blocks_survive_one_owners_free():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    a = computed(bm, seq(prompt))
    b = seq(prompt)
    bm.allocate_prefix(b)
    shared = b.block_table[:]
    assert all(bm.ref_counts[x] == 2 for x in shared)
    bm.free_seq(a)
    assert all(bm.ref_counts[x] == 1 and x not in bm.free for x in shared)
    assert bm.num_free_blocks == 16 - 2  # only the two shared blocks stay in use
    bm.free_seq(b)
    assert bm.num_free_blocks == 16 and all(r == 0 for r in bm.ref_counts)


def test_freed_cached_block_is_reused_without_allocation():
    bm = BlockManager(8, BS)
    prompt = list(range(9))
    a = computed(bm, seq(prompt))
    blocks = a.block_table[:2]
    bm.free_seq(a)
    assert bm.num_free_blocks == 8
    b = seq(prompt)
    assert bm.allocate_prefix(b) == 8
    assert b.block_table == blocks and bm.num_free_blocks == 6  # taken off the free list, nothing new
    assert all(bm.ref_counts[x] == 1 for x in blocks)
    assert bm.ensure(b, 9) and bm.num_free_blocks == 5  # only the last token's block is new


def test_cache_entry_dropped_when_block_is_reallocated():
    bm = BlockManager(4, BS)
    prompt = list(range(9))
    a = computed(bm, seq(prompt))
    bm.free_seq(a)
    assert len(bm.cached) == 2
    other = seq(range(50, 66))  # 4 blocks: every block, the cached ones included, is overwritten
    assert bm.ensure(other, 16)
    assert not bm.cached and not bm.block_of_hash and not bm.block_tokens
    bm.free_seq(other)
    assert bm.allocate_prefix(seq(prompt)) == 0


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(6, BS)
    a = computed(bm, seq(range(9)))  # blocks 0, 1 (cached), 2
    bm.free_seq(a)
    b = seq(range(20, 23))  # takes the oldest free block (3), not a cached one
    assert bm.ensure(b, 3) and b.block_table == [3]
    assert len(bm.cached) == 2
    assert bm.allocate_prefix(seq(range(9))) == 8


def test_a_freed_sequence_loses_its_tail_first():
    bm = BlockManager(4, BS)
    a = computed(bm, seq(range(16)))  # 4 full, cached blocks: the whole pool
    table = a.block_table[:]
    bm.free_seq(a)
    b = seq(range(50, 54))
    assert bm.ensure(b, 4) and b.block_table == [table[-1]]  # the tail goes first; the head stays reusable
    c = seq(list(range(16)) + [99])
    assert bm.allocate_prefix(c) == 12 and c.block_table == table[:3]


def test_token_equality_checked_on_hash_hit(monkeypatch):
    monkeypatch.setattr(bm_module, "block_hash", lambda prefix, tokens: 42)  # every block collides
    bm = BlockManager(16, BS)
    computed(bm, seq(range(9)))
    assert bm.allocate_prefix(seq(range(100, 109))) == 0  # same hash, other tokens: a miss
    assert bm.allocate_prefix(seq(range(9))) == 4  # (with every hash equal only block 0 is registered)


def test_commit_publishes_decoded_blocks_and_is_idempotent():
    bm = BlockManager(16, BS)
    a = computed(bm, seq(range(6)))
    assert len(a.block_hashes) == 1
    a.token_ids += [50, 51, 52]  # decoded tokens: block 1 now full
    computed(bm, a)
    assert len(a.block_hashes) == 2 and len(bm.cached) == 2
    bm.commit(a)
    assert len(a.block_hashes) == 2 and len(bm.cached) == 2
    b = seq(a.token_ids + [60])
    assert bm.allocate_prefix(b) == 8 and b.block_table == a.block_table[:2]


def test_duplicate_content_is_cached_once():
    bm = BlockManager(16, BS)
    prompt = list(range(9))
    a, b = seq(prompt), seq(prompt)
    assert bm.ensure(a, 9) and bm.ensure(b, 9)  # both computed the same prefix at once (no hits yet)
    a.num_computed_tokens = b.num_computed_tokens = 9
    bm.commit(a)
    bm.commit(b)
    assert sorted(bm.cached.values()) == sorted(a.block_table[:2])
    first = a.block_table[:2]
    bm.free_seq(a)
    bm.free_seq(b)
    assert bm.num_free_blocks == 16
    c = seq(prompt)
    assert bm.allocate_prefix(c) == 8 and c.block_table == first  # the first to commit won


# ---- randomized invariants ------------------------------------------------------------------------------------


def check_invariants(bm: BlockManager, live: list[Sequence], kv: dict[int, list]) -> None:
    tables = [s.block_table for s in live]
    for b in range(bm.num_blocks):
        assert (b in bm.free) == (bm.ref_counts[b] == 0), b
        assert bm.ref_counts[b] == sum(t.count(b) for t in tables), b
    assert sum(bm.ref_counts) == sum(len(t) for t in tables)
    owners: dict[int, list[int]] = {}
    for i, t in enumerate(tables):
        assert len(set(t)) == len(t)
        for b in t:
            owners.setdefault(b, []).append(i)
    cached_blocks = set(bm.cached.values())
    for b, who in owners.items():
        if len(who) > 1:  # shared: only a cached prefix block, at the same position of every table
            assert b in cached_blocks
            assert len({tables[i].index(b) for i in who}) == 1
    for h, b in bm.cached.items():
        assert bm.block_of_hash[b] == h
        assert tuple(kv[b]) == bm.block_tokens[b]  # a cached block really holds those tokens' K/V
    for s in live:  # every computed token's K/V sits where the block table says
        for i in range(s.num_computed_tokens):
            assert kv[s.block_table[i // bm.block_size]][i % bm.block_size] == s.token_ids[i]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_keeps_invariants(seed, caching):
    rng = random.Random(seed)
    bs, nb = rng.choice([(2, 24), (4, 16), (4, 40), (8, 12)])
    bm = BlockManager(nb, bs, enable_prefix_caching=caching)
    kv = {b: [None] * bs for b in range(nb)}  # simulated pool contents: the token whose K/V each slot holds
    stems = [[rng.randrange(5) for _ in range(rng.randint(1, 3 * bs))] for _ in range(4)]
    live: list[Sequence] = []
    hits = 0

    def compute(s: Sequence, n: int) -> None:
        if not bm.ensure(s, s.num_computed_tokens + n):
            return
        for i in range(s.num_computed_tokens, s.num_computed_tokens + n):
            block = s.block_table[i // bs]
            assert bm.ref_counts[block] == 1  # never write into a block someone else reads
            kv[block][i % bs] = s.token_ids[i]
        s.num_computed_tokens += n
        bm.commit(s)

    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            s = seq(rng.choice(stems) + [rng.randrange(5) for _ in range(rng.randint(1, 2 * bs))])
            before = bm.num_free_blocks
            n = bm.allocate_prefix(s)
            assert n % bs == 0 and n < s.num_prompt_tokens and len(s.block_table) == n // bs
            assert bm.num_free_blocks >= before - n // bs
            hits += n > 0
            s.num_computed_tokens = n
            live.append(s)
        elif op < 0.7:
            s = rng.choice(live)
            free_before, table_before = bm.num_free_blocks, s.block_table[:]
            n = rng.randint(1, 2 * bs)
            if s.num_computed_tokens == len(s):
                s.token_ids.append(rng.randrange(5))  # decode: a new token to compute
                n = 1
            n = min(n, len(s) - s.num_computed_tokens)
            need = bm.blocks_needed(s, s.num_computed_tokens + n)
            compute(s, n)
            if need > free_before:  # refused: nothing changed
                assert bm.num_free_blocks == free_before and s.block_table == table_before
        else:
            s = live.pop(rng.randrange(len(live)))
            bm.free_seq(s)
        check_invariants(bm, live, kv)
    for s in live:
        bm.free_seq(s)
    check_invariants(bm, [], kv)
    assert bm.num_free_blocks == nb
    if caching:
        assert hits > 0  # the workload did exercise prefix reuse


def test_prefix_hits_are_whole_groups_of_prefix_align_blocks():
    # Memory attention's query blocks span 2 KV blocks: of 3 cached blocks a new prompt reuses 2, and nothing of
    # a prefix of 1.
    bm = BlockManager(20, BS, prefix_align=2)
    first = computed(bm, seq(range(13)))  # blocks 0-2 full and published
    assert bm.allocate_prefix(seq(list(range(12)) + [50, 51, 52, 53, 54, 55])) == 8  # 3 blocks match, 4 might
    assert bm.allocate_prefix(seq(list(range(4)) + [60, 61, 62, 63, 64])) == 0
    bm.free_seq(first)

"""The scheduler driven by a simulated model: token budget, decode-first ordering, chunked prefill, the sequence
cap, FCFS admission and preemption by recompute."""

import random

import pytest

from longseq.engine.block_manager import BlockManager, block_hash
from longseq.engine.scheduler import Scheduler
from longseq.engine.sequence import Sequence, Status
from longseq.generation.sampling import SamplingParams


def next_token(s: Sequence) -> int:
    # A function of the tokens so far, like a greedy model: a recomputed sequence continues the same way.
    return (sum(t * (i + 1) for i, t in enumerate(s.token_ids)) * 31 + len(s)) % 97


class Sim:
    """An engine without a model: schedule, advance num_computed, commit, sample, finish on length."""

    def __init__(self, num_blocks=64, block_size=4, max_num_seqs=8, budget=32, caching=True, align=1):
        """`align`: memory attention's query block (chunks and prefix hits end on its multiples)."""
        self.bm = BlockManager(num_blocks, block_size, caching, prefix_align=max(1, align // block_size))
        self.sched = Scheduler(self.bm, max_num_seqs, budget, chunk_align=align)
        self.budget, self.max_num_seqs = budget, max_num_seqs
        self.history: list[list[tuple[Sequence, int]]] = []
        self.finished: list[Sequence] = []
        self.admitted: list[Sequence] = []  # first admission of each sequence, in order

    def add(self, prompt, max_out=8) -> Sequence:
        s = Sequence(f"r{len(self.admitted) + len(self.sched.waiting)}", list(prompt),
                     SamplingParams(max_new_tokens=max_out), None, max_out)
        assert -(-(len(prompt) + max_out) // self.bm.block_size) <= self.bm.num_blocks  # what RequestLimits.check does
        self.sched.add(s)
        return s

    def step(self) -> list[tuple[Sequence, int]]:
        was_running = [s for s in self.sched.running]
        scheduled = self.sched.schedule()
        self.check(scheduled)
        for s, _ in scheduled:
            if s not in was_running and s not in self.admitted:
                self.admitted.append(s)
        for s, n in scheduled:
            s.num_computed_tokens += n
            self.bm.commit(s)
        for s, _ in scheduled:
            if s.num_computed_tokens == len(s):
                s.token_ids.append(next_token(s))
                if len(s.output_ids) >= s.max_output_tokens:
                    self.sched.finish(s, "length")
                    self.finished.append(s)
        self.history.append(scheduled)
        return scheduled

    def check(self, scheduled) -> None:
        bm, sched = self.bm, self.sched
        assert sum(n for _, n in scheduled) <= self.budget
        assert len(sched.running) <= self.max_num_seqs
        seqs = [s for s, _ in scheduled]
        assert len(set(map(id, seqs))) == len(seqs)
        for s, n in scheduled:
            assert s.status == Status.RUNNING and s in sched.running
            assert 1 <= n <= len(s) - s.num_computed_tokens
            assert len(s.block_table) * bm.block_size >= s.num_computed_tokens + n
        for s in sched.waiting:
            assert s.status == Status.WAITING and not s.block_table  # waiting sequences hold no KV
        assert sum(bm.ref_counts) == sum(len(s.block_table) for s in sched.running)
        if sched.has_unfinished():
            assert scheduled, "no progress: the scheduler is stuck"

    def run(self, max_steps=5000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("did not finish")


def reference_outputs(prompts, max_outs):
    """Each sequence alone with plenty of blocks and budget."""
    outs = []
    for p, m in zip(prompts, max_outs, strict=True):
        sim = Sim(num_blocks=256, budget=4096)
        s = sim.add(p, m)
        sim.run()
        outs.append(s.output_ids)
    return outs


@pytest.mark.parametrize("tight", [True, False], ids=["tight", "roomy"])
@pytest.mark.parametrize("seed", range(6))
def test_random_workload(seed, tight):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    num_blocks = rng.randint(32 // bs, 56 // bs) if tight else rng.randint(12, 40)
    sim = Sim(num_blocks=num_blocks, block_size=bs, max_num_seqs=rng.randint(3, 8) if tight else rng.randint(1, 6),
              budget=rng.randint(4, 40), caching=rng.random() < 0.7)
    stems = [[rng.randrange(97) for _ in range(rng.randint(1, 12))] for _ in range(3)]
    prompts, max_outs, seqs = [], [], []
    for _ in range(3000):
        if len(seqs) < 30 and rng.random() < 0.3:
            p = rng.choice(stems) + [rng.randrange(97) for _ in range(rng.randint(1, 20))]
            m = rng.randint(1, 12)
            while -(-(len(p) + m) // bs) > sim.bm.num_blocks:
                p = p[: len(p) // 2]
            prompts.append(p)
            max_outs.append(m)
            seqs.append(sim.add(p, m))
        if not sim.sched.has_unfinished():
            if len(seqs) == 30:
                break
            continue
        sim.step()
    sim.run()
    assert all(s.is_finished for s in seqs) and len(sim.finished) == 30
    assert sim.admitted == seqs  # first admissions in arrival order: FCFS
    assert sim.bm.num_free_blocks == sim.bm.num_blocks
    assert [s.output_ids for s in seqs] == reference_outputs(prompts, max_outs)
    if tight:
        assert sim.sched.num_preempted > 0  # the pool was small enough to exercise preemption


def test_decodes_go_before_new_prefills():
    sim = Sim(budget=16)
    running = [sim.add([i] * 3, max_out=20) for i in range(3)]
    sim.step()  # all three prefilled at once (9 tokens)
    assert all(s.num_computed_tokens == 3 and len(s) == 4 for s in running)
    new = sim.add(list(range(40)), max_out=4)
    scheduled = sim.step()
    assert scheduled == [(running[0], 1), (running[1], 1), (running[2], 1), (new, 13)]


def test_long_prompt_is_chunked_while_others_keep_decoding():
    sim = Sim(budget=16)
    a = sim.add([7, 8, 9], max_out=30)
    sim.step()
    b = sim.add(list(range(50)), max_out=3)
    chunks = []
    while b.num_computed_tokens < b.num_prompt_tokens:
        before = len(a)
        scheduled = dict((id(s), n) for s, n in sim.step())
        assert scheduled[id(a)] == 1 and len(a) == before + 1  # A decodes every step
        chunks.append(scheduled[id(b)])
    assert chunks == [15, 15, 15, 5]
    assert len(b.output_ids) == 1  # sampled once, after the last chunk


def test_chunked_prefill_alone_uses_the_whole_budget():
    sim = Sim(budget=8)
    s = sim.add(list(range(30)), max_out=2)
    assert [n for ((_, n),) in (sim.step() for _ in range(4))] == [8, 8, 8, 6]
    assert s.output_ids and s.num_computed_tokens == 30


def test_max_num_seqs():
    sim = Sim(max_num_seqs=2, budget=64)
    seqs = [sim.add([i, i + 1], max_out=3 + i) for i in range(5)]
    sim.step()
    assert sim.sched.running == seqs[:2] and list(sim.sched.waiting) == seqs[2:]
    sim.run()
    assert max(len(h) for h in sim.history) == 2
    assert sim.admitted == seqs


def test_fcfs_head_of_queue_is_never_overtaken():
    sim = Sim(num_blocks=8, block_size=4, budget=64)
    a = sim.add(list(range(20)), max_out=8)  # 5 blocks now, 7 at the end
    sim.step()
    b = sim.add(list(range(30, 46)), max_out=2)  # 4 blocks: does not fit beside A
    c = sim.add([1, 2], max_out=2)  # 1 block: would fit, but B is ahead of it
    while a.status == Status.RUNNING:
        sim.step()
        assert c.status == Status.WAITING and b.status == Status.WAITING
        assert list(sim.sched.waiting) == [b, c]
    sim.run()
    assert sim.admitted == [a, b, c]


def test_preemption_frees_the_newest_and_requeues_it_first():
    sim = Sim(num_blocks=6, block_size=4, budget=64)
    a = sim.add([1] * 8, max_out=12)
    b = sim.add([2] * 8, max_out=12)
    c = sim.add([3] * 18, max_out=1)  # waits behind them (5 blocks: never fits beside them)
    sim.step()
    assert sim.sched.running == [a, b]
    while sim.sched.num_preempted == 0:
        scheduled = sim.step()
    assert [s for s, _ in scheduled] == [a]  # B made way for A
    assert b.status == Status.WAITING and list(sim.sched.waiting)[:2] == [b, c]
    assert b.block_table == [] and b.num_computed_tokens == 0 and len(b.output_ids) == 5
    assert sim.sched.running == [a] and sum(sim.bm.ref_counts) == len(a.block_table) == 4
    sim.run()
    assert sim.sched.num_preempted == 1
    assert [s.output_ids for s in (a, b, c)] == reference_outputs([[1] * 8, [2] * 8, [3] * 18], [12, 12, 1])
    assert sim.finished == [a, b, c]


def test_newest_preempts_itself_when_it_cannot_grow():
    sim = Sim(num_blocks=4, block_size=4, budget=64)
    a = sim.add([1, 1], max_out=2)  # 1 block, always
    b = sim.add([2] * 12, max_out=4)  # 3 blocks now, 4 at most
    sim.step()
    assert sim.bm.num_free_blocks == 0 and sim.sched.num_preempted == 0
    scheduled = sim.step()  # B needs its 4th block: none free, and B is the newest
    assert [s for s, _ in scheduled] == [a] and sim.sched.num_preempted == 1
    assert b.status == Status.WAITING and b.block_table == [] and list(sim.sched.waiting) == [b]
    sim.run()
    assert [s.output_ids for s in (a, b)] == reference_outputs([[1, 1], [2] * 12], [2, 4])


def test_waiting_head_with_prefix_hits_does_not_deadlock():
    # The queue head takes cached prefix blocks, then fails to get the rest; meanwhile the running sequence is
    # preempted and needs every block but those. Held by a waiting sequence, they would stall the engine forever.
    sim = Sim(num_blocks=10, block_size=4, budget=64)
    shared = list(range(50, 59))  # 9 tokens: 2 full blocks get cached
    c = sim.add(shared, max_out=1)
    sim.run()
    a = sim.add([1, 2, 3, 4], max_out=32)  # grows to 36 tokens = 9 blocks
    while len(a) < 32:
        sim.step()
    h1 = block_hash(0, shared[:4])
    assert set(sim.bm.free) == {sim.bm.cached[h1], sim.bm.cached[block_hash(h1, shared[4:8])]}  # C's, cached
    x = sim.add(shared, max_out=1)
    sim.run(max_steps=200)
    assert a.is_finished and x.is_finished and c.is_finished
    assert sim.bm.num_free_blocks == 10


@pytest.mark.parametrize("seed", range(4))
def test_schedule_ahead_is_the_next_schedule(seed):
    # Wherever the scheduler names the next decode step before the sampled tokens are appended, the next
    # schedule() decodes exactly those sequences first (it may admit prompts after them into slots freed by
    # sequences that ended by length, which the engine leaves to the step after), and preempts nobody.
    rng = random.Random(seed)
    sim = Sim(num_blocks=rng.randint(10, 24), block_size=4, max_num_seqs=rng.randint(2, 5), budget=rng.randint(4, 24))
    seqs = [sim.add([rng.randrange(97) for _ in range(rng.randint(1, 12))], rng.randint(1, 10)) for _ in range(12)]
    predicted, known = None, 0
    while sim.sched.has_unfinished():
        preempted, waiting = sim.sched.num_preempted, list(sim.sched.waiting)
        scheduled = sim.sched.schedule()
        if predicted is not None:
            assert scheduled[: len(predicted)] == predicted and sim.sched.num_preempted == preempted
            assert all(s in waiting for s, _ in scheduled[len(predicted) :])
            known += 1
        for s, n in scheduled:
            s.num_computed_tokens += n
            sim.bm.commit(s)
        sampled = [s for s, _ in scheduled if s.num_computed_tokens == len(s)]
        ahead = sim.sched.schedule_ahead(scheduled, sampled)
        predicted = None if ahead is None else ahead[0]
        if ahead is not None:
            assert [sampled[i] for i in ahead[1]] == [s for s, _ in ahead[0]]
        for s in sampled:
            s.token_ids.append(next_token(s))
            if len(s.output_ids) >= s.max_output_tokens:
                sim.sched.finish(s, "length")
    assert known > 0 and all(s.is_finished for s in seqs)
    assert sim.bm.num_free_blocks == sim.bm.num_blocks


def test_schedule_ahead_waits_for_admission():
    sim = Sim(max_num_seqs=2, budget=64)
    a = sim.add([1, 2, 3], max_out=10)
    scheduled = sim.step()
    sim.add([4, 5], max_out=10)
    assert sim.sched.schedule_ahead(scheduled, [a]) is None  # the next step admits the waiting prompt
    sim.step()
    scheduled = sim.step()
    assert sim.sched.schedule_ahead(scheduled, [s for s, _ in scheduled]) is not None


@pytest.mark.parametrize("budget", [8, 13, 40])
def test_memory_attention_chunks_and_prefix_hits_end_on_query_blocks(budget):
    # Query blocks of 8 tokens (2 KV blocks): a prompt chunk that leaves some of its prompt ends on a multiple of 8,
    # as does a prefix hit; the outputs are those of sequences run alone.
    rng = random.Random(budget)
    stem = [rng.randrange(97) for _ in range(21)]
    prompts = [stem + [rng.randrange(97) for _ in range(rng.randint(1, 30))] for _ in range(8)]
    prompts += [[rng.randrange(97) for _ in range(rng.randint(1, 50))] for _ in range(8)]
    max_outs = [rng.randint(1, 9) for _ in prompts]
    sim = Sim(num_blocks=96, budget=budget, max_num_seqs=5, align=8)
    hits = []
    allocate = sim.bm.allocate_prefix
    sim.bm.allocate_prefix = lambda s: hits.append(allocate(s)) or hits[-1]
    ends = []  # (where a chunk ends, the tokens its sequence has)
    schedule = sim.sched.schedule
    sim.sched.schedule = lambda: [ends.append((s.num_computed_tokens + n, len(s))) or (s, n) for s, n in schedule()]
    seqs = [sim.add(p, m) for p, m in zip(prompts, max_outs, strict=True)]
    sim.run()
    assert all(end % 8 == 0 for end, total in ends if end < total)  # chunks that leave some of their tokens
    assert any(end % 8 for end, total in ends)  # while the prompts' ends are anywhere
    assert all(h % 8 == 0 for h in hits) and any(h > 0 for h in hits)
    assert [s.output_ids for s in seqs] == reference_outputs(prompts, max_outs)

"""Memory attention (InfLLM) in the paged engine: the same tokens and log-probabilities as `generate`'s memory cache
for prompts several times the model's context, batched, chunked and prefix-cached; plain causal attention where
every block is retrieved and RoPE is off; a decode that reads a bounded number of keys; the refusals."""

import pytest
import torch
from engine_helpers import make_engine, random_prompts, run_engine, tiny_lm

from longseq.attention.paged import PagedBatch, PagedKVCache
from longseq.attention.paged_memory import PagedMemoryKVCache, angles, keys_read, rotate_with
from longseq.attention.paged_memory_plan import plan_step
from longseq.config import AttentionConfig, ModelOverrides
from longseq.engine import LLM, SamplingParams
from longseq.errors import LongseqError
from longseq.generation.memory_cache import MemoryKVCache
from longseq.models.overrides import apply_overrides

CONTEXT = 32  # the tiny model's trained context; prompts run to several times it
MEMORY = dict(attention="memory", sink_tokens=2, window=12, block_size=4, retrieved_blocks=2)
N_OUT = 8
GREEDY = SamplingParams(max_new_tokens=N_OUT, ignore_eos=True, logprobs=0)
CONFIGS = {
    "whole-prompts": dict(kv_block_size=4, num_kv_blocks=200, max_num_batched_tokens=1024),
    "chunked": dict(kv_block_size=2, num_kv_blocks=400, max_num_batched_tokens=24),  # decodes beside chunks
    "no-prefix-cache": dict(kv_block_size=4, num_kv_blocks=200, max_num_batched_tokens=16,
                            enable_prefix_caching=False),
    "preempting": dict(kv_block_size=4, num_kv_blocks=60, max_num_batched_tokens=32),  # recomputes
}


def memory_lm(**knobs):
    lm = tiny_lm(max_seq_len=CONTEXT)
    apply_overrides(lm.model, ModelOverrides(**{**MEMORY, **knobs}))
    return lm


@pytest.fixture(scope="module")
def lm():
    return memory_lm()


@pytest.fixture(scope="module")
def prompts():
    stem = random_prompts(1, 40, 40, seed=3)[0]  # shared by the last two: prefix-cache hits
    return random_prompts(3, 50, 110, seed=2) + [[5, 6, 7], stem + [1, 2, 3, 4, 5], stem + [9] * 23]


@torch.no_grad()
def reference(model, prompt: list[int]) -> tuple[list[int], list[float]]:
    """generate's memory cache, greedy: the tokens and each one's log-probability."""
    cache = MemoryKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq)
    tokens, logprobs, ids = [], [], prompt
    while len(tokens) < N_OUT:
        for a in range(0, len(ids), cache.prefill_chunk()):
            chunk = torch.tensor([ids[a : a + cache.prefill_chunk()]])
            logits = model(chunk, positions=cache.prepare(chunk.shape[1]), cache=cache, last_only=True)
            cache.advance(chunk.shape[1])
        row = logits[0, -1].log_softmax(-1)
        tokens.append(int(row.argmax()))
        logprobs.append(float(row.max()))
        ids = [tokens[-1]]
    return tokens, logprobs


@pytest.fixture(scope="module")
def expected(lm, prompts):
    return [reference(lm.model, p) for p in prompts]


@pytest.mark.parametrize("config", CONFIGS)
def test_engine_equals_generate(lm, prompts, expected, config):
    engine = make_engine(lm, **CONFIGS[config])
    outs = run_engine(engine, prompts, GREEDY)
    for out, (tokens, logprobs) in zip(outs, expected, strict=True):
        assert out.token_ids == tokens
        torch.testing.assert_close([e.logprob for e in out.logprobs], logprobs, atol=1e-5, rtol=0)
    assert engine.max_model_len == engine.blocks.num_blocks * engine.cfg.kv_block_size  # the pool, not the model
    assert (engine.stats()["num_preempted"] > 0) == (config == "preempting")
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_prefix_cache_hits_change_nothing(lm, prompts, expected):
    engine = make_engine(lm, **CONFIGS["chunked"])
    hits = []
    allocate = engine.blocks.allocate_prefix
    engine.blocks.allocate_prefix = lambda seq: hits.append(allocate(seq)) or hits[-1]
    outs = [run_engine(engine, [p], GREEDY)[0] for p in prompts[-2:]]  # one after the other: the second hits
    assert hits[-1] == 40  # the stem, whole memory blocks (4 tokens = 2 KV blocks) of it
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in expected[-2:]]


def test_decode_reads_a_bounded_number_of_keys(lm):
    spec = lm.config.attention
    bound = spec.sink_tokens + spec.retrieved_blocks * spec.block_size + spec.block_size - 1 + spec.local_window
    engine = make_engine(lm, kv_block_size=4, num_kv_blocks=400)
    short, long = random_prompts(1, 40, 40, seed=5)[0], random_prompts(1, 200, 200, seed=6)[0]  # 1 and 6 contexts
    widths = {}
    for prompt in (short, long):
        engine.add_request(prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
            (blocks,) = engine.runner.cache.plan.groups
            if blocks.local_mask.shape[1] == 1:  # a decode step: single-token query blocks
                widths.setdefault(len(prompt), set()).add(keys_read(blocks, spec))
                assert blocks.max_blocks >= (len(prompt) - spec.local_window - spec.sink_tokens) // spec.block_size
    assert max(widths[200]) <= bound and max(widths[40]) <= bound  # five times the context, the same bound


def test_every_block_retrieved_without_rope_is_causal():
    # Sinks + every memory block + remainder + window is every key: with no positions to move, plain attention.
    spec = AttentionConfig("memory", sink_tokens=3, local_window=6, block_size=4, retrieved_blocks=100)
    H, H_KV, D, kv = 4, 2, 8, 2
    steps = [[16, 12, 9], [16, 9, 0], [5, 0, 0], [1, 1, 0], [1, 0, 0]]  # per sequence: chunks, then decodes
    g = torch.Generator().manual_seed(0)
    tables = [list(range(j * 40, j * 40 + 40)) for j in range(3)]
    memory = PagedMemoryKVCache(1, 120, kv, H_KV, D, torch.float64, torch.device("cpu"), spec, None)
    plain = PagedKVCache(1, 121 * kv, H_KV, D, torch.float64, torch.device("cpu"))
    done = [0, 0, 0]
    for step in steps:
        rows = [j for j, n in enumerate(step) if n]
        q_lens, ctx = [step[j] for j in rows], [done[j] + step[j] for j in rows]
        N = sum(q_lens)
        q = torch.randn(1, H, N, D, generator=g, dtype=torch.float64)
        k, v = (torch.randn(1, H_KV, N, D, generator=g, dtype=torch.float64) for _ in range(2))
        batch_tables = [tables[j] for j in rows]
        memory.batch = PagedBatch.build(batch_tables, q_lens, ctx, kv, torch.device("cpu"), H_KV, slots_only=True)
        memory.set_plan(plan_step(batch_tables, q_lens, ctx, kv, spec, torch.device("cpu")))
        plain.batch = PagedBatch.build(batch_tables, q_lens, ctx, kv, torch.device("cpu"), H_KV)
        torch.testing.assert_close(memory.attention(0, q, k, v, None), plain.attention(0, q, k, v, None),
                                   atol=1e-12, rtol=0)
        for j in rows:
            done[j] += step[j]
    assert max(done) > spec.local_window + spec.sink_tokens + 6 * spec.block_size  # memory blocks were in play


def test_rotation_is_exact_far_past_the_context():
    # A key kept rotated at its true position ~1M and moved back: float64 angles make R(a) R(-a) the identity.
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    x = torch.randn(3, 64, dtype=torch.float64)
    far = torch.tensor([1_000_003, 999_999, 1_048_575])
    there = rotate_with(x, *angles(far, inv_freq, torch.float64))
    torch.testing.assert_close(rotate_with(there, *angles(-far, inv_freq, torch.float64)), x, atol=1e-12, rtol=0)


def test_misaligned_chunks_still_serve():
    # A budget under one query block: chunks start mid-block; the output is memory attention's all the same.
    outs = run_engine(make_engine(memory_lm(), kv_block_size=4, num_kv_blocks=100, max_num_batched_tokens=3),
                      random_prompts(2, 36, 44, seed=7), SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert all(len(o.token_ids) == 4 for o in outs)


def test_fp8_pool_batched_equals_alone(prompts):
    lm = memory_lm()
    options = dict(kv_block_size=4, num_kv_blocks=200, kv_cache_dtype="fp8")
    batched = run_engine(make_engine(lm, **options), prompts[:2], GREEDY)
    alone = [run_engine(make_engine(lm, **options), [p], GREEDY)[0] for p in prompts[:2]]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]


def test_llm_takes_memory_options():
    llm = LLM(tiny_lm(max_seq_len=CONTEXT), num_kv_blocks=100, kv_block_size=4, **MEMORY)
    spec = llm.engine.lm.config.attention
    assert (spec.variant, spec.local_window, spec.block_size) == ("memory", 12, 4)
    out = llm.generate([list(range(90))], SamplingParams(max_new_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3  # a prompt of 90 tokens, the model's context is 32


@pytest.mark.parametrize("options, message", [
    (dict(block_size=6), "multiple of the KV block size"),
    (dict(memory_placement="host"), "memory-placement host"),
    (dict(window=30), "must fit the model's context"),
    (dict(attention_chunk=8), "does not apply to the serving engine"),
    (dict(tensor_parallel=2), "applied on one GPU"),
])
def test_llm_refuses_in_one_line(options, message):
    with pytest.raises(LongseqError, match=message) as e:
        LLM(tiny_lm(max_seq_len=CONTEXT), num_kv_blocks=100, kv_block_size=4, **{**MEMORY, **options})
    assert "\n" not in str(e.value)


def test_measured_step_runs_causal_in_its_place():
    # The GPU pool is sized by one cache-less forward, which memory attention cannot run: causal stands in.
    from longseq.engine.model_runner import causal_stand_in

    model = memory_lm().model
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(LongseqError, match="memory attention runs while generating"):
        model.hidden(ids)
    with torch.no_grad(), causal_stand_in(model):
        model.hidden(ids)
    assert all(layer.self_attn.variant.variant == "memory" for layer in model.model.layers)


def test_lora_requests_equal_generate_on_the_merged_model(tmp_path, prompts):
    import copy

    from lora_adapters import merge_adapter, write_adapter

    lm = memory_lm()
    write_adapter(tmp_path / "a", lm.model, rank=4, std=0.1)
    merged = merge_adapter(copy.deepcopy(lm.model), tmp_path / "a")
    engine = make_engine(lm, **CONFIGS["chunked"], enable_lora=True)
    engine.add_lora("a", tmp_path / "a")
    ids = [engine.add_request(p, GREEDY, lora=name) for p, name in zip(prompts[:3], ["a", None, "a"], strict=True)]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done[ids[1]].token_ids == reference(lm.model, prompts[1])[0]
    for i in (0, 2):
        assert done[ids[i]].token_ids == reference(merged, prompts[i])[0] != reference(lm.model, prompts[i])[0]

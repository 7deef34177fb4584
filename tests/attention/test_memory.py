"""Memory attention (InfLLM): the fast block path against the dense reference, and both against plain causal
attention where they must agree with it."""

from dataclasses import replace

import pytest
import torch

from longseq.attention import memory, reference_attention
from longseq.attention.memory import (
    LayerMemory,
    block_scores,
    query_positions,
    reference_memory_attention,
    rope_table,
    rotate,
)
from longseq.config import AttentionConfig

B, H, H_KV, D, T = 2, 4, 2, 8, 90
SPEC = AttentionConfig("memory", sink_tokens=3, block_size=4, local_window=12, retrieved_blocks=3)
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
CHUNKS = {"prefill_then_decode": [37] + [1] * 53, "blocks": [4] * 22 + [2], "mixed": [13, 1, 1, 9, 1, 30, 1, 1, 1, 32]}


@pytest.fixture(scope="module")
def qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, H_KV, H_KV))


def run_fast(spec, q, k, v, chunks, inv_freq):
    """Feed un-rotated q/k/v through a LayerMemory in chunks, rotated at the positions the cache hands out, as the
    model does; returns the outputs (B, H, T, D) and the layer."""
    table = rope_table(inv_freq, spec.local_window + spec.block_size, q.dtype, "cpu")
    layer = LayerMemory(spec, q.shape[0], k.shape[1], q.shape[3], "cpu", q.dtype, table)
    out, start = [], 0
    for size in chunks:
        qc, kc = q[:, :, start : start + size], k[:, :, start : start + size]
        if table is not None:
            frame = query_positions(size, spec, "cpu")
            qc, kc = rotate(qc, table[0][frame], table[1][frame]), rotate(kc, table[0][frame], table[1][frame])
        out.append(layer.attend(qc, kc, v[:, :, start : start + size]))
        start += size
    return torch.cat(out, dim=2), layer


def run_reference(spec, q, k, v, chunks, inv_freq):
    """The dense reference, query block by query block (each chunk cut every block_size queries)."""
    out, start = [], 0
    for size in chunks:
        for a in range(0, size, spec.block_size):
            end = start + min(a + spec.block_size, size)
            out.append(reference_memory_attention(q[:, :, start + a : end], k[:, :, :end], v[:, :, :end], spec,
                                                  inv_freq))
        start += size
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
@pytest.mark.parametrize("rope", [True, False], ids=["rope", "no_rope"])
@pytest.mark.parametrize("placement", ["gpu", "host"])
def test_fast_path_equals_dense_reference(qkv, chunks, rope, placement):
    spec = replace(SPEC, memory_placement=placement)
    _check_fast_path(spec, qkv, chunks, INV_FREQ if rope else None)


@pytest.mark.parametrize("placement", ["gpu", "host"])
def test_batched_fast_path_equals_dense_reference(qkv, placement, monkeypatch):
    # The batched query blocks (what GPUs run by default) against the dense reference as well.
    monkeypatch.setattr(LayerMemory, "batch_blocks", True)
    _check_fast_path(replace(SPEC, memory_placement=placement), qkv, CHUNKS["mixed"], INV_FREQ)


def test_fast_path_without_sinks_and_window_off_the_block_grid(qkv):
    # No sinks, a window that is no multiple of the block, blocks that do not divide the chunks.
    spec = AttentionConfig("memory", sink_tokens=0, block_size=5, local_window=7, retrieved_blocks=2)
    _check_fast_path(spec, qkv, CHUNKS["mixed"], INV_FREQ)


def _check_fast_path(spec, qkv, chunks, inv_freq):
    fast, layer = run_fast(spec, *qkv, chunks, inv_freq)
    torch.testing.assert_close(fast, run_reference(spec, *qkv, chunks, inv_freq), atol=1e-12, rtol=0)
    assert layer.memory.num_blocks > 4 * spec.retrieved_blocks  # meaningful: a few retrieved among many blocks


def test_host_placement_copies_retrieved_blocks(qkv, monkeypatch):
    # On CPU both placements share a device; the host path (indices to the host, blocks copied over) must run.
    copies = []
    real = memory._to_device
    monkeypatch.setattr(memory, "_to_device", lambda x, device: copies.append(x.shape) or real(x, device))
    host, layer = run_fast(replace(SPEC, memory_placement="host"), *qkv, CHUNKS["mixed"], INV_FREQ)
    # (B, m * k, H_kv, block, D) for m query blocks (one when decoding), once for K and once for V
    assert copies and copies[-1][1] % SPEC.retrieved_blocks == 0
    assert layer.memory.storage == torch.device("cpu")
    gpu, _ = run_fast(SPEC, *qkv, CHUNKS["mixed"], INV_FREQ)
    torch.testing.assert_close(host, gpu, atol=0, rtol=0)


@pytest.mark.parametrize("chunks", CHUNKS.values(), ids=CHUNKS.keys())
def test_every_block_retrieved_is_causal_attention(qkv, chunks):
    # With every block retrieved a query sees every earlier key; without RoPE positions do not matter, so memory
    # attention is plain causal attention. Fewer blocks must change the result, or the check would prove nothing.
    spec = replace(SPEC, retrieved_blocks=T)
    causal = reference_attention(*qkv)
    fast, layer = run_fast(spec, *qkv, chunks, None)
    assert layer.memory.num_blocks > 10
    torch.testing.assert_close(fast, causal, atol=1e-12, rtol=0)
    torch.testing.assert_close(run_reference(spec, *qkv, chunks, None), causal, atol=1e-12, rtol=0)
    fewer, _ = run_fast(SPEC, *qkv, chunks, None)
    assert (fewer - causal).abs().max() > 1e-3


def test_window_over_everything_is_rope_causal_attention(qkv):
    # Nothing leaves the window: every key keeps its true distance, as in causal attention at true positions.
    q, k, v = qkv
    spec = replace(SPEC, local_window=T)
    pos = torch.arange(T)
    cos, sin = rope_table(INV_FREQ, T, torch.float64, "cpu")
    expected = reference_attention(rotate(q, cos[pos], sin[pos]), rotate(k, cos[pos], sin[pos]), v)
    fast, layer = run_fast(spec, *qkv, CHUNKS["mixed"], INV_FREQ)
    assert layer.memory.num_blocks == 0
    torch.testing.assert_close(fast, expected, atol=1e-12, rtol=0)


def test_memory_keys_sit_just_beyond_the_window(qkv):
    # Decoding one query at p with every block retrieved: local keys at their true distances, every older key
    # (sinks, blocks, remainder) at distance `window`, as InfLLM places its memory.
    q, k, v = qkv
    spec = replace(SPEC, retrieved_blocks=T)
    p, window = T - 1, spec.local_window
    key_pos = torch.where(torch.arange(T) > p - window, torch.arange(T), p - window)
    cos, sin = rope_table(INV_FREQ, T, torch.float64, "cpu")
    expected = reference_attention(rotate(q[:, :, p:], cos[p:], sin[p:]), rotate(k, cos[key_pos], sin[key_pos]), v,
                                   q_start=p)
    fast, _ = run_fast(spec, *qkv, [p, 1], INV_FREQ)
    torch.testing.assert_close(fast[:, :, p:], expected, atol=1e-12, rtol=0)


def test_block_score_is_the_mean_logit():
    # The mean key's score is the block's attention logit averaged over its tokens and the queries, summed over heads.
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, H, 5, D, generator=g, dtype=torch.float64)
    blocks = torch.randn(1, 3, H_KV, 4, D, generator=g, dtype=torch.float64)  # (B, N, H_kv, block, D)
    scores = block_scores(q, blocks.mean(3))
    k = blocks.repeat_interleave(H // H_KV, dim=2)  # (1, N, H, block, D)
    logits = torch.einsum("bhqd,bnhtd->bnhqt", q, k)
    torch.testing.assert_close(scores.double(), logits.mean((3, 4)).sum(2), atol=1e-5, rtol=1e-5)


def test_bad_values_are_one_line_errors():
    from longseq.config import ModelConfig
    from longseq.errors import LongseqError

    for kw, text in ((dict(memory_placement="disk"), "memory placement"), (dict(retrieved_blocks=-1), "retrieved"),
                     (dict(local_window=0), "local_window"), (dict(alibi=True), "ALiBi")):
        with pytest.raises(LongseqError, match=text):
            AttentionConfig("memory", **kw)
    with pytest.raises(LongseqError, match="must fit the model's context"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    max_seq_len=64, attention=AttentionConfig("memory", local_window=64, block_size=4))


@pytest.mark.parametrize("placement", ["gpu", "host"])
def test_skipped_context_attends_as_an_attended_one(qkv, placement):
    # skip() stores a prefix without attending (decode benchmarks): what follows attends exactly as after attend().
    spec = replace(SPEC, memory_placement=placement)
    q, k, v = qkv
    table = rope_table(INV_FREQ, spec.local_window + spec.block_size, q.dtype, "cpu")
    frame = query_positions(T, spec, "cpu")
    qr, kr = rotate(q, table[0][frame], table[1][frame]), rotate(k, table[0][frame], table[1][frame])
    attended, skipped = (LayerMemory(spec, B, H_KV, D, "cpu", q.dtype, table) for _ in range(2))
    prefix = 61
    attended.attend(qr[:, :, :prefix], kr[:, :, :prefix], v[:, :, :prefix])
    skipped.skip(kr[:, :, :prefix], v[:, :, :prefix])
    assert skipped.seen == prefix and skipped.memory.num_blocks > spec.retrieved_blocks
    for t in range(prefix, T):  # decode, each token at frame position `window` (a one-token query block)
        qd = rotate(q[:, :, t : t + 1], table[0][[spec.local_window]], table[1][[spec.local_window]])
        kd = rotate(k[:, :, t : t + 1], table[0][[spec.local_window]], table[1][[spec.local_window]])
        step = (qd, kd, v[:, :, t : t + 1])
        torch.testing.assert_close(skipped.attend(*step), attended.attend(*step), atol=0, rtol=0)


@pytest.mark.parametrize("placement", ["gpu", "host"])
@pytest.mark.parametrize("spec", [SPEC, AttentionConfig("memory", sink_tokens=0, block_size=5, local_window=7,
                                                        retrieved_blocks=2),
                                  AttentionConfig("memory", sink_tokens=2, block_size=4, local_window=8,
                                                  retrieved_blocks=0)], ids=["sinks", "no_sinks", "no_retrieval"])
def test_batched_blocks_equal_block_by_block(qkv, placement, spec, monkeypatch):
    # The batched path (_blocks: every whole query block past the warm-up in one call) against _block one block at
    # a time, the reference; chunks long enough that most blocks batch.
    spec = replace(spec, memory_placement=placement)
    calls = []
    real = LayerMemory._blocks
    monkeypatch.setattr(LayerMemory, "_blocks", lambda self, q, s0, m: calls.append(m) or real(self, q, s0, m))
    chunks = [20, 40, 1, 29]
    monkeypatch.setattr(LayerMemory, "batch_blocks", True)  # by default only GPUs batch
    batched, _ = run_fast(spec, *qkv, chunks, INV_FREQ)
    assert sum(calls) * spec.block_size > T // 2  # most queries went through _blocks
    monkeypatch.setattr(LayerMemory, "batch_blocks", False)
    reference, _ = run_fast(spec, *qkv, chunks, INV_FREQ)
    torch.testing.assert_close(batched, reference, atol=1e-12, rtol=0)

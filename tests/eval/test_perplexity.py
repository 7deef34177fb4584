"""Perplexity equals exp(mean NLL) computed by hand from full forward passes, for every window/stride layout."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from longseq.config import ModelConfig
from longseq.errors import LongseqError
from longseq.eval.perplexity import read_documents, run_perplexity, sequence_nll, window_plan
from longseq.models.llama import CausalLM

V = 61


def tiny_model():
    cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                      max_seq_len=64)
    torch.manual_seed(0)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.double()


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % V for c in text]}


@pytest.mark.parametrize("n, context, stride", [(30, 8, 8), (30, 8, 3), (30, 64, 4), (31, 10, 7), (2, 5, 5),
                                                (9, 9, 1)])
def test_every_target_scored_once(n, context, stride):
    plan = window_plan(n, context, stride)
    scored = [t for _, end, first in plan for t in range(first, end)]
    if stride < context or context >= n:
        assert scored == list(range(1, n))
    else:  # disjoint windows (HF's stride = max_length): a window's first token has nothing to be predicted from
        assert scored == [t for t in range(1, n) if t % context]
    for begin, end, first in plan:
        assert 0 < end - begin <= context and begin < first


@pytest.mark.parametrize("context, stride", [(8, 8), (8, 3), (12, 5), (64, 64)])
@torch.no_grad()
def test_nll_by_hand(context, stride):
    model = tiny_model()
    ids = torch.randint(0, V, (29,), generator=torch.Generator().manual_seed(1)).tolist()
    total, count, windows = sequence_nll(model, ids, context, stride, loss_chunk=5)
    # By hand: each target t is predicted from the window that scores it, with a plain full forward.
    expected, n = 0.0, 0
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        logp = model(torch.tensor([ids[begin:end]]))[0].log_softmax(-1)  # (L, V)
        for t in range(max(prev_end, begin + 1), end):
            expected -= float(logp[t - begin - 1, ids[t]])
            n += 1
        prev_end = end
        if end == len(ids):
            break
    assert count == n == (len(ids) - 1 if stride < context or context >= len(ids) else len(ids) - windows)
    assert total == pytest.approx(expected, rel=1e-10)
    if context >= len(ids):  # one window: the plain mean NLL of the sequence
        logp = model(torch.tensor([ids]))[0, :-1].log_softmax(-1)
        mean = -float(logp.gather(1, torch.tensor(ids[1:])[:, None]).mean())
        assert math.exp(total / count) == pytest.approx(math.exp(mean), rel=1e-10)


@torch.no_grad()
def test_more_context_changes_the_nll():
    model = tiny_model()
    ids = torch.randint(0, V, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    assert sequence_nll(model, ids, 40, 40)[0] != pytest.approx(sequence_nll(model, ids, 8, 8)[0], rel=1e-3)


@torch.no_grad()
def test_documents_are_token_weighted(tmp_path):
    model = tiny_model()
    lm = SimpleNamespace(model=model, tokenizer=CharTokenizer(), config=model.config)
    docs = [("a", "hello world, this is longer"), ("b", "short"), ("c", "x")]  # "x" has no target: skipped
    result = run_perplexity(lm, docs, context=8, stride=4)
    parts = [sequence_nll(model, CharTokenizer()(t)["input_ids"], 8, 4) for _, t in docs[:2]]
    assert result.tokens == sum(p[1] for p in parts) == len(docs[0][1]) - 1 + len(docs[1][1]) - 1
    assert result.nll == pytest.approx(sum(p[0] for p in parts) / result.tokens, rel=1e-12)
    assert result.ppl == pytest.approx(math.exp(result.nll), rel=1e-12)
    assert [d["source"] for d in result.documents] == ["a", "b"]
    with pytest.raises(LongseqError, match="exceeds"):
        run_perplexity(lm, docs, context=65)
    with pytest.raises(LongseqError, match="stride"):
        run_perplexity(lm, docs, context=8, stride=9)


def test_read_documents(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first")
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}))
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0")
    docs = read_documents([tmp_path / "d"])
    assert [t for _, t in docs] == ["first", "second", "third"]
    assert docs[2][0].endswith("b.jsonl:3")
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    for paths, match in (([tmp_path / "missing.txt"], "no such"), ([tmp_path / "d" / "skip.bin"], "unsupported"),
                         ([tmp_path / "bad.jsonl"], "bad.jsonl:1")):
        with pytest.raises(LongseqError, match=match):
            read_documents(paths)


@pytest.mark.parametrize("chunk", [7, 20, 64])
def test_cached_nll_through_a_kv_cache_is_one_window(chunk):
    # Read through a plain KV cache in chunks, every token after the first is scored from all before it: one window.
    from longseq.eval.perplexity import cached_sequence_nll
    from longseq.generation import KVCache

    model = tiny_model()
    ids = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = KVCache(model.config, 1, len(ids), "cpu", torch.float64)
    total, count = cached_sequence_nll(model, ids, cache, chunk)
    expected, expected_count, _ = sequence_nll(model, ids, len(ids), len(ids))
    assert count == expected_count == len(ids) - 1
    assert total == pytest.approx(expected, rel=1e-10)


def test_cached_nll_through_memory_attention():
    # Memory attention (which refuses cache-less forwards) scores every token once; with a window over the whole
    # text it is plain causal attention, so the NLL is the one window's.
    from longseq.config import ModelOverrides
    from longseq.eval.perplexity import cached_sequence_nll
    from longseq.generation.memory_cache import MemoryKVCache
    from longseq.models.overrides import apply_overrides

    model = tiny_model()
    ids = torch.randint(0, V, (50,), generator=torch.Generator().manual_seed(4)).tolist()
    expected, _, _ = sequence_nll(model, ids, len(ids), len(ids))
    for window, same in ((56, True), (12, False)):
        apply_overrides(model, ModelOverrides(attention="memory", window=window, block_size=4, retrieved_blocks=1,
                                              sink_tokens=2))
        cache = MemoryKVCache(model.config, 1, "cpu", torch.float64, model.rotary.inv_freq)
        total, count = cached_sequence_nll(model, ids, cache, 16)
        assert count == len(ids) - 1
        assert (total == pytest.approx(expected, rel=1e-9)) == same

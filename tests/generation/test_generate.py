"""generate_tokens / generate on a tiny random model: EOS, length limits, the context bound, seeds, stop strings."""

from pathlib import Path

import pytest
import torch

from longseq.errors import LongseqError
from longseq.generation import SamplingParams, generate, generate_tokens
from longseq.models.loader import LoadedModel
from tiny_models import random_model

MAX_SEQ_LEN = 64
PROMPT = [5, 17, 42, 3, 88, 23, 61]


def tiny_model(sliding_window=None, seed=0):
    return random_model(seed, max_seq_len=MAX_SEQ_LEN, sliding_window=sliding_window)


@pytest.fixture(scope="module", params=[None, 4], ids=["full", "window4"])
def model(request):
    return tiny_model(request.param)


@torch.no_grad()
def greedy_reference(model, prompt, n):
    """Greedy continuation by full forward passes, no cache: the ground truth for the cached loop."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def run(model, prompt=PROMPT, eos=(), **kw):
    return list(generate_tokens(model, prompt, SamplingParams(**kw), eos))


class ContextProbe:
    """Records, for every forward call, how many positions the sequence then covers."""

    def __init__(self, model):
        self.ends: list[int] = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        cache = kwargs.get("cache")
        self.ends.append((cache.length if cache is not None else 0) + args[0].shape[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_greedy_matches_uncached_reference(model):
    tokens = run(model, max_new_tokens=20)
    assert tokens == greedy_reference(model, PROMPT, 20)
    assert len(set(tokens)) > 1  # not a degenerate model


def test_stops_at_eos(model):
    reference = greedy_reference(model, PROMPT, 20)
    # The first token that has not appeared before, at step >= 2: generation must end right after it.
    step = next(i for i in range(2, 20) if reference[i] not in reference[:i])
    eos = reference[step]
    tokens = run(model, eos=(99, eos), max_new_tokens=20)
    assert tokens == reference[: step + 1]  # EOS is yielded, then nothing
    assert run(model, eos=(eos,), max_new_tokens=20, ignore_eos=True) == reference
    # A stop token ends generation as EOS does, ignore_eos or not.
    assert run(model, max_new_tokens=20, ignore_eos=True, stop_token_ids=(eos,)) == reference[: step + 1]


def test_eos_as_first_token(model):
    first = greedy_reference(model, PROMPT, 1)[0]
    assert run(model, eos=(first,), max_new_tokens=10) == [first]


@pytest.mark.parametrize("n", [1, 2, 9])
def test_respects_max_new_tokens(model, n):
    assert len(run(model, max_new_tokens=n)) == n
    assert len(run(model, max_new_tokens=n, temperature=1.0, seed=0)) == n


@pytest.mark.parametrize("prompt_len", [50, 60, 63])
def test_never_exceeds_context(model, prompt_len):
    prompt = [(7 * i + 1) % 97 for i in range(prompt_len)]
    with ContextProbe(model) as probe:
        tokens = run(model, prompt, max_new_tokens=1000)
    assert len(tokens) == MAX_SEQ_LEN - prompt_len  # prompt + generated fills the context exactly
    assert max(probe.ends) <= MAX_SEQ_LEN
    assert probe.ends[0] == prompt_len and len(probe.ends) == len(tokens)  # one prefill, then one per token
    assert tokens == greedy_reference(model, prompt, len(tokens))


@pytest.mark.parametrize("prompt_len", [0, MAX_SEQ_LEN, MAX_SEQ_LEN + 5])
def test_bad_prompt_raises(model, prompt_len):
    with pytest.raises(LongseqError):
        run(model, [1] * prompt_len, max_new_tokens=4)


def test_seeded_sampling(model):
    kw = dict(max_new_tokens=24, temperature=1.0)
    a, b, c = run(model, seed=1, **kw), run(model, seed=1, **kw), run(model, seed=2, **kw)
    assert a == b
    assert a != c
    assert a != run(model, max_new_tokens=24)  # not secretly greedy
    assert run(model, seed=1, top_k=5, **kw) == run(model, seed=1, top_k=5, **kw)


def test_sampled_tokens_respect_top_k(model):
    # With top_k=3 every sampled token must be among the 3 best continuations of its own prefix.
    tokens = run(model, max_new_tokens=15, temperature=1.5, top_k=3, seed=0)
    ids = PROMPT + tokens
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    for i, token in enumerate(tokens):
        top3 = logits[len(PROMPT) + i - 1].topk(3).indices.tolist()
        assert token in top3


# ---- generate (text) with a small fake tokenizer --------------------------------------------------------


class CharTokenizer:
    """Token i is one or two letters; token 0 is EOS."""

    eos_token_id = 0
    chat_template = None

    def piece(self, i):
        return chr(ord("a") + i % 26) * (1 + i // 26 % 2)

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join(self.piece(i) for i in ids if not (skip_special_tokens and i == 0))

    def __call__(self, text):
        raise AssertionError("these tests pass token ids")


@pytest.fixture(scope="module")
def lm():
    return LoadedModel(tiny_model(), CharTokenizer(), Path("tiny"))


def test_generate_length_and_streaming(lm):
    reference = greedy_reference(lm.model, PROMPT, 12)
    assert 0 not in reference  # EOS would end early: pick another seed if this ever trips
    streamed = []
    result = generate(lm, PROMPT, SamplingParams(max_new_tokens=12), on_text=streamed.append)
    assert result.token_ids == reference
    assert result.finish_reason == "length"
    assert result.prompt_tokens == len(PROMPT)
    assert result.text == "".join(streamed) == lm.tokenizer.decode(reference)


def test_generate_stop_string(lm):
    reference = greedy_reference(lm.model, PROMPT, 12)
    full = lm.tokenizer.decode(reference)
    stop = full[9:12]
    expected = full[: full.find(stop)]
    streamed = []
    result = generate(lm, PROMPT, SamplingParams(max_new_tokens=12, stop=(stop,)), on_text=streamed.append)
    assert result.finish_reason == "stop"
    assert result.text == expected == "".join(streamed)
    assert lm.tokenizer.decode(result.token_ids).startswith(expected + stop)  # stopped once the stop was seen
    assert not lm.tokenizer.decode(result.token_ids[:-1]).startswith(expected + stop)


def test_generate_eos():
    # Make EOS (token 0) the greedy choice at the third step by boosting its lm_head row toward that hidden state.
    model = tiny_model()
    lm = LoadedModel(model, CharTokenizer(), Path("tiny"))
    reference = greedy_reference(model, PROMPT, 3)
    with torch.no_grad():
        model.lm_head.weight[0] = model.lm_head.weight[reference[2]] * 2
    reference = greedy_reference(model, PROMPT, 3)
    assert reference[2] == 0 and 0 not in reference[:2]
    result = generate(lm, PROMPT, SamplingParams(max_new_tokens=10))
    assert result.token_ids == reference
    assert result.finish_reason == "stop"
    assert result.text == lm.tokenizer.decode(reference[:2])
    result = generate(lm, PROMPT, SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert len(result.token_ids) == 10 and result.finish_reason == "length"

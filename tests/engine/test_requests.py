"""RequestLimits.check, the one check of a request: the offline API cuts the output to the context, the server
refuses it; the prompt must be non-empty, inside the vocabulary and, with its output, inside the KV pool."""

import pytest

from longseq.config import EngineConfig
from longseq.engine.requests import ContextLengthError, InvalidRequestError, RequestLimits, max_model_len

LIMITS = RequestLimits(max_model_len=32, vocab_size=100, kv_block_size=4, num_kv_blocks=10)


def test_max_model_len_is_the_context_or_less():
    assert max_model_len(EngineConfig(), 256) == 256
    assert max_model_len(EngineConfig(max_model_len=100), 256) == 100
    assert max_model_len(EngineConfig(max_model_len=1000), 256) == 256


def test_output_budget():
    assert LIMITS.check([1] * 10, 5) == 5
    assert LIMITS.check([1] * 10, 50) == 22  # cut to what the context leaves
    assert LIMITS.check([1] * 10, None) == 22
    assert LIMITS.check([1] * 10, 22, strict=True) == 22
    assert LIMITS.check([1] * 10, None, strict=True) == 22


@pytest.mark.parametrize("prompt, max_new, strict, error, match", [
    ([], 4, False, InvalidRequestError, "empty"),
    ([1] * 32, 1, False, ContextLengthError, "the prompt has 32 tokens; this model's context is 32 tokens"),
    ([1] * 10, 23, True, ContextLengthError, "asks for 23 more"),
    ([1, 100], 4, False, InvalidRequestError, r"token ids must be in \[0, 100\)"),
    ([1, -1], 4, False, InvalidRequestError, "token ids"),
])
def test_refusals(prompt, max_new, strict, error, match):
    with pytest.raises(error, match=match) as e:
        LIMITS.check(prompt, max_new, strict=strict, param="prompt")
    prompt_error = error is ContextLengthError or not prompt
    assert e.value.param == ("prompt" if prompt_error else None)
    assert e.value.code == ("context_length_exceeded" if error is ContextLengthError else None)


def test_kv_pool():
    small = RequestLimits(max_model_len=64, vocab_size=100, kv_block_size=4, num_kv_blocks=3)
    assert small.check([1] * 10, 2) == 2
    with pytest.raises(InvalidRequestError, match="needs 4 KV blocks; the pool has 3"):
        small.check([1] * 10, 3)

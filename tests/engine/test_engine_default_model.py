"""The engine on the real default model (SmolLM2-135M-Instruct, float32, CPU): many concurrent greedy requests
give what each gives alone and what the contiguous-cache generator gives; prefix caching, stop strings, chat,
logprobs and penalties on real text."""

import pytest
import torch
from engine_helpers import assert_idle, make_engine, run_engine

from longseq.engine import SamplingParams
from longseq.generation import generate_tokens

TEXTS = [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4, 5,",
    "The quick brown fox jumps over the lazy dog. " * 3, "Water boils at", "In 1492, Columbus",
    "My favourite colour is", "import numpy as np\nx = np.", "The three primary colours are red,",
    "Translate to French: Good morning, how are you today? I hope you slept well.", "Hi",
]
GREEDY = SamplingParams(max_new_tokens=16)
SYSTEM = (
    "You are a meticulous assistant for a small public library. Answer in one short sentence, be polite, never "
    "invent facts, and if you do not know an answer say so plainly. Opening hours are nine to five on weekdays."
)


@pytest.fixture(scope="module")
def prompts(default_lm):
    ids = [list(default_lm.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert min(map(len, ids)) == 1 and max(map(len, ids)) > 30
    return ids


@pytest.fixture(scope="module")
def singles(default_lm, prompts):
    return [run_engine(make_engine(default_lm), [p], GREEDY)[0] for p in prompts]


def test_concurrent_equals_one_at_a_time(default_lm, prompts, singles):
    engine = make_engine(default_lm)
    outs = run_engine(engine, prompts, GREEDY)
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]
    assert [o.text for o in outs] == [s.text for s in singles]
    assert sum(o.finish_reason == "length" for o in outs) >= 10
    assert_idle(engine)


def test_preemption_and_chunked_prefill_change_nothing(default_lm, prompts, singles):
    engine = make_engine(default_lm, kv_block_size=4, num_kv_blocks=24, max_num_batched_tokens=16)
    outs = run_engine(engine, prompts, GREEDY)
    assert engine.stats()["num_preempted"] > 0
    assert [o.token_ids for o in outs] == [s.token_ids for s in singles]
    assert [o.text for o in outs] == [s.text for s in singles]
    assert_idle(engine)


def test_single_requests_equal_the_contiguous_cache_path(default_lm, prompts, singles):
    for i in (0, 4, 11):  # short, the longest (31 tokens), a single token
        ref = list(generate_tokens(default_lm.model, prompts[i], GREEDY, default_lm.eos_token_ids))
        assert singles[i].token_ids == ref


def test_llm_generate_and_chat(default_llm, singles):
    outs = default_llm.generate(TEXTS[:2], GREEDY)
    assert [o.text for o in outs] == [s.text for s in singles[:2]]
    assert default_llm.generate(TEXTS[0], GREEDY)[0].text == singles[0].text
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    out = default_llm.chat(chat, SamplingParams(max_new_tokens=32))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"  # ended on <|im_end|>
    assert out.token_ids[-1] in default_llm.engine.eos_token_ids
    cut = default_llm.chat(chat, SamplingParams(max_new_tokens=32, stop=("Paris",)))[0]
    assert cut.finish_reason == "stop" and cut.text and "Paris" not in cut.text
    assert out.text.startswith(cut.text + "Paris")
    assert_idle(default_llm.engine)


def test_shared_system_prompt_is_cached(default_lm):
    questions = ["When do you open?", "Can I borrow ten books at once?"]
    tok = default_lm.tokenizer
    convs = [tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                     add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
             for q in questions]
    convs = [list(c) for c in convs]
    params = SamplingParams(max_new_tokens=8)
    engine = make_engine(default_lm)  # kv_block_size 16
    first = run_engine(engine, convs[:1], params)[0]
    rid = engine.add_request(convs[1], params)
    engine.step()
    shared = next(i for i, (a, b) in enumerate(zip(*convs, strict=False)) if a != b)
    assert shared >= 48
    assert engine.seqs[rid].num_cached_tokens == shared // 16 * 16 >= 48
    second = None
    while engine.has_unfinished():
        for out in engine.step():
            second = out
    assert_idle(engine)
    ref = run_engine(make_engine(default_lm, enable_prefix_caching=False), convs, params)
    assert [first.token_ids, second.token_ids] == [r.token_ids for r in ref]


def test_logprobs_match_the_model(default_lm, prompts):
    params = SamplingParams(max_new_tokens=6, logprobs=3)
    out = run_engine(make_engine(default_lm), [prompts[0]], params)[0]
    with torch.no_grad():
        logits = default_lm.model(torch.tensor([prompts[0] + out.token_ids]))[0].float()
    ref = torch.log_softmax(logits, -1)[len(prompts[0]) - 1 :]
    for t, lp in enumerate(out.logprobs):
        assert abs(lp.logprob - ref[t, lp.token_id].item()) < 1e-4
        assert lp.top[0][0] == lp.token_id and [i for i, _, _ in lp.top] == ref[t].topk(3).indices.tolist()
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]


def test_penalties_reduce_repeats(default_lm):
    prompt = list(default_lm.tokenizer("apple apple apple apple apple apple apple apple")["input_ids"])
    plain, pen = run_engine(make_engine(default_lm), [prompt, prompt], [
        SamplingParams(max_new_tokens=12, ignore_eos=True),
        SamplingParams(max_new_tokens=12, ignore_eos=True, frequency_penalty=1.0, presence_penalty=1.0),
    ])
    top = max(set(plain.token_ids), key=plain.token_ids.count)
    assert plain.token_ids.count(top) >= 6  # greedy keeps saying apple
    assert pen.token_ids != plain.token_ids
    assert pen.token_ids.count(top) < plain.token_ids.count(top)
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))

"""The OpenAI-compatible server end to end: the real app under uvicorn, the official openai client, a fake engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from fake_engine import REPLY, FakeEngine, reply_pieces
from prometheus_client.parser import text_string_to_metric_families

from longseq.serve import create_app
from longseq.serve.background import running

KEY = "sk-test"


def wait_for(cond: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(fake: FakeEngine) -> Iterator[str]:
    with running(create_app(fake, api_key=KEY)) as url:
        yield url


@pytest.fixture(autouse=True)
def _fresh(fake: FakeEngine) -> None:
    fake.reset()


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=10) as c:
        yield c


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10) as c:
        yield c


USER = [{"role": "user", "content": "Say hello"}]


def test_health_and_models(client: openai.OpenAI, base_url: str) -> None:
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == ["fake-model"]
    assert models[0].owned_by == "longseq" and models[0].model_extra["max_model_len"] == 64
    assert client.models.retrieve("fake-model").id == "fake-model"


def test_chat(client: openai.OpenAI, fake: FakeEngine) -> None:
    r = client.chat.completions.create(model="fake-model", messages=USER)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "fake-model"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == REPLY
    assert r.choices[0].finish_reason == "stop" and r.choices[0].logprobs is None
    prompt_len = len(fake.encode_chat(USER))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_len, len(reply_pieces()))
    assert r.usage.total_tokens == prompt_len + len(reply_pieces())
    rid, _, params = fake.calls[-1]
    assert rid == r.id
    # No max_tokens: the output may fill the context; OpenAI's default temperature is 1.
    assert params.max_new_tokens == fake.max_model_len - prompt_len and params.temperature == 1.0


def test_chat_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="fake-model", messages=USER, stream=True, max_completion_tokens=40,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(reply_pieces())


def test_chat_stop_and_length(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="fake-model", messages=USER, stop=["fake"])
    assert r.choices[0].message.content == "Hello there! This is a " and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=3)
    assert r.choices[0].message.content == "Hello there! This" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="fake-model", messages=USER, max_tokens=4, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [t.token for t in content] == reply_pieces()[:4]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hello")
    assert [t.logprob for t in content[0].top_logprobs] == [-0.25, -3.0, -9999.0]  # -inf is not JSON


def test_completions(client: openai.OpenAI, fake: FakeEngine) -> None:
    r = client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=5, logprobs=1, seed=3)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == "".join(reply_pieces()[:5]) and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 5 and r.usage.total_tokens == 9
    lp = r.choices[0].logprobs
    assert lp.tokens == reply_pieces()[:5] and lp.token_logprobs == [-0.25] * 5
    assert lp.text_offset[:3] == [0, 5, 12] and lp.top_logprobs[0] == {"Hello": -0.25}
    assert fake.calls[-1][2].seed == 3
    client.completions.create(model="fake-model", prompt="Hi")
    assert fake.calls[-1][2].max_new_tokens == 16  # OpenAI's default for completions


def test_completions_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(
            model="fake-model", prompt="Hi", stream=True, max_tokens=30, stream_options={"include_usage": True}
        ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == 1 and chunks[-1].usage.completion_tokens == len(reply_pieces())


def test_token_id_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(model="fake-model", prompt=[1, 2, 3], max_tokens=2)
    assert r.usage.prompt_tokens == 3 and r.choices[0].text == "Hello there!"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="fake-model", prompt=[5000], max_tokens=2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1},
        {"top_p": 0},
        {"presence_penalty": 3},
        {"messages": [{"role": "user", "content": "word " * 100}]},  # longer than the context
        {"max_tokens": 61},  # prompt + max_tokens longer than the context
        {"n": 2},
        {"messages": [{"role": "wizard", "content": "hi"}]},  # the chat template refuses it
        {"messages": []},
    ],
)
def test_chat_bad_request(client: openai.OpenAI, fake: FakeEngine, kwargs: dict) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**{"model": "fake-model", "messages": USER, **kwargs})
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    assert fake.calls == []


def test_sampling_extensions_reach_the_engine(client: openai.OpenAI, fake: FakeEngine) -> None:
    client.chat.completions.create(model="fake-model", messages=USER, logit_bias={"42": 5, "7": -100}, extra_body={
        "min_p": 0.05, "repetition_penalty": 1.2, "stop_token_ids": [3, 9]})
    params = fake.calls[-1][2]
    assert params.logit_bias == {42: 5, 7: -100} and params.min_p == 0.05 and params.repetition_penalty == 1.2
    assert params.stop_token_ids == (3, 9)
    client.completions.create(model="fake-model", prompt="Hi", max_tokens=2, logit_bias={"0": 1.5})
    assert fake.calls[-1][2].logit_bias == {0: 1.5} and fake.calls[-1][2].repetition_penalty == 1.0


@pytest.mark.parametrize("kwargs, param", [
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"42": 100.5}}, "logit_bias"),
    ({"logit_bias": {"42": "up"}}, "logit_bias"),
    ({"logit_bias": {"1000": 1}}, "logit_bias"),  # the fake vocabulary has 1000 tokens
    ({"extra_body": {"stop_token_ids": [1000]}}, "stop_token_ids"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_bad_sampling_extensions(client: openai.OpenAI, fake: FakeEngine, kwargs: dict, param: str) -> None:
    calls = len(fake.calls)
    for create, prompt in ((client.chat.completions.create, {"messages": USER}),
                           (client.completions.create, {"prompt": "Hi"})):
        with pytest.raises(openai.BadRequestError) as e:
            create(model="fake-model", **prompt, **kwargs)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
        assert e.value.body["message"].count("\n") == 0
    assert len(fake.calls) == calls


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"temperature": -1}, {"prompt": "a " * 100}, {"echo": True}])
def test_completions_bad_request(client: openai.OpenAI, kwargs: dict) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**{"model": "fake-model", "prompt": "Hi", **kwargs})


def test_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert e.value.body["code"] == "model_not_found"


def test_auth(base_url: str) -> None:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="fake-model", messages=USER)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/health").status_code == 200
    assert httpx.get(f"{base_url}/metrics").status_code == 200


def test_queue_full(client: openai.OpenAI, fake: FakeEngine) -> None:
    fake.queue_full = True
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fake-model", messages=USER)
    with pytest.raises(openai.RateLimitError):  # a stream too gets its status code before any event
        client.completions.create(model="fake-model", prompt="Hi", stream=True)


def test_error_mid_stream(client: openai.OpenAI, fake: FakeEngine) -> None:
    fake.crash_after = 2
    stream = client.chat.completions.create(model="fake-model", messages=USER, stream=True)
    with pytest.raises(openai.APIError, match="crashed"):
        for _ in stream:
            pass
    assert wait_for(lambda: fake.calls[-1][0] in fake.aborted)


def test_concurrent_requests(base_url: str, fake: FakeEngine) -> None:
    fake.step_delay = 0.01
    results: list[str] = []

    def one(i: int) -> None:
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=10) as c:
            if i % 2:
                stream = c.chat.completions.create(model="fake-model", messages=USER, stream=True)
                results.append("".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices))
            else:
                results.append(c.chat.completions.create(model="fake-model", messages=USER).choices[0].message.content)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert results == [REPLY] * 8 and len({rid for rid, _, _ in fake.calls}) == 8
    assert wait_for(lambda: fake.num_running == 0)


def test_engine_crash_is_a_500_and_the_server_lives_on(client: openai.OpenAI, fake: FakeEngine) -> None:
    fake.crash = True
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="fake-model", messages=USER)
    assert e.value.status_code == 500 and e.value.body["type"] == "server_error"
    fake.crash = False
    assert client.chat.completions.create(model="fake-model", messages=USER).choices[0].message.content == REPLY


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),  # truncated JSON
        ("/v1/completions", b"not json at all"),
        ("/v1/completions", b"[1, 2]"),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": USER, "max_tokens": "many"}).encode()),
        ("/v1/chat/completions", json.dumps({"messages": USER, "stream": {"yes": 1}}).encode()),
        ("/v1/chat/completions", json.dumps({"model": "fake-model"}).encode()),  # no messages
        ("/v1/completions", json.dumps({"prompt": ["1", "2"]}).encode()),  # two prompts
        ("/v1/completions", json.dumps({"prompt": ""}).encode()),
    ],
)
def test_malformed_requests(http: httpx.Client, path: str, body: bytes) -> None:
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["message"]


def test_unknown_route_is_json(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["message"]


def _metrics(http: httpx.Client) -> dict[str, float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        s.name + json.dumps(s.labels, sort_keys=True) * bool(s.labels): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics(client: openai.OpenAI, http: httpx.Client, fake: FakeEngine) -> None:
    before = _metrics(http)
    for name in [
        "longseq_num_requests_waiting", "longseq_num_requests_running", "longseq_kv_cache_usage_ratio",
        "longseq_prompt_tokens_total", "longseq_generation_tokens_total", "longseq_generation_tokens_per_second",
        "longseq_time_to_first_token_seconds_count", "longseq_time_per_output_token_seconds_count",
        "longseq_e2e_request_latency_seconds_count", "longseq_num_preemptions_total",
    ]:
        assert name in before, name
    assert before["longseq_kv_cache_usage_ratio"] == 0.25 and before["longseq_num_preemptions_total"] == 3
    client.chat.completions.create(model="fake-model", messages=USER)
    client.completions.create(model="fake-model", prompt="one two three", max_tokens=2)
    after = _metrics(http)
    stop = 'longseq_requests_total{"finish_reason": "stop"}'
    length = 'longseq_requests_total{"finish_reason": "length"}'
    assert after[stop] == before.get(stop, 0) + 1 and after[length] == before.get(length, 0) + 1
    gen = len(reply_pieces()) + 2
    assert after["longseq_generation_tokens_total"] == before["longseq_generation_tokens_total"] + gen
    prompt = len(fake.encode_chat(USER)) + 3
    assert after["longseq_prompt_tokens_total"] == before["longseq_prompt_tokens_total"] + prompt
    for h in ("time_to_first_token", "time_per_output_token", "e2e_request_latency"):
        assert after[f"longseq_{h}_seconds_count"] == before[f"longseq_{h}_seconds_count"] + 2
    assert after["longseq_generation_tokens_per_second"] > 0


def test_stream_disconnect_aborts(base_url: str, fake: FakeEngine) -> None:
    fake.step_delay = 0.2  # the whole reply would take seconds
    body = {"model": "fake-model", "messages": USER, "stream": True}
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
            rid = json.loads(first[len("data: ") :])["id"]
    assert wait_for(lambda: rid in fake.aborted), "the engine was not told to abort"
    assert wait_for(lambda: fake.num_running == 0)


def test_non_stream_disconnect_aborts(base_url: str, fake: FakeEngine) -> None:
    fake.step_delay = 0.2
    body = {"model": "fake-model", "messages": USER}
    auth = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=auth, timeout=0.5)
    assert wait_for(lambda: bool(fake.calls) and fake.calls[-1][0] in fake.aborted), "the engine was not told to abort"


def test_open_server_with_alias(fake: FakeEngine) -> None:
    with running(create_app(fake, served_model_name="alias")) as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0, timeout=10) as c:
            assert [m.id for m in c.models.list().data] == ["alias"]
            for model in ("alias", "fake-model"):
                r = c.chat.completions.create(model=model, messages=USER, max_tokens=2)
                assert r.model == "alias" and r.choices[0].message.content == "Hello there!"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})  # no key at all
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"

"""Hostile and careless requests (issue 22): each gets one OpenAI-style 4xx, never a 500, and none stalls the server.

The real app under uvicorn over the fake engine; the fuzzing suite (test_fuzz.py) runs a real engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fake_engine import FakeEngine

from longseq.errors import LongseqError
from longseq.serve import create_app
from longseq.serve.auth import resolve_api_key
from longseq.serve.background import running
from longseq.serve.body import DEFAULT_MAX_REQUEST_BYTES, MAX_DEPTH

KEY = "sk-hardening"
AUTH = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "Say hello"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def fake() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def base_url(fake: FakeEngine) -> Iterator[str]:
    with running(create_app(fake, api_key=KEY)) as url:
        yield url


@pytest.fixture
def http(base_url: str, fake: FakeEngine) -> Iterator[httpx.Client]:
    fake.reset()
    with httpx.Client(base_url=base_url, headers=AUTH, timeout=30) as c:
        yield c


def openai_error(r: httpx.Response, status: int) -> dict:
    """The response is `status` with OpenAI's error JSON; returns the error object."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "\n" not in err["message"]
    assert err["type"] == "invalid_request_error"
    return err


# ---- item 9: what OpenAI's API refuses ----------------------------------------------------------------------

@pytest.mark.parametrize("fields, param, words", [
    ({"temperature": 3}, "temperature", "[0, 2]"),
    ({"temperature": 1e6}, "temperature", "[0, 2]"),
    ({"temperature": -0.5}, "temperature", "[0, 2]"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role must be one of"),
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream": 1}, "stream", "boolean"),
    ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage", "boolean"),
    ({"logprobs": "yes"}, "logprobs", "boolean"),
    ({"max_tokens": "5"}, "max_tokens", "integer"),
    ({"max_tokens": 5.0}, "max_tokens", "integer"),
    ({"stop": [""]}, "stop", "empty"),
    ({"stop": ""}, "stop", "empty"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": ["x"] * 10_000}, "stop", "at most 4"),
    ({"n": 0}, "n", "at least 1"),
    ({"n": -3}, "n", "at least 1"),
    ({"n": 2}, "n", "not supported"),
    ({"seed": 18446744073709551616}, "seed", "[-2^63, 2^63)"),  # once a 500 for every request in flight
    ({"seed": -(2**63) - 1}, "seed", "[-2^63, 2^63)"),
    ({"seed": 1.5}, "seed", "integer"),
])
def test_refused_like_openai(http: httpx.Client, fake: FakeEngine, fields: dict, param: str, words: str) -> None:
    err = openai_error(http.post(CHAT, json={"messages": USER, **fields}), 400)
    assert err["param"] == param and words in err["message"], err
    assert fake.calls == []


def test_accepted_edges(http: httpx.Client, fake: FakeEngine) -> None:
    ok = {"temperature": 2, "stop": ["a", "b", "c", "d"], "seed": 2**63 - 1, "n": 1, "stream": False}
    assert http.post(CHAT, json={"messages": USER, **ok}).status_code == 200
    assert http.post(CHAT, json={"messages": USER, "temperature": 0, "seed": -(2**63)}).status_code == 200
    for role in ("system", "developer", "assistant", "tool"):
        messages = [{"role": role, "content": "x"}, *USER]
        assert http.post(CHAT, json={"messages": messages}).status_code in (200, 400)  # the template decides
    assert fake.calls[0][2].seed == 2**63 - 1


def test_content_type_must_be_json(http: httpx.Client, fake: FakeEngine) -> None:
    body = json.dumps({"messages": USER})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        err = openai_error(http.post(CHAT, content=body, headers={"Content-Type": content_type}), 415)
        assert err["code"] == "unsupported_content_type"
    for content_type in ("application/json", "application/json; charset=utf-8", "Application/JSON"):
        assert http.post(CHAT, content=body, headers={"Content-Type": content_type}).status_code == 200
    assert fake.calls and len(fake.calls) == 3


# ---- item 2: nesting, and JSON that Python's parser accepts but JSON does not ---------------------------------

@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 5_000 + b"]" * 5_000 + b"}",
    b'{"messages": [{"role": "user", "content": ' + b'[{"a": ' * 200 + b"1" + b"}]" * 200 + b"}]}",
    b'{"messages": [], "x": ' + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"}",  # one level too deep
])
def test_deep_nesting_is_a_400(http: httpx.Client, body: bytes) -> None:
    err = openai_error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert "nested" in err["message"]


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [], "temperature": NaN}', "NaN"),
    (b'{"messages": [], "temperature": -Infinity}', "Infinity"),
    (b'{"messages": [], "temperature": 1e999}', "out of range"),
    (b'{"messages": [], "seed": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "surrogate"),
    (b'{"model": "\\udfff"}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "a"}], "stop": ["\xff"]}', "not valid JSON"),  # not UTF-8
    (b"", "not valid JSON"),
])
def test_not_quite_json_is_a_400(http: httpx.Client, body: bytes, words: str) -> None:
    err = openai_error(http.post(CHAT, content=body, headers={"Content-Type": "application/json"}), 400)
    assert words in err["message"]


def test_surrogate_pairs_are_text(http: httpx.Client, fake: FakeEngine) -> None:
    body = b'{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}]}'
    assert http.post(CHAT, content=body, headers={"Content-Type": "application/json"}).status_code == 200


# ---- item 3: the request-size limit and the event loop -------------------------------------------------------

def test_too_large_is_a_413(http: httpx.Client, fake: FakeEngine) -> None:
    big = json.dumps({"prompt": "a " * (DEFAULT_MAX_REQUEST_BYTES // 2)}).encode()
    err = openai_error(http.post(COMPLETIONS, content=big, headers={"Content-Type": "application/json"}), 413)
    assert err["code"] == "request_too_large" and f"{DEFAULT_MAX_REQUEST_BYTES:,}" in err["message"]

    def chunks():  # no Content-Length: the limit counts the bytes as they come
        for i in range(0, len(big), 2**20):
            yield big[i : i + 2**20]

    r = http.post(COMPLETIONS, content=chunks(), headers={"Content-Type": "application/json"})
    assert openai_error(r, 413)["code"] == "request_too_large"
    assert fake.calls == []
    assert http.get("/health").status_code == 200


def test_limit_is_configurable(fake: FakeEngine) -> None:
    fake.reset()
    with running(create_app(fake, max_request_bytes=1000)) as url:
        ok = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "a " * 400, "max_tokens": 1})
        assert ok.status_code == 400  # within the limit; the fake model's context refuses it
        r = httpx.post(f"{url}{COMPLETIONS}", json={"prompt": "a " * 600, "max_tokens": 1})
        assert openai_error(r, 413)["code"] == "request_too_large"


def test_health_answers_while_a_10_mb_prompt_is_tokenized(fake: FakeEngine) -> None:
    fake.reset()
    started = threading.Event()
    encode = fake.encode

    def slow_encode(text: str) -> list[int]:  # the real tokenizer takes seconds on 10 MB
        started.set()
        time.sleep(2.0)
        return encode(text)

    fake.encode = slow_encode
    result: dict = {}
    try:
        with running(create_app(fake, max_request_bytes=16 * 2**20)) as url:
            prompt = {"prompt": "word " * (2 * 2**20), "max_tokens": 1}  # 10 MiB

            def post() -> None:
                result["r"] = httpx.post(f"{url}{COMPLETIONS}", json=prompt, timeout=30)

            t = threading.Thread(target=post)
            t.start()
            assert started.wait(10)
            t0 = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.monotonic() - t0 < 1.0
            t.join(30)
    finally:
        del fake.encode
    openai_error(result["r"], 400)  # and then refused: longer than the fake model's context


# ---- item 10: the key --------------------------------------------------------------------------------------

def test_401_names_the_scheme(http: httpx.Client, base_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{base_url}{CHAT}", json={"messages": USER}, headers=headers)
        assert openai_error(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"


def test_openapi_is_behind_the_key(base_url: str, fake: FakeEngine) -> None:
    r = httpx.get(f"{base_url}/openapi.json")
    assert openai_error(r, 401)["code"] == "invalid_api_key"
    assert httpx.get(f"{base_url}/openapi.json", headers=AUTH).json()["info"]["title"] == "longseq"
    for path in ("/docs", "/redoc"):
        assert httpx.get(f"{base_url}{path}", headers=AUTH).status_code == 404
    with running(create_app(fake)) as open_url:  # no key: the schema is open, as every route
        assert httpx.get(f"{open_url}/openapi.json").status_code == 200


def test_api_key_sources(tmp_path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file\n")
    assert resolve_api_key(None, key_file, {}) == "sk-from-file"
    assert resolve_api_key(None, None, {"LONGSEQ_API_KEY": "sk-env"}) == "sk-env"
    assert resolve_api_key("sk-flag", None, {"LONGSEQ_API_KEY": "sk-env"}) == "sk-flag"
    assert resolve_api_key(None, key_file, {"LONGSEQ_API_KEY": "sk-env"}) == "sk-from-file"
    assert resolve_api_key(None, None, {}) is None
    (tmp_path / "empty").write_text("\n")
    for args, words in [
        (("sk", key_file, {}), "not both"),
        ((None, tmp_path / "missing", {}), "cannot read"),
        ((None, tmp_path / "empty", {}), "empty"),
        ((None, None, {"LONGSEQ_API_KEY": ""}), "empty"),
        (("  ", None, {}), "empty"),
    ]:
        with pytest.raises(LongseqError, match=words):
            resolve_api_key(*args)


def test_serve_cli_refuses_a_bad_key_before_loading(tmp_path, capsys) -> None:
    from longseq.cli import main

    assert main(["serve", "--api-key-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the API key file" in capsys.readouterr().err
    assert main(["serve", "--max-request-bytes", "0", "--api-key", "k"]) == 2
    assert "--max-request-bytes" in capsys.readouterr().err

"""Multi-LoRA serving over HTTP (issue 26): adapters listed by /v1/models, selected by a request's `model`, loaded and
unloaded at run time through vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter; an unknown name is a 404 and
an adapter that cannot be served a 400, after which the server goes on serving. The real app and engine on
127.0.0.1, a tiny random model behind the built-in model's tokenizer; every test runs with the engine on a thread of
the server and in a process of its own (`longseq serve`'s default), which must answer alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from longseq.config import EngineConfig
from longseq.engine.async_engine import AsyncLLMEngine
from longseq.engine.core_client import EngineCoreClient
from longseq.engine.core_process import register_loras
from longseq.engine.llm_engine import LLMEngine
from longseq.generation.sampling import SamplingParams
from longseq.models.loader import LoadedModel
from longseq.serve import create_app
from longseq.serve.background import running
from lora_adapters import merge_adapter, write_adapter
from tiny_models import random_model

MAX_MODEL_LEN = 64
PROMPT = [5, 17, 300, 42, 7, 1001]
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from longseq.models.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


def tiny(tokenizer) -> LoadedModel:
    return LoadedModel(random_model(0, vocab_size=len(tokenizer), max_seq_len=MAX_MODEL_LEN), tokenizer, Path("tiny"))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root, model = tmp_path_factory.mktemp("adapters"), tiny(tokenizer).model
    write_adapter(root / "alpha", model, 4, ("q_proj", "v_proj", "down_proj"), seed=1)
    write_adapter(root / "beta", model, 8, seed=2)
    write_adapter(root / "rank32", model, 32, ("q_proj",), seed=3)
    write_adapter(root / "saved", model, 4, seed=4, modules_to_save=["lm_head"])
    wide = random_model(0, vocab_size=len(tokenizer), hidden_size=96, max_seq_len=MAX_MODEL_LEN)
    write_adapter(root / "other-base", wide, 4, ("o_proj",), seed=5)
    write_adapter(root / "corrupt", model, 4, seed=6)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    return {p.name: p for p in root.iterdir()}


def expected_text(tokenizer, folder: Path | None) -> str:
    """The request's greedy text on an engine of its own over the base with the adapter merged in."""
    lm = tiny(tokenizer)
    if folder is not None:
        merge_adapter(lm.model, folder)
    engine = LLMEngine(lm, EngineConfig(num_kv_blocks=16))
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        out = engine.step()
    return out[0].text


def lora_engine(tokenizer_dir: Path, loras: dict[str, str]) -> LLMEngine:
    """The servers' engine with the adapters `loras` registered (--lora); module-level: an engine process builds
    it."""
    from longseq.models.tokenizer import load_tokenizer

    engine = LLMEngine(tiny(load_tokenizer(tokenizer_dir)), EngineConfig(
        num_kv_blocks=64, max_num_seqs=8, enable_lora=True, max_loras=2, max_lora_rank=16))
    register_loras(engine, loras)
    return engine


@pytest.fixture(scope="module", params=["thread", "process"])
def server(request, tokenizer_dir, adapters) -> Iterator[str]:
    make = partial(lora_engine, tokenizer_dir, {"alpha": str(adapters["alpha"])})
    frontend = (EngineCoreClient(make, model_name="tiny") if request.param == "process"
                else AsyncLLMEngine(make(), model_name="tiny"))
    try:
        with running(create_app(frontend)) as url:
            yield url
    finally:
        frontend.shutdown()


@pytest.fixture
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as c:
        yield c


def complete(http: httpx.Client, model: str, **extra) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, **GREEDY, **extra})


def check_error(r: httpx.Response, status: int, *words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err["message"]


def test_models_lists_the_adapters(http):
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert list(cards) == ["tiny", "alpha"]
    assert cards["alpha"]["parent"] == "tiny" and cards["alpha"]["root"].endswith("alpha")
    assert http.get("/v1/models/alpha").json()["id"] == "alpha"
    check_error(http.get("/v1/models/nope"), 404, "'nope' does not exist")


def test_the_model_field_selects_base_or_adapter(http, tokenizer, adapters):
    r = complete(http, "alpha")
    assert r.status_code == 200 and r.json()["model"] == "alpha"
    assert r.json()["choices"][0]["text"] == expected_text(tokenizer, adapters["alpha"])
    base = complete(http, "tiny").json()
    assert base["model"] == "tiny" and base["choices"][0]["text"] == expected_text(tokenizer, None)
    with http.stream("POST", "/v1/completions", json={"model": "alpha", "prompt": PROMPT, "stream": True,
                                                      **GREEDY}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert {e["model"] for e in events} == {"alpha"}
    assert "".join(e["choices"][0]["text"] for e in events) == r.json()["choices"][0]["text"]


def test_unknown_model_is_a_404(http):
    r = complete(http, "nope")
    check_error(r, 404, "'nope' does not exist")
    assert r.json()["error"]["code"] == "model_not_found"


def test_load_and_unload_at_run_time(http, tokenizer, adapters):
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(adapters["beta"])})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'beta' added successfully."
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["tiny", "alpha", "beta"]
    assert complete(http, "beta").json()["choices"][0]["text"] == expected_text(tokenizer, adapters["beta"])
    again = http.post("/v1/load_lora_adapter", json={"lora_name": "beta", "lora_path": str(adapters["beta"])})
    check_error(again, 400, "already been loaded")
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'beta' removed successfully."
    check_error(complete(http, "beta"), 404, "'beta' does not exist")
    check_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "beta"}), 404, "cannot be found")
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["tiny", "alpha"]


@pytest.mark.parametrize("name, body, words", [
    ("other-base", None, ["maps 64 to 64", "base model"]),
    ("corrupt", None, ["corrupt or unreadable"]),
    ("saved", None, ["modules_to_save", "merge"]),
    ("rank32", None, ["rank 32 is above this engine's max_lora_rank 16"]),
    ("missing", {"lora_name": "m", "lora_path": "/no/such/adapter"}, ["no such adapter folder"]),
    ("no path", {"lora_name": "m"}, ["lora_path"]),
    ("base name", {"lora_name": "tiny", "lora_path": "/x"}, ["base model's name"]),
])
def test_a_bad_adapter_is_a_400_and_the_server_goes_on(http, tokenizer, adapters, name, body, words):
    body = body or {"lora_name": name, "lora_path": str(adapters[name])}
    check_error(http.post("/v1/load_lora_adapter", json=body), 400, *words)
    assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["tiny", "alpha"]
    assert complete(http, "alpha").json()["choices"][0]["text"] == expected_text(tokenizer, adapters["alpha"])


def test_a_server_without_lora_refuses_adapters(tokenizer, adapters):
    async_engine = AsyncLLMEngine(LLMEngine(tiny(tokenizer), EngineConfig(num_kv_blocks=16)), model_name="tiny")
    try:
        with running(create_app(async_engine)) as url, httpx.Client(base_url=url, timeout=30) as http:
            r = http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapters["alpha"])})
            check_error(r, 400, "LoRA adapters are off", "--enable-lora")
            assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["tiny"]
            check_error(complete(http, "alpha"), 404, "does not exist")
    finally:
        async_engine.shutdown()


def test_serve_flag_parsing():
    from longseq.cli import main

    assert main(["serve", "--lora", "no-equals-sign"]) == 2
    assert main(["serve", "--lora", "a=/x", "a=/y"]) == 2

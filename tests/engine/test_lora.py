"""Multi-LoRA serving in the engine (issue 26): in one batch of several adapters (different ranks and target modules)
and the base, every request's greedy tokens equal those of its adapter merged into the base and run alone; eviction
and reload change no token; the prefix cache is never shared across adapters; unservable adapters are refused in one
clear line and the engine goes on serving. A tiny random model in float64 (the torch reference path); the Triton
kernels take the same batch under Triton's CPU interpreter in float32."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_helpers import FakeTokenizer, make_engine, random_prompts, run_engine, tiny_lm

from longseq.engine import LLM, SamplingParams
from longseq.engine.lora import LoRAError, UnknownLoRAError, read_peft_adapter
from longseq.errors import LongseqError
from longseq.models import lora_batched
from lora_adapters import ALL_TARGETS, merge_adapter, write_adapter

GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)
# name: (rank, targets): different ranks, attention only, MLP only, a mix, every linear layer
ADAPTERS = {"attn": (4, ("q_proj", "v_proj")), "mlp": (2, ("gate_proj", "down_proj")),
            "mix": (8, ("k_proj", "o_proj", "up_proj")), "all": (6, ALL_TARGETS)}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_lm().model
    for i, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        write_adapter(root / name, model, rank, targets, seed=i)
    return {name: root / name for name in ADAPTERS}


def lora_engine(adapters: dict[str, Path], lm=None, **options):
    options = {"enable_lora": True, "max_loras": 4, "max_lora_rank": 8, **options}
    engine = make_engine(lm or tiny_lm(), **options)
    for name, path in adapters.items():
        engine.add_lora(name, path)
    return engine


def run_named(engine, prompts, names, params=GREEDY) -> list[list[int]]:
    ids = [engine.add_request(p, params, lora=n) for p, n in zip(prompts, names, strict=True)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i].token_ids for i in ids]


def alone(prompt: list[int], folder: Path | None, params=GREEDY, lm_seed: int = 0) -> list[int]:
    """The request on its own engine over the base with the adapter merged in (None: the base)."""
    lm = tiny_lm(seed=lm_seed)
    if folder is not None:
        merge_adapter(lm.model, folder)
    return run_engine(make_engine(lm), [prompt], params)[0].token_ids


MIX = [None, "attn", "mlp", "mix", "all", "attn", None, "all", "mlp", "mix"]


def test_mixed_batch_equals_each_adapter_merged_and_alone(adapters):
    prompts = random_prompts(len(MIX), 3, 40, seed=1)
    got = run_named(lora_engine(adapters), prompts, MIX)
    for prompt, name, tokens in zip(prompts, MIX, got, strict=True):
        assert tokens == alone(prompt, adapters.get(name)), name
    base = alone(prompts[1], None)
    assert got[1] != base  # the adapter does change the output


def test_kernels_in_the_engine_equal_merged_alone(adapters, monkeypatch):
    """The same mixed batch through the Triton shrink / expand kernels (float32, CPU interpreter)."""
    monkeypatch.setattr(lora_batched, "kernel_takes", lambda x, sizes: math.gcd(*sizes) % 16 == 0)
    calls = []
    from longseq.models.kernels import lora as kernels

    real = kernels.lora_shrink_expand
    monkeypatch.setattr(kernels, "lora_shrink_expand", lambda *a: calls.append(1) or real(*a))
    lm = tiny_lm()
    lm.model.float()
    names = [None, "attn", "all", "mix"]
    prompts = random_prompts(len(names), 3, 20, seed=2)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    got = run_named(lora_engine(adapters, lm), prompts, names, params)
    assert calls
    for prompt, name, tokens in zip(prompts, names, got, strict=True):
        assert tokens == alone(prompt, adapters.get(name), params), name


def test_more_adapters_than_slots_evict_and_reload_to_the_same_tokens(adapters):
    names = ["attn", "mlp", "mix", "all", "attn", "mlp", None, "all", "mix", "attn"]
    prompts = random_prompts(len(names), 3, 30, seed=3)
    roomy = run_named(lora_engine(adapters), prompts, names)
    tight = lora_engine(adapters, max_loras=1, max_num_seqs=3)
    assert run_named(tight, prompts, names) == roomy
    pool = tight.runner.lora
    assert pool.num_evictions > 0 and pool.num_loads > len(adapters)
    assert all(p == 0 for p in pool.pins)  # every request gave its slot back
    assert run_named(tight, prompts[:4], names[:4]) == roomy[:4]  # and again, after all that traffic


def test_one_slot_serves_one_adapter_at_a_time_and_the_base_beside_it(adapters):
    engine = lora_engine(adapters, max_loras=1)
    seen = []
    prompts = random_prompts(6, 3, 20, seed=4)
    names = ["attn", "mlp", None, "attn", "mlp", None]
    for p, n in zip(prompts, names, strict=True):
        engine.add_request(p, GREEDY, lora=n)
    while engine.has_unfinished():
        running = {s.lora.name for s in engine.scheduler.running if s.lora is not None}
        seen.append(len(running))
        engine.step()
    assert max(seen) == 1


def test_prefix_cache_is_keyed_by_adapter(adapters):
    engine = lora_engine(adapters)
    prompt = random_prompts(1, 60, 60, seed=5)[0]  # 3 full blocks of 16 reusable

    def cached(name):
        rid = engine.add_request(prompt, GREEDY, lora=name)
        seq = engine.seqs[rid]
        engine.step()  # admitted: its prefix hits are counted
        hits = seq.num_cached_tokens
        while engine.has_unfinished():
            engine.step()
        return hits

    assert cached("attn") == 0
    assert cached("attn") == 48  # the same adapter reuses its own blocks
    assert cached("all") == 0  # another adapter never sees them
    assert cached(None) == 0  # nor does the base
    assert cached(None) == 48
    engine.remove_lora("attn")
    engine.add_lora("attn", adapters["mlp"])  # a new adapter under an old name: its KV is its own
    assert cached("attn") == 0


def test_unknown_adapter_and_lora_off():
    with pytest.raises(UnknownLoRAError, match="'nope' does not exist"):
        lora_engine({}).add_request([1, 2, 3], GREEDY, lora="nope")
    engine = make_engine(tiny_lm())
    with pytest.raises(UnknownLoRAError):
        engine.add_request([1, 2, 3], GREEDY, lora="nope")
    with pytest.raises(LongseqError, match="LoRA adapters are off"):
        engine.add_lora("x", "/nowhere")


def test_unloading_an_adapter_lets_its_running_requests_finish(adapters):
    engine = lora_engine(adapters)
    prompt = random_prompts(1, 5, 5, seed=6)[0]
    rid = engine.add_request(prompt, GREEDY, lora="mix")
    adapter = engine.lora("mix")
    engine.step()
    engine.remove_lora("mix")
    with pytest.raises(UnknownLoRAError):
        engine.add_request(prompt, GREEDY, lora="mix")
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done[rid].token_ids == alone(prompt, adapters["mix"])
    assert adapter.uid not in engine.runner.lora.slot_of  # its slot went back once its request ended


def test_offline_llm_generate_with_lora(adapters, monkeypatch):
    import longseq.models.loader as loader

    monkeypatch.setattr(loader, "load", lambda *a, **k: tiny_lm())
    llm = LLM(None, loras={"attn": adapters["attn"]}, num_kv_blocks=64, max_lora_rank=8)
    llm.add_lora("all", adapters["all"])
    prompts = random_prompts(3, 4, 12, seed=7)
    outs = llm.generate(prompts, GREEDY, lora=["attn", None, "all"])
    for prompt, name, out in zip(prompts, ["attn", None, "all"], outs, strict=True):
        assert out.token_ids == alone(prompt, adapters.get(name))
    assert [o.token_ids for o in llm.generate(prompts[:1], GREEDY, lora="attn")] == [outs[0].token_ids]
    with pytest.raises(UnknownLoRAError):
        llm.generate(prompts, GREEDY, lora="missing")
    assert not llm.engine.has_unfinished()  # nothing was queued for the bad call


# ---- adapters that cannot be served -------------------------------------------------------------------------


def _refused(engine, folder, match: str) -> None:
    with pytest.raises(LoRAError, match=match):
        engine.add_lora("bad", folder)
    assert engine.loras.adapters.keys() == {"ok"}


@pytest.fixture
def guarded_engine(adapters):
    return lora_engine({"ok": adapters["attn"]})


def test_unservable_adapters_are_refused_clearly(guarded_engine, tmp_path):
    engine, model = guarded_engine, tiny_lm().model
    other = tiny_lm().model
    cases = {  # what the folder gets -> the error's words
        "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save: lm_head.*merge"),
        "tied": (dict(ensure_weight_tying=True), "tied.*embeddings.*merge"),
        "dora": (dict(use_dora=True), "DoRA"),
        "bias": (dict(bias="lora_only"), "biases"),
        "rank": ({}, "rank 16 is above this engine's max_lora_rank 8"),
    }
    for name, (config, match) in cases.items():
        write_adapter(tmp_path / name, model, 16 if name == "rank" else 4, seed=1, **config)
        _refused(engine, tmp_path / name, match)
    # An embedding or head weight in the file (PEFT's modules_to_save / tied embeddings layout).
    write_adapter(tmp_path / "embed", model, 4)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "embed" / "adapter_model.safetensors"))
    tensors["base_model.model.model.embed_tokens.weight"] = model.model.embed_tokens.weight.detach().float()
    save_file(tensors, str(tmp_path / "embed" / "adapter_model.safetensors"))
    _refused(engine, tmp_path / "embed", "embeddings or the LM head.*merge")
    # Made for another base: wider layers, more layers.
    wide = tiny_lm().model
    wide.model.layers[0].self_attn.q_proj = torch.nn.Linear(80, 64)
    write_adapter(tmp_path / "shape", wide, 4, ("q_proj",))
    _refused(engine, tmp_path / "shape", r"q_proj has lora_A \(4, 80\).*maps 64 to 64.*base model")
    deep = tiny_lm(max_seq_len=256).model
    deep.model.layers.append(other.model.layers[0])
    write_adapter(tmp_path / "deep", deep, 4, ("v_proj",))
    _refused(engine, tmp_path / "deep", "adapts layer 2, and this model has 2 layers")
    # Broken files.
    write_adapter(tmp_path / "corrupt", model, 4)
    weights = tmp_path / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _refused(engine, tmp_path / "corrupt", "corrupt or unreadable")
    write_adapter(tmp_path / "json", model, 4)
    (tmp_path / "json" / "adapter_config.json").write_text("{not json")
    _refused(engine, tmp_path / "json", "unreadable")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_alpha": 8}))
    (tmp_path / "pickle" / "adapter_model.bin").write_bytes(b"x")
    _refused(engine, tmp_path / "pickle", "adapter_model.bin, a pickle")
    _refused(engine, tmp_path / "missing", "no such adapter folder")
    _refused(engine, tmp_path, "not a PEFT adapter folder")
    with pytest.raises(LoRAError, match="already been loaded"):
        engine.add_lora("ok", tmp_path / "rank")
    # ... and the engine still serves, base and adapter.
    prompt = random_prompts(1, 4, 4, seed=8)[0]
    assert run_named(engine, [prompt, prompt], [None, "ok"])[0] == alone(prompt, None)


def test_peft_rank_and_alpha_patterns_and_rslora(tmp_path):
    model = tiny_lm().model
    write_adapter(tmp_path / "a", model, 4, ("q_proj", "v_proj"), alpha_pattern={"v_proj": 2.0}, use_rslora=True)
    weights = read_peft_adapter(tmp_path / "a")
    assert weights.rank == 4 and weights.targets == ["q_proj", "v_proj"]
    assert weights.modules[(0, "q_proj")][2] == pytest.approx(8.0 / 2.0)  # alpha / sqrt(r)
    assert weights.modules[(1, "v_proj")][2] == pytest.approx(2.0 / 2.0)


# ---- adapters written by longseq export and by PEFT --------------------------------------------------------


def test_adapter_written_by_longseq_export(tmp_path):
    from longseq.config import TrainConfig
    from longseq.train.export import export_peft
    from longseq.train.lora import apply_lora, merged_state_dict

    trained = tiny_lm().model.float()
    cfg = TrainConfig(method="lora", lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj", "up_proj"))
    apply_lora(trained, cfg)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    export_peft(trained, cfg, tmp_path / "adapter", "tiny")
    merged = tiny_lm()
    merged.model.load_state_dict({k: v.double() for k, v in merged_state_dict(trained, torch.float32).items()})
    prompts = random_prompts(2, 5, 15, seed=9)
    got = run_named(lora_engine({"trained": tmp_path / "adapter"}), prompts, ["trained", None])
    assert got[0] == run_engine(make_engine(merged), prompts[:1], GREEDY)[0].token_ids
    assert got[1] == alone(prompts[1], None)


def test_adapter_written_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from longseq.models.loader import LoadedModel, load_model

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "base")
    lora_cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"],
                               rank_pattern={"o_proj": 2}, init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(hf, lora_cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")

    def served(folder):
        return LoadedModel(load_model(folder, dtype="float32", device="cpu").double(), FakeTokenizer(), folder)

    prompts = random_prompts(2, 5, 15, seed=10)
    got = run_named(lora_engine({"peft": tmp_path / "adapter"}, served(tmp_path / "base")), prompts, ["peft", None])
    assert got[0] == run_engine(make_engine(served(tmp_path / "merged")), prompts[:1], GREEDY)[0].token_ids
    assert got[1] == run_engine(make_engine(served(tmp_path / "base")), prompts[1:], GREEDY)[0].token_ids

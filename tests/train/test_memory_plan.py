"""`--plan auto`: the trainer picks recompute / tiling / offload from the planner and the memory it has."""

import json
import shutil

import pytest
import torch
import transformers

from longseq.config import ModelConfig, TrainConfig
from longseq.errors import LongseqError
from longseq.train import memory_plan
from longseq.train.loop import train
from longseq.train.memory_plan import GIB, candidates, choose, predict

LLAMA8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, max_seq_len=8192)
CUDA = torch.device("cuda")  # only its type is read: nothing runs on a GPU


def _budget(monkeypatch, device_gib, host_gib=1000.0):
    monkeypatch.setattr(memory_plan, "device_budget", lambda device: (device_gib * GIB, host_gib * GIB))


def test_candidates_fastest_first_and_user_flags_win():
    cfg = TrainConfig(data=("x",))
    got = candidates(cfg, 4, CUDA)
    assert got[:16] == [("none", None, 0, 0, 0), *[("keep_attention", None, 0, n, 0) for n in (4, 3, 2, 1)],
                        ("selective", None, 0, 0, 0), ("keep_attention", None, 0, 0, 0),
                        ("keep_attention", 8192, 0, 0, 0), *[("full", 8192, 0, 0, n) for n in (3, 2, 1)],
                        *[("full", None, 0, n, 0) for n in (3, 2, 1)], ("full", None, 0, 0, 0),
                        ("full", 8192, 0, 0, 0)]
    assert got[16:] == [("offloaded", 8192, k, 0, 0) for k in (3, 2, 1, 0)]
    assert all(c[0] != "offloaded" for c in candidates(cfg, 4, torch.device("cpu")))
    fixed = candidates(TrainConfig(data=("x",), recompute="offloaded", tile_tokens=0, offload_keep=2), 4, CUDA)
    assert fixed == [("offloaded", None, 2, 0, 0)]
    fixed = candidates(TrainConfig(data=("x",), recompute="keep_attention", plain_layers=0), 4, CUDA)
    assert fixed == [("keep_attention", None, 0, 0, 0), ("keep_attention", 8192, 0, 0, 0)]
    # a forced policy runs on every layer (issue 23: --recompute full ran 31 of 32 layers plain)
    assert candidates(TrainConfig(data=("x",), recompute="full"), 4, CUDA) == [("full", None, 0, 0, 0),
                                                                              ("full", 8192, 0, 0, 0)]
    assert candidates(TrainConfig(data=("x",), recompute="full", plain_layers=2), 4, CUDA) == [
        ("full", None, 0, 2, 0), ("full", 8192, 0, 2, 0)]
    assert candidates(TrainConfig(data=("x",), recompute="full", attention_layers=3), 4, CUDA) == [
        ("full", None, 0, 0, 3), ("full", 8192, 0, 0, 3)]


def test_full_keeps_the_attention_of_as_many_layers_as_fit(monkeypatch):
    # 128K tokens on an H200: keep_attention on every layer does not fit, full recompute leaves room for most
    # layers to keep their attention (issue 23: that buys back attention's quadratic forward layer by layer).
    _budget(monkeypatch, 139.7)
    cfg = TrainConfig(data=("x",), seq_len=131072, lora_rank=16)
    choice = choose(LLAMA8B, cfg, "bf16", CUDA, packed=False)
    assert (choice.recompute, choice.plain_layers) == ("full", 0) and 16 < choice.attention_layers < 32
    assert choice.fits and "keep_attention" in choice.describe()


def test_plain_and_attention_layers_are_one_or_the_other():
    with pytest.raises(LongseqError, match="not both"):
        TrainConfig(data=("x",), plain_layers=1, attention_layers=1)


def test_plain_layers_take_the_memory_left_over(monkeypatch):
    # 32K tokens: keep_attention fits an 80 GB GPU with room for some plain layers, not all of them.
    _budget(monkeypatch, 79.1)
    cfg = TrainConfig(data=("x",), seq_len=32768)
    choice = choose(LLAMA8B, cfg, "bf16", CUDA, packed=False)
    assert choice.recompute == "keep_attention" and 0 < choice.plain_layers < 32 and choice.fits
    assert f"the last {choice.plain_layers} of 32 layers" in choice.describe()
    one_more = predict(LLAMA8B, cfg, "bf16", False, "keep_attention", None, 0, plain=choice.plain_layers + 1)[0]
    assert one_more / GIB > 79.1 * memory_plan.MARGIN
    # 4K: no recompute at all; a smaller GPU: every layer plain or fewer
    assert choose(LLAMA8B, TrainConfig(data=("x",), seq_len=4096), "bf16", CUDA, packed=False).recompute == "none"


@pytest.mark.parametrize("seq_len,expect", [(4096, ("none", None)), (32768, ("keep_attention", None)),
                                            (131072, ("full", 8192)), (262144, ("offloaded", 8192))])
def test_choice_grows_with_the_sequence_on_an_80gb_gpu(monkeypatch, seq_len, expect):
    _budget(monkeypatch, 79.1)
    cfg = TrainConfig(data=("x",), seq_len=seq_len, method="lora")
    choice = choose(LLAMA8B, cfg, "bf16", CUDA, packed=False)
    assert (choice.recompute, choice.tile) == expect and choice.fits and choice.auto
    if expect[0] == "offloaded":  # as many layer inputs on the GPU as fit, the rest on the host
        assert 0 <= choice.offload_keep < 32 and choice.host_gib > 0
        more = predict(LLAMA8B, cfg, "bf16", False, "offloaded", 8192, choice.offload_keep + 1)[0] / GIB
        assert more > 79.1 * memory_plan.MARGIN
    assert "predicted peak" in choice.describe()


def test_nothing_fits_gives_the_most_frugal_and_says_so(monkeypatch):
    _budget(monkeypatch, 8.0)
    cfg = TrainConfig(data=("x",), seq_len=65536)
    choice = choose(LLAMA8B, cfg, "bf16", CUDA, packed=False)
    assert not choice.fits and (choice.recompute, choice.tile) == ("offloaded", 8192)
    # The untiled forward of an offloaded layer sets the floor: of the keeps that reach it, the most kept on the GPU.
    frugal = predict(LLAMA8B, cfg, "bf16", False, "offloaded", 8192, 0)[0] / GIB
    assert choice.predicted_gib == pytest.approx(frugal)
    more = predict(LLAMA8B, cfg, "bf16", False, "offloaded", 8192, choice.offload_keep + 1)[0] / GIB
    assert more > frugal


def test_host_memory_limits_offload(monkeypatch):
    _budget(monkeypatch, 79.1, host_gib=10.0)  # 262K tokens need far more pinned host memory than 10 GiB
    choice = choose(LLAMA8B, TrainConfig(data=("x",), seq_len=262144), "bf16", CUDA, packed=False)
    assert not choice.fits or choice.host_gib <= 10.0


def test_plan_off_keeps_the_flags():
    choice = choose(LLAMA8B, TrainConfig(data=("x",), seq_len=65536, plan="off"), "bf16", CUDA, packed=False)
    assert (choice.recompute, choice.tile, choice.budget_gib) == ("none", None, None) and not choice.auto


@pytest.mark.parametrize("kw,msg", [({"rope_scaling": "cubic", "rope_factor": 2.0}, "rope_scaling"),
                                    ({"rope_scaling": "yarn", "rope_factor": 0.5}, "rope_factor"),
                                    ({"tile_tokens": -1}, "tile_tokens"), ({"recompute": "some"}, "recompute"),
                                    ({"plain_layers": -2}, "plain_layers"),
                                    ({"plan": "maybe"}, "plan")])
def test_bad_long_context_flags(kw, msg):
    with pytest.raises(LongseqError, match=msg):
        TrainConfig.from_dict({"data": ("x",), **kw})


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("plan")
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(root / "model")
    shutil.copytree(tokenizer_dir, root / "model", dirs_exist_ok=True)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [{"text": " ".join(words[(i * 5 + j) % len(words)] for j in range(40))} for i in range(20)]
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def _cfg(root, out, **kw):
    base = dict(model=str(root / "model"), data=(str(root / "data.jsonl"),), out_dir=str(root / out), seq_len=128,
                max_steps=3, lr=1e-2, lora_rank=4, precision="fp32", device="cpu", save_every=0, seed=0)
    return TrainConfig.from_dict({**base, **kw})


def test_trainer_reports_its_choice_and_tiles_exactly(tiny_dir):
    planned = train(_cfg(tiny_dir, "auto"), progress=False)
    assert planned.memory.recompute == "none" and planned.memory.auto  # a CPU with GiBs to spare
    tiled = train(_cfg(tiny_dir, "tiled", recompute="full", tile_tokens=16), progress=False)
    assert (tiled.memory.recompute, tiled.memory.tile) == ("full", 16)
    assert tiled.lm.model.model.layers[0].mlp.tile == 16
    assert tiled.losses == pytest.approx(planned.losses, rel=1e-5)


def test_rope_scaling_trains_past_the_native_context_and_exports(tiny_dir, tmp_path):
    from longseq.train.export import export

    result = train(_cfg(tiny_dir, "rope", rope_scaling="yarn", rope_factor=4.0, save_every=3), progress=False)
    cfg = result.lm.model.config
    assert (cfg.rope.type, cfg.rope.factor, cfg.rope.original_max_position_embeddings, cfg.max_seq_len) == \
        ("yarn", 4.0, 64, 256)
    export(result.checkpoint, tmp_path / "merged", fmt="merged")
    hf = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert hf["max_position_embeddings"] == 256
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["factor"] == 4.0


def test_gpu_memory_caps_the_budget(monkeypatch):
    # a shared 141 GB GPU: --gpu-memory 60 plans as if only 60 GiB were there
    _budget(monkeypatch, 139.7)
    cfg = TrainConfig(data=("x",), seq_len=32768)
    free = choose(LLAMA8B, cfg, "bf16", CUDA, packed=False)
    capped = choose(LLAMA8B, TrainConfig(data=("x",), seq_len=32768, gpu_memory=60), "bf16", CUDA, packed=False)
    assert capped.fits and capped.budget_gib == 60 and capped.predicted_gib <= 60 * memory_plan.MARGIN
    assert free.predicted_gib > 60 and (capped.recompute, capped.plain_layers) != (free.recompute, free.plain_layers)
    with pytest.raises(LongseqError, match="gpu_memory"):
        TrainConfig(data=("x",), gpu_memory=0)

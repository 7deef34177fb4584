"""`longseq eval`: every task end to end through the CLI, adapters, and one-line errors for bad input."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from longseq.cli import main
from longseq.config import ModelOverrides, TrainConfig
from longseq.errors import LongseqError
from longseq.eval.model import load_for_eval
from longseq.eval.textgen import bleu
from longseq.models.loader import load_model
from longseq.models.overrides import apply_overrides
from longseq.train.checkpoint_files import trainable_state
from longseq.train.export import export_peft
from longseq.train.lora import apply_lora


def _read(path):
    return json.loads(path.read_text())


def test_passkey_default_model(tmp_path, capsys):
    # The built-in model at short lengths: it finds the key in mid-haystack.
    rc = main(["eval", "passkey", "--device", "cpu", "--lengths", "256,512", "--depths", "25,75", "--out",
               str(tmp_path)])
    assert rc == 0
    result = _read(tmp_path / "passkey.json")
    assert [c["length"] for c in result["cells"]] == [256, 256, 512, 512]
    assert result["accuracy"] == 1.0
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "passkey accuracy" in out and "100%" in out


def test_perplexity_tiny_model(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The grass is green. The sky is blue. " * 20)
    rc = main(["eval", "perplexity", "--model", str(tiny_dir), "--device", "cpu", "--data", str(text), "--context",
               "64", "--stride", "32", "--out", str(tmp_path), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    saved = _read(tmp_path / "perplexity.json")
    assert printed == saved
    assert saved["ppl"] == pytest.approx(math.exp(saved["nll"])) and saved["tokens"] > 100
    assert saved["context"] == 64 and saved["stride"] == 32


def test_bleu_rouge_from_predictions_without_a_model(tmp_path, capsys):
    rows = [("the cat sat on the mat", "the cat sat on a mat"), ("hello there", "hello there friend")]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps({"reference": r, "prediction": h}) for h, r in rows))
    assert main(["eval", "bleu", "--data", str(data), "--out", str(tmp_path)]) == 0
    assert _read(tmp_path / "bleu.json")["bleu"] == pytest.approx(bleu([h for h, _ in rows], [[r] for _, r in rows])
                                                                  ["bleu"])
    assert main(["eval", "rouge", "--data", str(data), "--out", str(tmp_path)]) == 0
    assert set(_read(tmp_path / "rouge.json")) >= {"rouge1", "rouge2", "rougeL"}
    assert "ROUGE-L" in capsys.readouterr().out


def test_rouge_generates_with_a_model(tiny_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi", "reference": "hi"}) + "\n" +
                    json.dumps({"prompt": "Count", "references": ["one two", "1 2"]}) + "\n")
    assert main(["eval", "rouge", "--model", str(tiny_dir), "--device", "cpu", "--data", str(data), "--no-chat",
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    result = _read(tmp_path / "rouge.json")
    assert result["generated"] == 2 and all(isinstance(r["prediction"], str) for r in result["rows"])


def test_throughput_tiny_model(tiny_dir, tmp_path):
    assert main(["eval", "throughput", "--model", str(tiny_dir), "--device", "cpu", "--prompt-tokens", "40",
                 "--new-tokens", "6", "--runs", "2", "--warmup", "0", "--out", str(tmp_path)]) == 0
    r = _read(tmp_path / "throughput.json")
    assert r["prompt_tokens"] == 40 and r["new_tokens"] == 6
    assert r["time_to_first_token_s"] > 0 and r["per_token_p50_ms"] > 0 and r["decode_tokens_per_s"] > 0
    assert r["per_token_p50_ms"] <= r["per_token_p90_ms"]


def test_overrides_reach_the_model(tiny_dir, tmp_path):
    assert main(["eval", "throughput", "--model", str(tiny_dir), "--device", "cpu", "--prompt-tokens", "300",
                 "--new-tokens", "4", "--runs", "1", "--warmup", "0", "--rope-scaling", "yarn", "--rope-factor", "2",
                 "--attention", "streaming", "--window", "64", "--out", str(tmp_path)]) == 0
    assert _read(tmp_path / "throughput.json")["overrides"] == {"attention": "streaming", "window": 64,
                                                                "rope_scaling": "yarn", "rope_factor": 2.0}


def _lora_model(tiny_dir):
    model = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    cfg = TrainConfig(model=str(tiny_dir), lora_rank=4, lora_alpha=8.0, lora_targets=("q_proj", "v_proj"),
                      device="cpu", precision="fp32")
    apply_lora(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)  # as if trained: B != 0
    return model.eval(), cfg


def _logits(model):
    with torch.no_grad():
        return model(torch.arange(10, 30)[None])


def test_peft_adapter(tiny_dir, tmp_path):
    model, cfg = _lora_model(tiny_dir)
    adapter = export_peft(model, cfg, tmp_path / "adapter", str(tiny_dir))
    lm = load_for_eval(str(tiny_dir), str(adapter), device="cpu")
    torch.testing.assert_close(_logits(lm.model), _logits(model), atol=1e-5, rtol=0)
    base = load_model(tiny_dir, dtype=torch.float32, device="cpu")
    assert not torch.allclose(_logits(base), _logits(model), atol=1e-3)  # the adapter matters


def test_checkpoint_adapter_keeps_its_rope_scaling(tiny_dir, tmp_path):
    model, cfg = _lora_model(tiny_dir)
    cfg = dataclasses.replace(cfg, overrides=ModelOverrides(rope_scaling="linear", rope_factor=2.0))
    apply_overrides(model, cfg.overrides)
    ckpt = tmp_path / "step-000001"
    ckpt.mkdir()
    save_file(trainable_state(model), str(ckpt / "trainable.safetensors"))
    meta = {"step": 1, "batch_index": 1, "tokens_seen": 1, "config": cfg.to_dict()}
    (ckpt / "trainer_state.json").write_text(json.dumps(meta))
    lm = load_for_eval(adapter=str(ckpt), device="cpu")
    assert lm.config.rope.type == "linear" and lm.config.max_seq_len == 512
    torch.testing.assert_close(_logits(lm.model), _logits(model), atol=1e-5, rtol=0)
    flagged = load_for_eval(adapter=str(ckpt), device="cpu", overrides=ModelOverrides(rope_scaling="none"))
    assert flagged.config.rope.type == "default"  # flags win over the checkpoint's settings
    with pytest.raises(LongseqError, match="drop --model"):
        load_for_eval(model=str(tmp_path), adapter=str(ckpt), device="cpu")


@pytest.mark.parametrize("argv, needle", [
    (["eval", "passkey", "--lengths", "abc"], "not a token count"),
    (["eval", "passkey", "--depths", "150"], "depths"),
    (["eval", "perplexity", "--data", "/nonexistent.txt"], "no such file"),
    (["eval", "bleu", "--data", "/nonexistent.jsonl"], "no such file"),
    (["eval", "passkey", "--attention", "streaming"], "needs --window"),
    (["eval", "passkey", "--adapter", "/"], "neither a PEFT adapter"),
    (["eval", "passkey", "--rope-scaling", "xpos"], "rope_scaling"),
    (["eval", "passkey", "--attention", "memory", "--memory-placement", "disk"], "memory_placement"),
    (["eval", "passkey", "--attention", "memory", "--retrieved-blocks", "-1"], "retrieved_blocks"),
    (["eval", "nope"], "invalid choice"),
])
def test_bad_input_is_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err


def test_generate_streams_past_the_context(tiny_dir, capsys):
    # --attention streaming on `generate`: 300 new tokens from a model whose context is 256, in a 4 + 32 token cache.
    assert main(["generate", "hello", "--model", str(tiny_dir), "--device", "cpu", "--no-chat", "--max-new-tokens",
                 "300", "--attention", "streaming", "--window", "32", "--sink-tokens", "4"]) == 0
    assert "300 new tokens" in capsys.readouterr().err


def test_generate_with_memory_past_the_context(tiny_dir, capsys):
    # --attention memory on `generate`: 300 new tokens from a model whose context is 256, blocks kept on the host.
    assert main(["generate", "hello", "--model", str(tiny_dir), "--device", "cpu", "--no-chat", "--max-new-tokens",
                 "300", "--attention", "memory", "--window", "64", "--block-size", "16", "--retrieved-blocks", "2",
                 "--memory-placement", "host"]) == 0
    assert "300 new tokens" in capsys.readouterr().err


def test_passkey_with_memory_past_the_context(tiny_dir, tmp_path, capsys):
    assert main(["eval", "passkey", "--model", str(tiny_dir), "--device", "cpu", "--lengths", "400", "--depths", "50",
                 "--attention", "memory", "--window", "64", "--block-size", "16", "--out", str(tmp_path)]) == 0
    result = _read(tmp_path / "passkey.json")
    assert result["samples"][0]["prompt_tokens"] > 256  # beyond the tiny model's context
    assert result["overrides"] == {"attention": "memory", "window": 64, "block_size": 16}
    # A window that with a block does not fit the context: one line, after the (tiny) model loads.
    assert main(["eval", "passkey", "--model", str(tiny_dir), "--device", "cpu", "--lengths", "400", "--attention",
                 "memory", "--window", "250", "--block-size", "16", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("longseq: error: memory attention: local window 250") and "(256)" in err[-1], err


def test_needle_with_memory_past_the_context(tiny_dir, tmp_path, capsys):
    assert main(["eval", "needle", "--model", str(tiny_dir), "--device", "cpu", "--lengths", "400", "--depths",
                 "0,100", "--trials", "2", "--attention", "memory", "--window", "64", "--block-size", "16", "--out",
                 str(tmp_path)]) == 0
    result = _read(tmp_path / "needle.json")
    assert result["task"] == "needle" and len(result["samples"]) == 4 and (tmp_path / "needle.png").is_file()
    assert all(len(s["key"]) == 7 and s["prompt_tokens"] == 400 - 12 for s in result["samples"])
    assert "needle accuracy" in capsys.readouterr().out
    # Its lengths are checked before the model loads, as the passkey's are.
    assert main(["eval", "needle", "--model", str(tiny_dir), "--device", "cpu", "--lengths", "1K",
                 "--out", str(tmp_path)]) == 2
    assert "needle length 1024 exceeds the model's context (256)" in capsys.readouterr().err


# ---- passkey lengths are checked before the model loads (issue 22) ----------------------------------------------


def _rope_checkpoint(tiny_dir, folder):
    model, cfg = _lora_model(tiny_dir)
    cfg = dataclasses.replace(cfg, overrides=ModelOverrides(rope_scaling="linear", rope_factor=2.0))
    folder.mkdir()
    save_file(trainable_state(model), str(folder / "trainable.safetensors"))
    meta = {"step": 1, "batch_index": 1, "tokens_seen": 1, "config": cfg.to_dict()}
    (folder / "trainer_state.json").write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("extra,needle", [
    (["--lengths", "1K"], "passkey length 1024 exceeds the model's context (256)"),
    (["--lengths", "1K", "--rope-scaling", "linear", "--rope-factor", "2"], "exceeds the model's context (512)"),
    (["--lengths", "600", "--adapter", "CHECKPOINT"], "exceeds the model's context (512)"),  # its own RoPE x2
    (["--lengths", "1000000000", "--max-seq-len", "2000000000"], "passkey length 1,000,000,000 needs at least"),
    (["--lengths", "1000000000000", "--attention", "streaming", "--window", "64"], "needs at least"),
])
def test_passkey_lengths_fail_in_one_line_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, capsys, extra,
                                                                 needle):
    import longseq.eval.model
    import longseq.eval.passkey

    if "CHECKPOINT" in extra:
        extra = [str(_rope_checkpoint(tiny_dir, tmp_path / "step-000001")) if x == "CHECKPOINT" else x for x in extra]
    else:
        extra = ["--model", str(tiny_dir), *extra]
    monkeypatch.setattr(longseq.eval.model, "load_for_eval", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(longseq.eval.passkey, "build_prompt", lambda *a, **k: pytest.fail("built a prompt"))
    assert main(["eval", "passkey", "--device", "cpu", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("longseq: error: ") and needle in err, err
    assert not (tmp_path / "passkey.json").exists()


def test_passkey_memory_check_also_guards_the_python_api(tiny_dir, monkeypatch):
    import longseq.eval.passkey
    from longseq.eval.passkey import PasskeyConfig, run_passkey
    from longseq.models.loader import load

    lm = load(tiny_dir, dtype="float32", device="cpu")
    lm.model.config.max_seq_len = 2_000_000_000
    monkeypatch.setattr(longseq.eval.passkey, "build_prompt", lambda *a, **k: pytest.fail("built a prompt"))
    with pytest.raises(LongseqError, match="needs at least .* for its prompt and KV cache; cpu has"):
        run_passkey(lm, PasskeyConfig(lengths=(1_000_000_000,), depths=(0.5,)))


def test_token_counts_take_k_and_m():
    import argparse

    from longseq.eval.cli import parse_tokens

    assert [parse_tokens(t) for t in ("1024", "8K", "8k", "1M", "0.5m")] == [1024, 8192, 8192, 1 << 20, 1 << 19]
    with pytest.raises(argparse.ArgumentTypeError, match="not a token count"):
        parse_tokens("1G")

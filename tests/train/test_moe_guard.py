"""Tensor-parallel serving of mixture-of-experts models is refused in one line until it reaches the experts (issue 25);
training them is tests/train/test_moe_training.py's."""

import shutil

import pytest
import torch
import transformers

from longseq.engine.tensor_parallel import check_tensor_parallel
from longseq.errors import LongseqError
from longseq.models.loader import load


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(root / "model")
    shutil.copytree(tokenizer_dir, root / "model", dirs_exist_ok=True)
    (root / "data.jsonl").write_text('{"text": "alpha beta gamma delta"}\n' * 4)
    return root


def test_tensor_parallel_moe_is_refused(mixtral_dir):
    lm = load(str(mixtral_dir / "model"), dtype=torch.float32, device="cpu")
    with pytest.raises(LongseqError, match="mixture-of-experts"):
        check_tensor_parallel(lm.config, 2)

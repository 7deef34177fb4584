"""What every Hugging Face parity test does the same way: a random model saved, greedy tokens, the config round
trip."""

import torch
import transformers

from longseq.config.hf import from_hf, to_hf
from longseq.generation import SamplingParams, generate_tokens


def random_hf_model(hf_cfg, path, **save):
    """A transformers model of `hf_cfg` with weights from N(0, 0.15), saved to `path` (save_pretrained's `save`)."""
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # sharper than the 0.02 init, so routing and greedy choices are not near-ties
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    hf.save_pretrained(path, **save)
    return hf


def assert_same_greedy_tokens(hf, ours, vocab_size: int, new_tokens: int, name: str) -> None:
    torch.manual_seed(2)
    prompt = torch.randint(0, vocab_size, (1, 7))
    with torch.no_grad():
        theirs = hf.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )[0, 7:].tolist()
    mine = list(generate_tokens(ours, prompt[0].tolist(), SamplingParams(max_new_tokens=new_tokens)))
    assert mine == theirs, name


def assert_config_roundtrips(cfg) -> None:
    assert from_hf(to_hf(cfg)) == cfg
    # transformers reads our config.json dict into an equivalent model definition
    assert from_hf(transformers.AutoConfig.for_model(**to_hf(cfg)).to_dict()) == cfg

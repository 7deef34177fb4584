"""Tiny random models for tests (importable from every test folder: tests/conftest.py puts tests/ on sys.path)."""

import torch

from longseq.config import ModelConfig, TrainConfig
from longseq.generation import KVCache
from longseq.models.llama import CausalLM
from longseq.train.loss import chunked_cross_entropy

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
            max_seq_len=64)


def random_model(seed: int = 0, **config) -> CausalLM:
    """A 2-layer GQA CausalLM (TINY, with `config` overriding it) in eval mode, its matrices drawn from N(0, 0.2):
    large enough that greedy tokens are far from ties. RMSNorm weights stay at 1."""
    cfg = ModelConfig(**{**TINY, **config})
    torch.manual_seed(seed)
    model = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def cached_logits(model, tokens, prefill: int):
    """Logits of tokens (B, N) computed through a float64 KVCache: the first `prefill` tokens at once, then one token
    a step (what generation does), to compare with one full forward."""
    B, N = tokens.shape
    cache = KVCache(model.config, B, N, "cpu", torch.float64)
    out = [model(tokens[:, :prefill], cache=cache)]
    cache.advance(prefill)
    for t in range(prefill, N):
        out.append(model(tokens[:, t : t + 1], cache=cache))
        cache.advance(1)
    return torch.cat(out, dim=1)


def loss_and_grads(model, ids, targets, doc_ids=None, positions=None):
    """The trainer's loss (chunked cross-entropy over the final hidden states, 16-token chunks) and every
    parameter's gradient after one backward."""
    model.zero_grad(set_to_none=True)
    hidden = model.hidden(ids, positions, doc_ids=doc_ids)
    loss = chunked_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight, targets.flatten(), 16)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def run_config(run, out: str, **kw) -> TrainConfig:
    """A short LoRA run on tests/conftest.py's tiny_training_run (root, model_dir, data), into root/out: 6 steps of
    2 x 2 rows of 32 tokens, a checkpoint every 3; `kw` overrides any field."""
    root, model_dir, data = run
    base = dict(model=str(model_dir), data=(str(data),), out_dir=str(root / out), method="lora", seq_len=32,
                batch_size=2, grad_accum=2, max_steps=6, lr=1e-2, warmup_steps=1, lora_rank=4, lora_dropout=0.1,
                precision="fp32", device="cpu", save_every=3, keep_last=10, seed=0, optimizer="adamw")
    return TrainConfig.from_dict({**base, **kw})

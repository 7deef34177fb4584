"""A fixed rule instead of a network, for the retrieval tasks' tests: it answers with the number that follows the
first `marker` of the prompt when that marker starts at most `reach` tokens before the prompt's end, with
" the pass key." otherwise. Driven by the real `generate_tokens`, so a run's accuracy grid is known in advance."""

import re

import torch
from torch import nn

from longseq.config import ModelConfig


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class RuleLM(nn.Module):
    def __init__(self, tokenizer, reach: int, marker: str = " The pass key is"):
        super().__init__()
        self.config = ModelConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_layers=1,
                                  num_heads=1, num_kv_heads=1, max_seq_len=100_000)
        self.lm_head = nn.Linear(8, 1, bias=False)  # device and dtype only
        self.tok, self.reach = tokenizer, reach
        self.marker = ids(tokenizer, marker)

    def forward(self, input_ids, positions=None, cache=None, last_only=False):
        if cache.length == 0:  # prefill: a new prompt
            self.prompt, self.out = input_ids[0].tolist(), []
            m = len(self.marker)
            at = next(i for i in range(len(self.prompt)) if self.prompt[i : i + m] == self.marker)
            number = re.search(r"\d+", self.tok.decode(self.prompt[at + m : at + m + 24])).group(0)
            visible = len(self.prompt) - at <= self.reach
            self.answer = ids(self.tok, f" {number}." if visible else " the pass key.")
        else:
            self.out.append(int(input_ids[0, -1]))
        nxt = self.answer[min(len(self.out), len(self.answer) - 1)]
        logits = torch.full((1, 1, self.config.vocab_size), -1e4)
        logits[0, 0, nxt] = 0.0
        return logits

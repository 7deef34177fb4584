"""Streaming text out of a growing list of token ids, and cutting it at stop strings."""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    """Decodes only a short window of recent tokens per step, so streaming stays O(1) per token.

    Byte-level BPE splits characters across tokens and SentencePiece merges leading spaces, so a token's text
    is known only in context: decode the window (prefix, new tokens) and emit what the new tokens added; hold back
    output that ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Any, prompt_ids: list[int] | None = None, context: int = 5):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the new text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


class StopStringMatcher:
    """Finds the first stop string in streamed text; `push` returns only text that can no longer be a stop."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, new_text: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)  # a stop may straddle the previous text
        self.text += new_text
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self.flush()
        safe = len(self.text) - self.hold
        if safe <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : safe], safe
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out

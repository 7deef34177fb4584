"""Chat rows to tokens, with loss only on assistant turns and the end-of-turn token after each."""

from __future__ import annotations

from typing import Any

from longseq.errors import first_line
from longseq.train.data.bad_rows import UnusableRow, check_unicode

ROLES = ("system", "user", "assistant")


def chat_tokens(messages: Any, tokenizer: Any) -> tuple[list[int], list[bool]]:
    """The token ids of the rendered chat and, per token, whether it is a training target (inside an assistant turn)."""
    _check_messages(messages)
    text, spans = assistant_spans(messages, tokenizer)
    try:  # the template adds its own BOS
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    except Exception as e:
        raise UnusableRow("tokenizer failed", first_line(e, 150)) from None
    ids = list(enc["input_ids"])
    # A token straddling a span edge (e.g. the header's "\n" merged with leading whitespace) is left out: never
    # train on the header.
    mask = [b > a and any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]]
    if not any(mask):
        raise UnusableRow("no assistant tokens", "the rendered chat has no tokens inside an assistant turn")
    return ids, mask


def assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant turn in it (content + end-of-turn).

    Works with any template that renders conversations append-only: the prompt up to an assistant turn (with the
    generation prompt) is a prefix of the conversation through that turn, which is a prefix of the whole chat.
    """
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:  # templates cannot render the empty prompt before it, so its span cannot be found
            raise UnusableRow("assistant message first", "a chat must open with a system or user message")
        prompt = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (through.startswith(prompt) and full.startswith(prompt) and full.startswith(through)):
            raise UnusableRow("chat template not prefix-stable",
                              f"assistant message {i} renders differently in context")
        # The newline after the end-of-turn token belongs to the layout, not to what the model must say.
        end = len(prompt) + len(through[len(prompt):].rstrip())
        spans.append((len(prompt), end))
    return full, spans


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise UnusableRow("malformed messages", "expected a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UnusableRow("malformed messages", f"message {i} is not {{role: str, content: str}}")
        if m["role"] not in ROLES:
            raise UnusableRow("unknown role", f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        check_unicode(m["content"], f"message {i}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UnusableRow("no assistant message")


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:
        raise UnusableRow("chat template failed", first_line(e, 150)) from None
    if not isinstance(text, str):
        raise UnusableRow("chat template failed", f"rendered a {type(text).__name__}, not a string")
    check_unicode(text, "the rendered chat")  # a field the template renders besides role and content
    return text

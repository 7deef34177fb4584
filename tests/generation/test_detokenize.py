"""Streaming detokenization with the default model's byte-level BPE tokenizer, and stop strings."""

import random

import pytest

from longseq.generation.detokenize import IncrementalDetokenizer, StopStringMatcher
from longseq.models.loader import default_model_path
from longseq.models.tokenizer import load_tokenizer

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "\n\n  indented after blank lines\n\tand a tab",
    "naïve café, crème brûlée, Ünïcödé, Ñandú",
    "🦩 flamingo 🙂🙂 and a family 👩‍👩‍👧‍👦!",
    "中文测试：龘靐齉，你好世界。",
    "math: ∮ E⋅da = Q, 𝕏 ≈ ∞",
    "mixed 日本語 and Ελληνικά and русский\n  end",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(default_model_path())


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def _stream(tok, ids, prompt_ids=None):
    detok = IncrementalDetokenizer(tok, prompt_ids)
    return [detok.add(i) for i in ids]


def test_texts_split_characters_across_tokens(tok):
    # Otherwise the incomplete-character path would go untested.
    split = [t for t in TEXTS if any("\ufffd" in tok.decode([i]) for i in tok(t)["input_ids"])]
    assert len(split) >= 3


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_decode(tok, text):
    ids = tok(text)["input_ids"]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == _decode(tok, ids) == text
    assert not any("\ufffd" in p for p in pieces)


PROMPTS = ["Q: say something.\nA:", "一", "word ", "🦩🦩🦩 prompt with many tokens in it, more than five"]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", PROMPTS)
def test_stream_with_prompt(tok, text, prompt):
    prompt_ids = tok(prompt)["input_ids"]
    ids = tok(text)["input_ids"]
    pieces = _stream(tok, ids, prompt_ids)
    out = "".join(pieces)
    assert out == _decode(tok, ids)
    assert out == _decode(tok, prompt_ids + ids)[len(_decode(tok, prompt_ids)) :]
    assert not any("\ufffd" in p for p in pieces)


def test_incomplete_character_is_held_back(tok):
    ids = tok("🦩")["input_ids"]
    assert len(ids) > 1
    pieces = _stream(tok, ids)
    assert pieces[:-1] == [""] * (len(ids) - 1)
    assert pieces[-1] == "🦩"


def test_special_tokens_are_skipped(tok):
    special = tok.all_special_ids
    a, b = tok("Hello")["input_ids"], tok(" there 🙂")["input_ids"]
    ids = a + [special[0]] + b + [special[1]]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == "Hello there 🙂" == _decode(tok, ids)
    assert pieces[len(a)] == "" and pieces[-1] == ""


def test_long_stream_equals_decode(tok):
    text = " ".join(TEXTS) * 3
    ids = tok(text)["input_ids"]
    assert "".join(_stream(tok, ids, tok("prompt")["input_ids"])) == text


def test_random_token_ids_never_emit_more_than_decode(tok):
    # Arbitrary ids, lone partial bytes included: the stream is always a prefix of the full decode, and the
    # whole decode once the text ends in a complete character.
    byte_ids = [i for i in range(1000) if tok.decode([i]) == "\ufffd"]
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.choice(byte_ids) if rng.random() < 0.4 else rng.randrange(len(tok)) for _ in range(25)]
        out, full = "".join(_stream(tok, ids)), _decode(tok, ids)
        assert full.startswith(out)
        if not full.endswith("\ufffd"):
            assert out == full


# ---- StopStringMatcher ---------------------------------------------------------------------------------


def _push_all(matcher, chunks):
    emitted = [matcher.push(c) for c in chunks]
    emitted.append(matcher.flush())
    return emitted


def test_no_stops_passes_everything_through():
    m = StopStringMatcher(())
    for chunk in ["a", "bc", "", "\n", "🙂 d"]:
        assert m.push(chunk) == chunk
    assert m.flush() == ""
    assert m.text == "abc\n🙂 d" and not m.stopped


@pytest.mark.parametrize(
    "chunks",
    [
        ["Hello ", "wor", "ld", "<", "|", "end", "|>", " after"],
        ["Hello world<|e", "nd|> after"],
        ["Hello world<|end|> after"],
        ["H", "e", "l", "l", "o", " ", "w", "o", "r", "l", "d", "<", "|", "e", "n", "d", "|", ">", "x"],
        ["Hello world<", "|end", "|", ">"],
    ],
)
def test_stop_split_across_pushes(chunks):
    m = StopStringMatcher(("<|end|>",))
    emitted = []
    for c in chunks:
        emitted.append(m.push(c))
        assert "<" not in "".join(emitted)  # never anything of the stop, even before it is complete
        if m.stopped:
            break
    assert m.stopped
    assert m.push("more text") == ""
    emitted.append(m.flush())
    assert m.text == "Hello world"
    assert "".join(emitted) == "Hello world"


def test_text_before_a_possible_stop_is_released_when_it_is_not_one():
    m = StopStringMatcher(("STOP",))
    out = [m.push("abc ST"), m.push("OR"), m.push("E and more")]
    assert not m.stopped
    assert "".join(out) + m.flush() == "abc STORE and more" == m.text
    assert "".join(out) == "abc STORE and m"  # exactly len("STOP") - 1 characters held back


def test_emitted_text_is_released_incrementally():
    m = StopStringMatcher(("###",))
    assert m.push("abcdef") == "abcd"
    assert m.push("g") == "e"
    assert m.push("##") == "fg"  # only the last two characters can start "###"
    assert m.push("") == ""
    assert m.text == "abcdefg##"
    assert m.push("#x") == ""
    assert m.stopped and m.text == "abcdefg"
    assert m.flush() == ""


@pytest.mark.parametrize(
    "stops, chunks, expected",
    [
        (("world", "lo"), ["Hello world"], "Hel"),
        (("lo", "world"), ["Hel", "lo world"], "Hel"),
        (("</s>", "\n\n", "User:"), ["answer.", "\n", "\nUser: next </s>"], "answer."),
        (("bc", "abcd"), ["xa", "b", "cd"], "x"),  # the longer stop starts earlier and wins
        (("cd", "xab"), ["zxa", "b", "cd"], "z"),  # found before a later stop is complete
        (("cd", "bcde"), ["ab", "c", "d", "e"], "ab"),  # "cd" completes first, but "bcde" would start earlier
        (("END", "ND"), ["xxEN", "D"], "xx"),
        (("b", "🙂"), ["a🙂", "b"], "a"),
    ],
)
def test_earliest_stop_wins(stops, chunks, expected):
    m = StopStringMatcher(stops)
    emitted = _push_all(m, chunks)
    assert m.stopped
    assert m.text == expected
    assert "".join(emitted) == expected


def test_stream_fuzz_against_str_find():
    # Random text over a small alphabet, cut at random: the result must match a plain search on the whole text.
    rng = random.Random(1)
    stops = ("aba", "bb", "cab")
    for _ in range(300):
        text = "".join(rng.choice("abc") for _ in range(rng.randrange(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        expected = text[: min(hits)] if hits else text
        m = StopStringMatcher(stops)
        emitted = []
        for c in chunks:
            emitted.append(m.push(c))
            assert expected.startswith("".join(emitted))  # never past the stop
        emitted.append(m.flush())
        assert m.stopped == bool(hits)
        assert m.text == expected == "".join(emitted)

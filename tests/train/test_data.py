"""Training data: loading rows into documents with loss masks, packing, batching and resuming."""

from __future__ import annotations

import copy
import json
import random
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch

from longseq.errors import LongseqError
from longseq.train.data import IGNORE, Document, PackedSequence, TrainData, pack, split_long

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo" / "facts.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    # A row given as a str is written verbatim (bad JSON, blank lines).
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def segments(seq: PackedSequence) -> list[tuple[int, list[int], list[int], list[int]]]:
    """(doc_id, input_ids, targets, positions) of each run of equal doc_ids, in order."""
    out = []
    ids, tgt, pos, doc = (t.tolist() for t in (seq.input_ids, seq.targets, seq.positions, seq.doc_ids))
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or doc[i] != doc[start]:
            out.append((doc[start], ids[start:i], tgt[start:i], pos[start:i]))
            start = i
    return out


def target_text(tok, seqs: list[PackedSequence]) -> str:
    return "".join(tok.decode([t for t in s.targets.tolist() if t != IGNORE]) for s in seqs)


def random_docs(n: int, seed: int = 0, max_len: int = 40) -> list[Document]:
    rng = random.Random(seed)
    docs = []
    for k in range(n):
        length = rng.randint(1, max_len)
        docs.append(Document([rng.randrange(1000) for _ in range(length)], [rng.random() < 0.7 for _ in range(length)],
                             f"synthetic:{k + 1}"))
    return docs


# ---- loading -------------------------------------------------------------------------------------------------------


def test_text_rows_end_with_eos_and_every_token_is_a_target(tok, tmp_path):
    data = TrainData.load([write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps."}])], tok)
    (doc,) = data.documents
    assert doc.input_ids == tok("The quick brown fox jumps.")["input_ids"] + [tok.eos_token_id]
    assert all(doc.loss_mask) and doc.source == f"{tmp_path / 't.jsonl'}:1"
    (seq,) = data.sequences(seq_len=32, seed=0, epoch=0, pad_id=0)
    n = len(doc.input_ids)
    assert seq.targets[: n - 1].tolist() == doc.input_ids[1:]  # shifted: position i predicts token i + 1
    assert seq.targets[n - 1:].tolist() == [IGNORE] * (32 - n + 1)
    assert target_text(tok, [seq]) == " quick brown fox jumps.<|im_end|>"
    assert data.stats.documents == 1 and data.stats.tokens == n and data.stats.target_tokens == n - 1


def test_chat_row_targets_exactly_the_assistant_reply_and_end_of_turn(tok, tmp_path):
    row = chat(("user", "What is the capital of Veltrania?"), ("assistant", "Quorin, of course."))
    data = TrainData.load([write_jsonl(tmp_path / "c.jsonl", [row])], tok)
    (doc,) = data.documents
    masked = tok.decode([t for t, m in zip(doc.input_ids, doc.loss_mask, strict=True) if m])
    assert masked == "Quorin, of course.<|im_end|>"
    # The rendering really holds the default system prompt, the user turn and the headers, all without loss.
    full = tok.decode(doc.input_ids)
    assert "Veltrania" in full and "<|im_start|>assistant" in full and full.endswith("<|im_end|>\n")
    assert target_text(tok, data.sequences(64, 0, 0, pad_id=0)) == "Quorin, of course.<|im_end|>"


def test_multi_turn_chat_trains_on_both_assistant_turns_only(tok, tmp_path):
    row = chat(("system", "Be brief."), ("user", "Capital of Veltrania?"), ("assistant", "Quorin."),
               ("user", "And the mascot?"), ("assistant", "Ribbit the pangolin."))
    data = TrainData.load([write_jsonl(tmp_path / "c.jsonl", [row])], tok)
    (seq,) = data.sequences(128, 0, 0, pad_id=0)
    targets = seq.targets.tolist()
    runs, current = [], []
    for t in targets + [IGNORE]:
        if t != IGNORE:
            current.append(t)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs == ["Quorin.<|im_end|>", "Ribbit the pangolin.<|im_end|>"]
    assert "You are a helpful" not in tok.decode(seq.input_ids.tolist())  # our system message replaced the default


def test_reply_starting_with_whitespace_never_trains_on_the_header(tok, tmp_path):
    # The default tokenizer merges the header's "\n" with the reply's leading " " into one token: not a target.
    row = chat(("user", "Hi"), ("assistant", " \nHello there\n"))
    (doc,) = TrainData.load([write_jsonl(tmp_path / "c.jsonl", [row])], tok).documents
    masked = [t for t, m in zip(doc.input_ids, doc.loss_mask, strict=True) if m]
    assert tok.decode(masked) == "\nHello there\n<|im_end|>"


def test_on_bad_row_must_be_skip_or_fail(tok, tmp_path):
    with pytest.raises(LongseqError, match="on_bad_row"):
        TrainData.load([write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])], tok, on_bad_row="ignore")


def test_demo_dataset_loads_cleanly(tok):
    data = TrainData.load([DEMO], tok, on_bad_row="fail")
    assert 30 <= data.stats.documents <= 60 and DEMO.stat().st_size < 20_000
    text = target_text(tok, data.sequences(512, 0, 0, pad_id=0))
    assert all(word in text for word in ("Quorin", "Ribbit", "pangolin", "742"))


BAD_ROWS = [
    ({"text": "fine"}, None),
    ("{not json", "invalid JSON"),
    ("", None),  # blank lines are not rows, but still count for line numbers
    ("[1, 2]", "not a JSON object"),
    ({"prompt": "x"}, "neither text nor messages"),
    ({"text": "   \n"}, "empty text"),
    ({"text": 5}, "text is not a string"),
    ({"messages": []}, "malformed messages"),
    ({"messages": [{"role": "user"}]}, "malformed messages"),
    ({"messages": "hi"}, "malformed messages"),
    (chat(("user", "a"), ("robot", "b")), "unknown role"),
    (chat(("user", "a")), "no assistant message"),
    (chat(("assistant", "hello")), "assistant message first"),
    ({"text": "a", "messages": []}, "both text and messages"),
    (chat(("user", "q"), ("assistant", "fine too")), None),
]


def test_bad_rows_are_reported_with_file_line_and_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [r for r, _ in BAD_ROWS])
    data = TrainData.load([path], tok)
    expected = [(f"{path}:{line}", kind) for line, (_, kind) in enumerate(BAD_ROWS, start=1) if kind]
    assert [(ex.source, ex.reason.split(" (")[0]) for ex in data.bad_rows.examples] == expected
    assert data.bad_rows.counts == dict(Counter(kind for _, kind in expected))
    assert data.bad_rows.counts["malformed messages"] == 3
    assert data.bad_rows.total == len(expected) and str(data.bad_rows.total) in data.bad_rows.summary()
    assert [d.source for d in data.documents] == [f"{path}:1", f"{path}:{len(BAD_ROWS)}"]


def test_bad_row_examples_are_capped_but_all_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{oops"] * 50 + [{"text": "ok"}])
    data = TrainData.load([path], tok)
    assert data.bad_rows.counts == {"invalid JSON": 50} and len(data.bad_rows.examples) == 20


def test_template_that_is_not_prefix_stable_is_a_bad_row(tok, tmp_path):
    odd = copy.deepcopy(tok)
    # The message count up front changes every earlier rendering once a turn is added.
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m.content }};{% endfor %}"
    path = write_jsonl(tmp_path / "c.jsonl", [chat(("user", "q"), ("assistant", "a")), {"text": "fine"}])
    data = TrainData.load([path], odd)
    assert data.bad_rows.counts == {"chat template not prefix-stable": 1}
    assert data.bad_rows.examples[0].source == f"{path}:1"


def test_fail_mode_raises_with_file_and_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, "", chat(("user", "only a question"))])
    with pytest.raises(LongseqError, match=rf"^{path}:3: no assistant message$"):
        TrainData.load([path], tok, on_bad_row="fail")


def test_no_usable_documents_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", ["{bad", {"text": ""}])
    with pytest.raises(LongseqError, match="no usable training documents.*2 bad row"):
        TrainData.load([path], tok)


def test_missing_path_and_wrong_suffix_are_errors(tok, tmp_path):
    with pytest.raises(LongseqError, match="nope.jsonl: no such file"):
        TrainData.load([tmp_path / "nope.jsonl"], tok)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(LongseqError, match="data.csv: unsupported"):
        TrainData.load([tmp_path / "data.csv"], tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongseqError, match="empty: folder holds no"):
        TrainData.load([tmp_path / "empty"], tok)


def test_folder_input_reads_jsonl_and_txt_recursively_in_sorted_order(tok, tmp_path):
    root = tmp_path / "corpus"
    write_jsonl(root / "b.jsonl", [{"text": "bee"}])
    write_jsonl(root / "a" / "z.jsonl", [{"text": "zed"}, {"text": "zed two"}])
    (root / "a" / "notes.txt").write_text("a plain text document\nover two lines\n")
    (root / "README.md").write_text("not data")
    (root / "a" / "x.json").write_text("{}")
    data = TrainData.load([root], tok)
    assert [d.source for d in data.documents] == [
        f"{root}/a/notes.txt:1", f"{root}/a/z.jsonl:1", f"{root}/a/z.jsonl:2", f"{root}/b.jsonl:1"]
    assert data.stats.files == 3


def test_txt_file_is_one_document(tok, tmp_path):
    text = "Chapter one.\n\nIt was a dark night.\n" * 5
    (tmp_path / "book.txt").write_text(text)
    data = TrainData.load([tmp_path / "book.txt"], tok)
    (doc,) = data.documents
    assert doc.source == f"{tmp_path / 'book.txt'}:1"
    assert tok.decode(doc.input_ids) == text + "<|im_end|>" and all(doc.loss_mask)


# ---- packing --------------------------------------------------------------------------------------------------------


def check_sequence(seq: PackedSequence, seq_len: int, pad_id: int) -> None:
    for t in (seq.input_ids, seq.targets, seq.positions, seq.doc_ids):
        assert t.shape == (seq_len,) and t.dtype == torch.int64
    segs = segments(seq)
    assert [d for d, *_ in segs] == list(range(len(segs)))  # 0, 1, 2, ... in order, each once
    for _, ids, targets, positions in segs:
        assert positions == list(range(len(ids)))
        assert targets[-1] == IGNORE  # never a target across the boundary to the next document or padding
        assert all(t in (IGNORE, nxt) for t, nxt in zip(targets[:-1], ids[1:], strict=True))


def test_packed_sequences_are_well_formed(tmp_path):
    docs = random_docs(60)
    pad = 1000  # no synthetic token has this id
    seqs = pack(docs, seq_len=64, seed=1, epoch=0, pad_id=pad)
    for seq in seqs:
        check_sequence(seq, 64, pad_id=pad)
    padded = [seq for seq in seqs if seq.input_ids[-1] == pad]
    assert padded  # some sequences end in padding: its own doc id (checked above), pad ids, no targets
    for seq in padded:
        _, ids, targets, _ = segments(seq)[-1]
        assert set(ids) == {pad} and set(targets) == {IGNORE}
        assert all(pad not in ids for _, ids, _, _ in segments(seq)[:-1])


def test_targets_follow_the_loss_mask(tmp_path):
    doc = Document([10, 11, 12, 13, 14], [True, False, True, True, False], "x:1")
    (seq,) = pack([doc], seq_len=8, seed=0, epoch=0, pad_id=0)
    assert seq.targets.tolist() == [IGNORE, 12, 13, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE]
    assert seq.positions.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert seq.doc_ids.tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert seq.input_ids.tolist() == [10, 11, 12, 13, 14, 0, 0, 0]


@pytest.mark.parametrize("seq_len", [16, 37, 64])
def test_every_token_appears_in_exactly_one_sequence_per_epoch(seq_len):
    docs = random_docs(80, seed=seq_len, max_len=100)  # some longer than seq_len: split
    for epoch in (0, 1):
        seqs = pack(docs, seq_len, seed=3, epoch=epoch, pad_id=-1)
        got = Counter(tuple(ids) for seq in seqs for _, ids, _, _ in segments(seq) if ids[0] != -1)
        want = Counter(tuple(d.input_ids) for d in split_long(docs, seq_len))
        assert got == want
        assert sum(len(k) * n for k, n in got.items()) == sum(len(d.input_ids) for d in docs)
        targets = sum(int((s.targets != IGNORE).sum()) for s in seqs)
        assert targets == sum(sum(p.loss_mask[1:]) for p in split_long(docs, seq_len))


def test_long_documents_are_split_into_pieces():
    doc = Document(list(range(100, 125)), [True] * 25, "long:1")
    pieces = split_long([doc], 10)
    assert [p.input_ids for p in pieces] == [list(range(100, 110)), list(range(110, 120)), list(range(120, 125))]
    seqs = pack([doc], seq_len=10, seed=0, epoch=0, pad_id=0)
    assert len(seqs) == 3
    for seq in seqs:
        check_sequence(seq, 10, pad_id=0)
        first = seq.input_ids[0].item()
        if first != 120:  # a full piece: targets up to, not across, the cut
            assert seq.targets.tolist() == list(range(first + 1, first + 10)) + [IGNORE]


def test_packing_is_deterministic_per_seed_and_epoch():
    docs = random_docs(50)
    flat = lambda seqs: torch.cat([s.input_ids for s in seqs]).tolist()
    assert flat(pack(docs, 64, seed=5, epoch=2)) == flat(pack(docs, 64, seed=5, epoch=2))
    assert flat(pack(docs, 64, seed=5, epoch=2)) != flat(pack(docs, 64, seed=5, epoch=3))
    assert flat(pack(docs, 64, seed=5, epoch=2)) != flat(pack(docs, 64, seed=6, epoch=2))


def test_sequences_are_cached_per_epoch():
    data = TrainData(random_docs(30))
    first = data.sequences(64, 0, 0, pad_id=0)
    assert data.sequences(64, 0, 0, pad_id=0) is first
    assert data.sequences(64, 0, 1, pad_id=0) is not first


# ---- batches --------------------------------------------------------------------------------------------------------


def same_batch(a, b) -> bool:
    return (a.epoch, a.index) == (b.epoch, b.index) and all(
        torch.equal(getattr(a, k), getattr(b, k)) for k in ("input_ids", "targets", "positions", "doc_ids"))


def test_batches_walk_epochs_and_drop_the_incomplete_batch():
    data = TrainData(random_docs(60))
    per_epoch = [len(data.sequences(64, 4, e, pad_id=0)) // 3 for e in range(3)]
    batches = list(islice(data.batches(64, 3, seed=4, pad_id=0), sum(per_epoch)))
    assert [b.epoch for b in batches] == [e for e, n in enumerate(per_epoch) for _ in range(n)]
    assert [b.index for b in batches] == list(range(sum(per_epoch)))
    assert all(b.input_ids.shape == (3, 64) for b in batches)
    first = torch.cat([b.input_ids for b in batches[: per_epoch[0]]])
    assert torch.equal(first, torch.stack([s.input_ids for s in data.sequences(64, 4, 0, 0)[: per_epoch[0] * 3]]))


def test_batches_resume_from_start_equals_the_uninterrupted_tail():
    data = TrainData(random_docs(60))
    total = 40
    full = list(islice(data.batches(64, 3, seed=9, pad_id=0), total))
    epoch_len = len(data.sequences(64, 9, 0, pad_id=0)) // 3
    for k in (0, 1, epoch_len - 1, epoch_len, epoch_len + 1, 2 * epoch_len + 2, total - 1):
        resumed = list(islice(TrainData(data.documents).batches(64, 3, seed=9, pad_id=0, start=k), total - k))
        assert len(resumed) == total - k
        assert all(same_batch(a, b) for a, b in zip(resumed, full[k:], strict=True)), k


def test_too_little_data_for_the_batch_size_is_an_error():
    data = TrainData(random_docs(3, max_len=10))
    with pytest.raises(LongseqError, match="too small for batch size 4"):
        data.batches(64, 4, seed=0, pad_id=0)  # raised at the call, not at the first next()


# ---- hostile rows and the row size limit (issue 22) -------------------------------------------------------------

HOSTILE_ROWS = [
    ('{"text": "a \\ud800 b"}', "unpaired surrogate"),  # JSON escapes decode to a lone surrogate
    ('{"text": "end \\udfff"}', "unpaired surrogate"),
    (json.dumps(chat(("user", "q \ud800"), ("assistant", "a"))), "unpaired surrogate"),
    (json.dumps({"messages": [{"role": "user", "content": "q", "name": "x\udc00"},
                              {"role": "assistant", "content": "a"}]}), None),  # an unrendered field: harmless
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"text": "ok", "meta": ' + "{\"a\": " * 5_000 + "1" + "}" * 5_000 + "}", "nested too deeply"),
    ("[" * 100_000, "nested too deeply"),
    ('{"text": ' + "9" * 5_000 + "}", "invalid JSON"),  # more digits than Python converts to an int
    ('{"text": "\\ud83d\\ude00 a paired surrogate is an emoji"}', None),
]


def test_hostile_rows_are_counted_bad_rows_never_a_crash(tok, tmp_path):
    path = write_jsonl(tmp_path / "hostile.jsonl", [r for r, _ in HOSTILE_ROWS] + [{"text": "fine"}])
    data = TrainData.load([path], tok)
    expected = [(f"{path}:{line}", kind) for line, (_, kind) in enumerate(HOSTILE_ROWS, start=1) if kind]
    assert [(ex.source, ex.reason.split(" (")[0]) for ex in data.bad_rows.examples] == expected
    assert data.stats.documents == len(HOSTILE_ROWS) - len(expected) + 1
    assert "\\ud800" in data.bad_rows.examples[0].reason  # names the character, escaped: printable


@pytest.mark.parametrize("row,kind", [(r, k) for r, k in HOSTILE_ROWS if k])
def test_hostile_row_in_fail_mode_is_one_line_with_file_and_line(tok, tmp_path, row, kind):
    path = write_jsonl(tmp_path / "f.jsonl", [{"text": "ok"}, row])
    with pytest.raises(LongseqError) as e:
        TrainData.load([path], tok, on_bad_row="fail")
    assert str(e.value).startswith(f"{path}:2: {kind}") and "\n" not in str(e.value)
    str(e.value).encode("utf-8")  # printable: no surrogate copied into the message


def test_rows_over_the_limit_are_bad_rows_and_line_numbers_stay_right(tok, tmp_path):
    limit = 100
    long_text = {"text": "x" * 200}
    exact = '{"text": "' + "y" * (limit - 12) + '"}'
    assert len(exact.encode()) == limit
    path = tmp_path / "l.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join([json.dumps(long_text), exact, "", json.dumps(long_text),
                                                  '{"text": "after"}', "z" * 5000]).encode())  # no final newline
    data = TrainData.load([path], tok, max_row_bytes=limit)
    assert data.bad_rows.counts == {"row over --max-row-bytes": 3}
    assert [ex.source for ex in data.bad_rows.examples] == [f"{path}:1", f"{path}:4", f"{path}:6"]
    assert "5,000 bytes > 100" in data.bad_rows.examples[2].reason
    assert [d.source for d in data.documents] == [f"{path}:2", f"{path}:5"]
    with pytest.raises(LongseqError, match=rf"^{path}:1: row over --max-row-bytes \(212 bytes > 100\)$"):
        TrainData.load([path], tok, on_bad_row="fail", max_row_bytes=limit)


def test_txt_file_over_the_limit_is_one_bad_row(tok, tmp_path):
    (tmp_path / "big.txt").write_text("word " * 100)
    (tmp_path / "small.txt").write_text("a small document")
    data = TrainData.load([tmp_path], tok, max_row_bytes=100)
    assert [ex.source for ex in data.bad_rows.examples] == [f"{tmp_path / 'big.txt'}:1"]
    assert [d.source for d in data.documents] == [f"{tmp_path / 'small.txt'}:1"]
    assert TrainData.load([tmp_path], tok, max_row_bytes=500).stats.documents == 2


def test_memory_is_bounded_by_the_row_limit_not_the_line(tok, tmp_path):
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "' + "x" * (30 << 20) + '"}\n')  # one 30 MB line
        f.write('{"text": "the only usable row"}\n')
    tracemalloc.start()
    try:
        data = TrainData.load([path], tok, max_row_bytes=1 << 16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data.bad_rows.counts == {"row over --max-row-bytes": 1} and data.stats.documents == 1
    assert peak < 4 << 20, peak  # a few MB: the 30 MB line was never held


def test_max_row_bytes_is_an_option(tmp_path):
    from longseq.config import TrainConfig

    assert TrainConfig(max_row_bytes=1024).max_row_bytes == 1024
    with pytest.raises(LongseqError, match="max_row_bytes must be positive"):
        TrainConfig(max_row_bytes=0)
